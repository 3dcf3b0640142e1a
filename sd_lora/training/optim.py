"""Optimizers and learning-rate schedules.

AdamW is torch's. The 8-bit optimizers come from bitsandbytes (optimizer state in 8 bits: ~75 % less
optimizer memory, which matters more than it sounds with a text encoder in the run). The `paged_`
variants page optimizer state to CPU RAM under GPU memory pressure; they need CUDA, so on a CPU we
fall back to the plain 8-bit one and say so. Schedules are diffusers' `get_scheduler`.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def param_groups(unet_params, te_params, lr: float, te_lr: float, lr_weights: dict | None = None) -> list[dict]:
    """Separate groups so the UNet and text encoder LoRAs get their own learning rates.

    lr_weights (LoraNetwork.lr_weights(): the block LR weights): the UNet group is split per block,
    "unet_IN04" at lr x its weight (sd_lora/network/blocks.py)."""
    from ..network.blocks import split_by_lr_weight

    groups = []
    if unet_params:
        for suffix, weight, params in split_by_lr_weight(unet_params, lr_weights):
            groups.append({"params": params, "lr": lr * weight, "name": "unet" + suffix})
    if te_params and te_lr > 0:
        groups.append({"params": list(te_params), "lr": te_lr, "name": "text_encoder"})
    return groups


def make_optimizer(name: str, groups: list[dict], weight_decay: float, device_type: str = "cpu"):
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes (or use adamw)") from e
    if name.startswith("paged_") and device_type != "cuda":
        logger.warning("%s needs CUDA; using %s on %s", name, name[len("paged_"):], device_type)
        name = name[len("paged_"):]
    classes = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "lion8bit": bnb.optim.Lion8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "paged_lion8bit": bnb.optim.PagedLion8bit,
    }
    return classes[name](groups, weight_decay=weight_decay)


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
