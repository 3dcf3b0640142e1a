"""Tiny offline Stable Diffusion pipelines for tests, demos and benchmarks.

Nothing here downloads anything. Tiny pipelines are built from configs with seeded random weights
and a hand-made CLIP tokenizer; full-size architectures can be built with random weights or on the
meta device when a test needs the real module names and shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .models import ARCH_SD1, ARCH_SD2, ARCH_SD2_V, ARCH_SDXL, shipped_config_dir

# Words the tiny tokenizer knows as whole tokens (anything else is spelled out letter by letter).
TINY_VOCAB_WORDS = (
    "a an the of on in with and photo picture painting drawing style image small large big tiny "
    "red green blue yellow orange purple white black gray grey pink brown cyan magenta "
    "circle square triangle star cross ring diamond shape shapes background plain striped stripes "
    "outline outlined dots dotted pastel neon ink film texture palette sks ohwx person dog cat "
    "two three left right top bottom center"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table used by CLIP's (and GPT-2's) byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_tokenizer(directory: str | os.PathLike, words: tuple[str, ...] = TINY_VOCAB_WORDS) -> Path:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) to `directory`.

    Every byte is a token, so any text encodes; the words in `words` get BPE merges that build them
    into single tokens, so captions made of them are short and meaningful to a tiny model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    for word in words:
        # Merge left to right: "red" -> r e d</w> -> re d</w> -> red</w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if merged not in known:
                merges.append(pair)
                vocab_list.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        ),
        encoding="utf-8",
    )
    return directory


@lru_cache(maxsize=None)
def _tiny_tokenizer_dir() -> str:
    return str(write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="sd_lora_tok_"))))


def tiny_tokenizer():
    """A CLIPTokenizer with a small vocabulary, built offline (vocab size ~600, max length 77)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tiny_tokenizer_dir(), model_max_length=77)


def _tiny_text_encoder(vocab_size: int, hidden: int = 32, with_projection: bool = False, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def tiny_unet_config(arch: str) -> dict:
    """UNet2DConditionModel kwargs of the tiny model for `arch` (same block types as the real one)."""
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if arch == ARCH_SD1:
        return dict(common, cross_attention_dim=32, attention_head_dim=8)
    if arch in (ARCH_SD2, ARCH_SD2_V):
        return dict(common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    if arch == ARCH_SDXL:
        return dict(
            common,
            cross_attention_dim=32 + 48,  # te1 hidden 32 + te2 hidden 48, concatenated as in SDXL
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=48 + 6 * 8,  # pooled te2 (48) + 6 time ids x 8
        )
    raise ValueError(f"unknown architecture {arch!r}")


def _scheduler(arch: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if arch == ARCH_SDXL:
        return EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
        )
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if arch == ARCH_SD2_V else "epsilon",
    )


def tiny_pipeline(arch: str = ARCH_SD1, seed: int = 0):
    """A tiny diffusers text-to-image pipeline of `arch` ("sd1", "sd2", "sd2-v", "sdxl").

    Built from configs with weights drawn from `torch.manual_seed(seed)`; no file is read from a hub.
    Runs on the CPU in a fraction of a second per step at 64 px.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(arch))
    vae = _tiny_vae()
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    scheduler = _scheduler(arch)
    if arch == ARCH_SDXL:
        te1 = _tiny_text_encoder(vocab)
        # te2 is wider than te1, as in the real SDXL (768 vs 1280): diffusers' from_single_file tells
        # the two encoders apart by width, so equal widths would load te1's weights into te2.
        te2 = _tiny_text_encoder(vocab, hidden=48, with_projection=True, act="gelu")
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    te = _tiny_text_encoder(vocab, act="quick_gelu" if arch == ARCH_SD1 else "gelu")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def full_size_unet(arch: str = ARCH_SD1, device: str = "meta", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The full-size UNet of `arch` with random weights (device "cpu") or no storage (device "meta")."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(shipped_config_dir(arch), subfolder="unet")
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            return unet if dtype == torch.float32 else unet.to(dtype)
    return UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype)


def full_size_text_encoders(arch: str = ARCH_SD1, device: str = "meta", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The full-size text encoder(s) of `arch`: a list of one (SD1/SD2) or two (SDXL) models."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(shipped_config_dir(arch))
    torch.manual_seed(seed)
    encoders = []
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if not (root / sub).is_dir():
            continue
        config = CLIPTextConfig.from_pretrained(root / sub)
        if device == "meta":
            with torch.device("meta"):
                model = cls(config)
                encoders.append(model if dtype == torch.float32 else model.to(dtype))
        else:
            encoders.append(cls(config).to(device=device, dtype=dtype))
    return encoders


def full_size_pipeline(arch: str = ARCH_SD1, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A full-size pipeline of `arch` with random weights (several GB for SDXL; meta device works)."""
    from .models import load_base

    return load_base(shipped_config_dir(arch), dtype=dtype, device=device, random_weights=True, seed=seed)


# -- random LoRA files for tests and benchmarks ------------------------------------------------------

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def lora_target_layers(pipe, arch: str = ARCH_SD1, conv: bool = False, text_encoder: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module path, module) of the layers a kohya LoRA targets, each once: attention
    projections of the UNet (and the text encoders), plus the UNet's ResNet 3x3 convs with `conv` (LoCon)."""
    from .network.naming import module_index

    out, seen = [], set()
    for component, path, module in module_index(pipe, arch).values():
        if (component, path) in seen or (component != "unet" and not text_encoder):
            continue
        is_conv = conv and component == "unet" and isinstance(module, torch.nn.Conv2d) and path.endswith(("conv1", "conv2"))
        if path.endswith(ATTENTION_PROJECTIONS) or is_conv:
            seen.add((component, path))
            out.append((component, path, module))
    return out


def random_kohya_lora(pipe, arch: str = ARCH_SD1, seed: int = 0, rank: int = 4, alpha: float = 2.0, conv: bool = False,
                      text_encoder: bool = True, kind: str = "lora") -> dict[str, torch.Tensor]:
    """A seeded random adapter for `pipe` as a kohya state dict, of method `kind` (a name in
    sd_lora.methods; its `random_tensors`): LoRA/LoCon by default. Methods whose tensors do not say a
    conv kernel (LoHa, LoKr) get linear layers only. Factors are small, so a weight-1 stack stays a
    perturbation."""
    from . import methods
    from .network.naming import kohya_module_name

    method = methods.get(kind)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, path, module in lora_target_layers(pipe, arch, conv, text_encoder):
        name, shape = kohya_module_name(component, path, arch), tuple(module.weight.shape)
        tensors = method.random_tensors(shape, rank, g)
        if len(shape) == 4 and method.weight_shape(tensors) != shape and not method.needs_base:
            continue  # a flat conv delta a reader could not reshape
        tensors.setdefault("alpha", torch.tensor(alpha))
        sd.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
    return sd


def write_random_lora(path: str | os.PathLike, pipe, arch: str = ARCH_SD1, seed: int = 0, dtype: torch.dtype = torch.float32,
                      metadata: dict[str, str] | None = None, **kwargs) -> Path:
    """`random_kohya_lora(pipe, arch, seed, **kwargs)` written as a .safetensors file (factors in `dtype`)."""
    from safetensors.torch import save_file

    sd = {k: v.to(dtype) if v.dim() else v for k, v in random_kohya_lora(pipe, arch, seed, **kwargs).items()}
    save_file(sd, str(path), metadata=metadata or {"ss_network_module": "networks.lora"})
    return Path(path)


def write_noise_images(folder: str | os.PathLike, n: int, captions: list[str] | str | None = None, seed: int = 0, size: int = 64) -> Path:
    """`n` seeded random-noise RGB PNGs (0.png, 1.png, ...) in `folder` (created), with .txt captions
    when given (one string for all, or one per image): a dataset for training-mechanics tests."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions is not None:
            (folder / f"{i}.txt").write_text(captions if isinstance(captions, str) else captions[i])
    return folder


def assert_same_tensors(expected, got, what: str = "") -> None:
    """Two state dicts, or two .safetensors files (paths), hold the same tensors bit for bit: the same
    names and each tensor equal (the check of every "interrupted + resumed == uninterrupted" test)."""
    from .io import load_safetensors

    a = load_safetensors(expected)[0] if isinstance(expected, (str, os.PathLike)) else expected
    b = load_safetensors(got)[0] if isinstance(got, (str, os.PathLike)) else got
    label = f"{what}: " if what else ""
    assert a.keys() == b.keys(), f"{label}names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{label}{len(unequal)} of {len(a)} tensors differ, e.g. {unequal[:3]}"
