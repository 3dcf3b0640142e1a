"""Latent cache and text-encoder output cache: encode once, train many steps.

Encoding a 512 px image with the SD VAE takes seconds on a CPU and is the same every epoch, so by
default every image is encoded once before training (kept in RAM, or on disk to survive restarts and
to save RAM). A disk entry is keyed by a hash of the image bytes + the resize/crop/flip settings +
the VAE (+ the mask file's hash, or "alpha", with masked loss: the entry then holds the mask at latent
size too), so editing an image or its mask, changing the resolution or swapping the model invalidates
exactly the entries it affects. Entries are written one by one atomically: an interrupted caching pass continues
where it stopped.

We cache the mean of the VAE's latent distribution (deterministic; the SD VAE's std is ~1e-3).
Flipped images are encoded too when random flip is on (a flipped latent is not the flip of a latent).
Random crops and colour shifts (data/augment.py) change every step, so they cannot be cached: the config
check refuses them with a cache, and with cache_latents = "none" each step encodes the View it drew.

Text-encoder outputs are cached per distinct caption, in RAM or (data.cache_text_to_disk) also on
disk, keyed by the caption + a fingerprint of everything that shapes the output: the encoders'
configs and weights, the tokenizers' vocabularies and lengths, the conditioner's settings and the
source of the module that encodes (so a change to how captions are encoded invalidates old entries).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io import atomic_path
from .augment import View, apply_color
from .buckets import apply_placement
from .dataset import Item
from .images import image_to_tensor, open_image
from .masks import latent_mask, pixel_mask

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"


def _weights_digest(h, module, prefixes: tuple[str, ...] | None = None) -> None:
    """Feed ~1024 values spread over each weight (of the named sub-modules) into the hash `h`."""
    for name, p in module.named_parameters():
        if prefixes is None or name.startswith(prefixes):
            values = p.detach().flatten()
            h.update(name.encode())
            h.update(values[:: max(1, values.numel() // 1024)][:1024].float().cpu().numpy().tobytes())


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and of every weight that shapes a latent (encoder, quant_conv),
    so cache entries made by another VAE (e.g. a `vae =` replacement, a fine-tune that changed only
    deeper layers) are never reused. Each tensor contributes ~1024 values spread over all of it (bit
    exact, unlike a sum whose rounding depends on the thread count); a fine-tune changes them all."""
    # "_name_or_path", "_diffusers_version" ... say where the VAE was loaded from, not what it computes
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    _weights_digest(h, vae, ("encoder.", "quant_conv."))
    return h.hexdigest()[:16]


def conditioner_fingerprint(conditioner) -> str:
    """A short hash of what turns a caption into the text-encoder output (see the module docstring)."""
    import inspect

    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(inspect.getsource(inspect.getmodule(type(conditioner))).encode())
    settings = {k: v for k, v in vars(conditioner).items() if isinstance(v, (bool, int, float, str, type(None)))}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for tok in conditioner.tokenizers:
        h.update(json.dumps([type(tok).__name__, tok.model_max_length, sorted(tok.get_vocab().items())]).encode())
    for enc in conditioner.encoders:
        config = {k: v for k, v in enc.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        _weights_digest(h, enc)
    return h.hexdigest()[:16]


def item_pixels(item: Item, flipped: bool, max_pixels: int, view: View | None = None) -> torch.Tensor:
    """The bucket-sized CHW tensor in [-1, 1] for one image (optionally mirrored); `view`: one step's random crop
    and colour draw (data/augment.py), in kohya's order: crop, colour, flip."""
    img = apply_placement(open_image(item.path, max_pixels), view.placement if view is not None else item.placement)
    if view is not None and view.color is not None:
        img = apply_color(img, view.color)
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image_to_tensor(img)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (b, 3, H, W) in [-1, 1] -> scaled latents (b, 4, H/8, W/8) in fp32."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    latents = dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def cache_folder(data, items: list[Item]) -> Path:
    """The disk cache folder: data.cache_dir, else .sd-lora-cache in the dataset folder (the first subset's
    folder, or the kohya dataset config's, when the folders are listed)."""
    if data.cache_dir:
        return Path(data.cache_dir)
    if data.path:
        return Path(data.path) / ".sd-lora-cache"
    if data.dataset_config_path:
        return Path(data.dataset_config_path).parent / ".sd-lora-cache"
    first = next((Path(i.subset.path) for i in items if i.subset is not None and i.subset.path), Path("."))
    return first / ".sd-lora-cache"


def item_mask(item: Item, flipped: bool, latent_size: tuple[int, int], view: View | None = None) -> torch.Tensor | None:
    """The (1, h, w) loss mask of one item at its latent's size (None: the item has no mask), cropped as `view`."""
    if item.mask is None:
        return None
    return latent_mask(pixel_mask(item.mask, view.placement if view is not None else item.placement, flipped), latent_size)


class LatentCache:
    """Latents of every (item, flipped) pair, with the item's loss mask at latent size (masked loss), in RAM or
    in files under `cache_dir`.

    flip: encode mirrored copies of every item (True), of none (False), or of the items whose subset flips
    (None)."""

    def __init__(self, items: list[Item], vae, mode: str, cache_dir: Path | None, flip: bool | None, max_pixels: int):
        self.items, self.vae, self.mode, self.flip, self.max_pixels = items, vae, mode, flip, max_pixels
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.ram: dict[tuple[int, bool], torch.Tensor] = {}
        self.ram_masks: dict[tuple[int, bool], torch.Tensor] = {}
        self._fp = vae_fingerprint(vae) if mode == "disk" else ""

    def key(self, item: Item, flipped: bool) -> str:
        p = item.placement
        parts = [CACHE_VERSION, item.file_hash, str(p.bucket), str(p.resized), str(p.crop), str(flipped), self._fp]
        if item.mask is not None:  # an entry holds the mask too: one made without it (or with another) is not reused
            parts.append(f"mask:{item.mask.digest}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _file(self, item: Item, flipped: bool) -> Path:
        return self.cache_dir / f"{self.key(item, flipped)}.safetensors"

    def build(self, on_progress: Callable[[int, int], None] | None = None, show_progress: bool = True) -> dict:
        """Encode everything not cached yet. Returns counts {"encoded": n, "reused": m}."""
        from safetensors.torch import load_file, save_file

        if self.mode == "none":
            return {"encoded": 0, "reused": 0}
        todo = [(i, f) for i in range(len(self.items)) for f in ((False, True) if self._flips(i) else (False,))]
        encoded = reused = 0
        bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress, leave=False)
        for n, (i, flipped) in enumerate(todo):
            item = self.items[i]
            if self.mode == "disk":
                path = self._file(item, flipped)
                if path.is_file():
                    try:
                        entry = load_file(str(path))  # a damaged entry is re-encoded, not trusted
                        if item.mask is not None and "mask" not in entry:
                            raise KeyError("mask")
                        reused += 1
                        bar.update()
                        continue
                    except Exception:  # noqa: BLE001 - any read failure means: encode again
                        path.unlink(missing_ok=True)
            latent = encode_pixels(self.vae, item_pixels(item, flipped, self.max_pixels)[None])[0]
            mask = item_mask(item, flipped, latent.shape[-2:])
            encoded += 1
            if self.mode == "disk":
                with atomic_path(path) as tmp:
                    save_file({"latent": latent.contiguous()} | ({"mask": mask.contiguous()} if mask is not None else {}), str(tmp))
            else:
                self.ram[(i, flipped)] = latent
                if mask is not None:
                    self.ram_masks[(i, flipped)] = mask
            bar.update()
            if on_progress:
                on_progress(n + 1, len(todo))
        bar.close()
        return {"encoded": encoded, "reused": reused}

    def _flips(self, index: int) -> bool:
        return self.items[index].flip if self.flip is None else self.flip

    def get(self, index: int, flipped: bool) -> torch.Tensor:
        return self.get_with_mask(index, flipped)[0]

    def get_with_mask(self, index: int, flipped: bool, view: View | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent (4, h, w) and the loss mask (1, h, w), or None when the item has no mask. `view`: a step's
        random crop / colour draw, which only mode "none" can give (the config check refuses a cache with them)."""
        flipped = flipped and self._flips(index)
        if view is not None and (view.color is not None or view.placement != self.items[index].placement) and self.mode != "none":
            raise ValueError(f"data.cache_latents = \"{self.mode}\" holds one crop and colour per image: set "
                             "data.cache_latents = \"none\" for random_crop / color_aug")
        if self.mode == "ram":
            return self.ram[(index, flipped)], self.ram_masks.get((index, flipped))
        if self.mode == "disk":
            from safetensors.torch import load_file

            entry = load_file(str(self._file(self.items[index], flipped)))
            return entry["latent"], entry.get("mask")
        item = self.items[index]
        latent = encode_pixels(self.vae, item_pixels(item, flipped, self.max_pixels, view)[None])[0]
        return latent, item_mask(item, flipped, latent.shape[-2:], view)


class TextCache:
    """Text-encoder outputs per caption, for a frozen text encoder: computed once, kept in RAM, and also
    in files under `cache_dir` when given (reused by the next run, e.g. a resumed one)."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hidden: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, captions: list[str], conditioner, device, batch_size: int = 16, show_progress: bool = True) -> dict:
        """Encode every caption not cached yet. Returns counts {"encoded": n, "reused": m}."""
        from safetensors.torch import load_file, save_file

        unique = [c for c in dict.fromkeys(captions) if c not in self.hidden]
        files: dict[str, Path] = {}
        reused = 0
        if self.cache_dir is not None:
            fp = conditioner_fingerprint(conditioner)
            for c in unique:
                files[c] = self.cache_dir / f"text-{hashlib.sha256(f'{fp}|{c}'.encode()).hexdigest()}.safetensors"
                if files[c].is_file():
                    try:
                        entry = load_file(str(files[c]))
                    except Exception:  # noqa: BLE001 - a damaged entry is encoded again
                        files[c].unlink(missing_ok=True)
                        continue
                    self.hidden[c] = entry["hidden"]
                    if "pooled" in entry:
                        self.pooled[c] = entry["pooled"]
                    reused += 1
            unique = [c for c in unique if c not in self.hidden]
        for start in tqdm(range(0, len(unique), batch_size), desc="caching text", disable=not show_progress, leave=False):
            chunk = unique[start : start + batch_size]
            hidden, pooled = conditioner.encode(chunk, device)
            for j, c in enumerate(chunk):
                self.hidden[c] = hidden[j].float().cpu().contiguous()
                if pooled is not None:
                    self.pooled[c] = pooled[j].float().cpu().contiguous()
                if c in files:
                    entry = {"hidden": self.hidden[c]} | ({"pooled": self.pooled[c]} if c in self.pooled else {})
                    with atomic_path(files[c]) as tmp:
                        save_file(entry, str(tmp))
        return {"encoded": len(unique), "reused": reused}

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = torch.stack([self.hidden[c] for c in captions])
        pooled = torch.stack([self.pooled[c] for c in captions]) if self.pooled else None
        return hidden, pooled
