"""Validation loss (#18 item 4): the training loss on images that are never trained on.

Which images: data.validation_split holds out a fraction of each subset (data/dataset.py, chosen by
validation_seed) and data.validation_path adds a folder; regularization images are never held out.

When: every validate_every_n_steps steps, at the end of every validate_every_n_epochs-th epoch (every
epoch when neither is set; kohya validates every epoch even with validate_every_n_steps, here a set step
interval is the only one), and at the last step. kohya sd-scripts' option names
(train_network.py at kohya-ss/sd-scripts 48d368fa, lines 1361-1369 and 1533-1680).

How: the loss of compute_loss (the training loss, every loss option included) on each image at
kohya's four fixed timesteps, spread evenly over [min_timestep, max_timestep) (np.linspace(low,
high, 6)[1:-1]: 200, 400, 600, 800 of 1000), in eval mode (no adapter dropout) without gradients,
with schedule-free optimizers' averaged weights. Each (image, timestep) draws its noise from a
generator seeded by the validation seed, the image's index and the timestep, never from the
training RNG: the value moves only when the weights do, and the training run's random stream is
the same with validation on or off. One image is one batch (its seed does not depend on the batch
size); the value is the mean over images x timesteps.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass, replace

import torch

from ..data.cache import LatentCache, TextCache
from ..data.captions import step_caption
from .loss import timestep_range

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def validation_timesteps(num_train_timesteps: int, min_timestep: int | None, max_timestep: int | None) -> list[int]:
    """kohya's fixed validation timesteps: NUM_TIMESTEPS evenly inside the trained range, its ends left out."""
    low, high = timestep_range(num_train_timesteps, min_timestep, max_timestep)
    n = NUM_TIMESTEPS + 1
    return [low + (high - low) * k // n for k in range(1, n)]


def validation_due(step: int, total_steps: int, steps_per_epoch: int, every_n_steps: int | None,
                   every_n_epochs: int | None) -> bool:
    """Whether the validation loss is computed after `step` (counted from 1)."""
    if step == total_steps:
        return True
    if every_n_steps and step % every_n_steps == 0:
        return True
    epochs = every_n_epochs or (None if every_n_steps else 1)  # kohya: every epoch unless told otherwise
    return bool(epochs) and step % steps_per_epoch == 0 and (step // steps_per_epoch) % epochs == 0


def image_seed(seed: int, index: int, timestep: int) -> int:
    """The noise seed of one validation image at one timestep (independent of the step and the training RNG)."""
    return int(hashlib.sha256(f"validation:{seed}:{index}:{timestep}".encode()).hexdigest()[:15], 16)


def validation_caption(item, index: int) -> str:
    """The caption an image is scored with, the same every time: its subset's prefix/suffix and separators, never
    shuffled or dropped (whole or by tag); a wildcard caption's choices are drawn once, seeded by the image's index."""
    if item.subset is None:
        return item.caption
    fixed = replace(item.subset, shuffle_captions=False, caption_tag_dropout=0.0, caption_dropout=0.0,
                    caption_dropout_every_n_epochs=0)
    return step_caption(item.caption, fixed, random.Random(f"validation caption:{index}"), 0)


@contextlib.contextmanager
def evaluating(modules):
    """Eval mode for `modules` (adapter dropout off), each put back in the mode it was in."""
    modes = [(m, m.training) for m in modules if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@dataclass
class ValidationSet:
    """The held-out images with their latents (and text-encoder outputs when those are cached)."""

    items: list
    latents: LatentCache
    text: TextCache | None  # None: the captions are encoded each time (trained text encoder)
    captions: list[str]
    seed: int  # data.validation_seed, else the training seed

    @classmethod
    def build(cls, items: list, vae, data, cache_dir, text_cache: TextCache | None, conditioner, device, seed: int,
              show_progress: bool = False) -> ValidationSet:
        """Encode the images (before the trainer frees the VAE encoder), and their captions when the training
        captions are cached too (a frozen text encoder)."""
        latents = LatentCache(items, vae, data.cache_latents, cache_dir, False, data.max_image_pixels)  # never flipped
        latents.build(show_progress=show_progress)
        captions = [validation_caption(it, i) for i, it in enumerate(items)]
        text = None
        if text_cache is not None:
            text = TextCache(text_cache.cache_dir)
            text.build(captions, conditioner, device, show_progress=show_progress)
        return cls(items, latents, text, captions, seed)

    @torch.no_grad()
    def loss_sum(self, cfg, model, device, autocast, rank: int = 0, world: int = 1) -> tuple[float, int]:
        """(sum of the losses, their count) over this process's share of the images (every world-th from rank),
        each at every validation timestep. The caller puts the modules in eval mode and reduces over processes."""
        from .loop import compute_loss  # the training loss itself (loop.py imports this module lazily)

        n = len(self.items) if cfg.max_validation_steps is None else min(len(self.items), cfg.max_validation_steps)
        timesteps = validation_timesteps(model.noise_scheduler.config.num_train_timesteps, cfg.min_timestep, cfg.max_timestep)
        at = {t: replace(cfg, min_timestep=t, max_timestep=t) for t in timesteps}  # compute_loss then draws t (kohya: the same)
        total, count = torch.zeros((), dtype=torch.float64), 0
        # the global RNG too is left as it was (nothing here should draw from it; if something does, it draws the same)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(rank, n, world):
                latent, mask = self.latents.get_with_mask(i, False)
                latents = latent[None].to(device, torch.float32)
                masks = mask[None].to(device, torch.float32) if mask is not None else None
                with autocast():
                    if self.text is not None:
                        hidden, pooled = self.text.get([self.captions[i]])
                        hidden = hidden.to(device, model.weight_dtype)
                        pooled = pooled.to(device, model.weight_dtype) if pooled is not None else None
                    else:
                        hidden, pooled = model.conditioner.encode([self.captions[i]], device)
                weights = torch.ones(1, device=device)
                for t, at_t in at.items():
                    torch.manual_seed(image_seed(self.seed, i, t))
                    generator = torch.Generator().manual_seed(image_seed(self.seed, i, t))
                    loss = compute_loss(at_t, model, model.pipe.unet, latents, hidden, pooled, [self.items[i].placement],
                                        weights, generator, autocast, masks=masks)
                    total += loss.detach().double().cpu()
                    count += 1
        return float(total), count
