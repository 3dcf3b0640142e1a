"""What a stack is: a list of LoRA files, each with a UNet weight, a text-encoder weight and optional
block weights. `LoraSpec` is the explicit form; tuples and plain paths are accepted as shorthands.

Order of numbers: our API and CLI put the UNet weight first (`(file, unet_w, te_w)`,
`--lora FILE:W:TE_W`) because most users only set one weight and mean the whole LoRA; A1111's
prompt tag puts the text encoder first (`<lora:NAME:TE_W:UNET_W>`) and prompt.py follows A1111 there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..formats.lora_file import LoraFile
from .block_weights import block_multipliers, normalize_block_weights

@dataclass(frozen=True)
class LoraSpec:
    """One entry of a LoRA stack.

    path: a LoRA file (.safetensors; any format `load_lora` reads) or an already loaded `LoraFile`.
    weight: multiplier for the UNet part (negative values invert the LoRA's effect).
    te_weight: multiplier for the text encoder part(s); None means "same as weight".
    block_weights: optional per-block multipliers on top of `weight`, as in A1111's LoRA Block Weight
        extension (sd_lora/stack/block_weights.py, docs/stack.md): its `lbw=` text (a preset name such
        as "OUTD", or "1,0,0,..."), a list of 17 (SD1/SD2), 12 (SDXL), 20 (SDXL, all blocks) or 26
        (SD1/SD2, all blocks) numbers in the extension's order (blocks it does not list get 0, as
        there), or a dict {"BASE": 0, "IN04": 0.5, "M00": 1, "OUT": 0.2, ...} (blocks not named keep
        1). BASE multiplies the text-encoder weight.
    """

    path: str | os.PathLike | LoraFile
    weight: float = 1.0
    te_weight: float | None = None
    block_weights: str | dict[str, float] | tuple[float, ...] | list[float] | None = None

    @property
    def unet_weight(self) -> float:
        return float(self.weight)

    @property
    def text_encoder_weight(self) -> float:
        base = float(self.weight if self.te_weight is None else self.te_weight)
        return base * self.block_multipliers().get("BASE", 1.0)

    @property
    def label(self) -> str:
        if isinstance(self.path, LoraFile):
            return self.path.path or "<in-memory LoRA>"
        return str(self.path)

    def block_multipliers(self, arch: str | None = None) -> dict[str, float]:
        """The block weights as {block id: multiplier} (blocks not in it keep 1); with `arch`, a
        vector must have that architecture's length."""
        return block_multipliers(self.block_weights, arch, where=f"{self.label}: block weights")


def as_spec(item) -> LoraSpec:
    """Normalise one stack entry: LoraSpec, path, LoraFile, (path, w), (path, w, te_w) or
    (path, w, te_w, block_weights). Block weights given as text come out in their canonical spelling."""
    if isinstance(item, LoraSpec):
        spec = item
    elif isinstance(item, (str, os.PathLike, LoraFile)):
        spec = LoraSpec(item)
    elif isinstance(item, (tuple, list)) and (1 <= len(item) <= 3 or (
            len(item) == 4 and isinstance(item[3], (str, dict, list, tuple, type(None))))):
        spec = LoraSpec(*item)
    else:
        raise TypeError(
            f"a stack entry must be a LoraSpec, a path, or a tuple (path, unet_weight[, te_weight[, block_weights]]) "
            f"with block weights as text, a list or a dict; got {item!r}"
        )
    for name, value in (("weight", spec.weight), ("te_weight", spec.te_weight)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{spec.label}: {name} must be a finite number, not {value!r}")
    bw = spec.block_weights
    if isinstance(bw, str):
        bw = normalize_block_weights(bw, where=f"{spec.label}: block weights")
    spec = LoraSpec(spec.path if isinstance(spec.path, LoraFile) else Path(spec.path), spec.weight, spec.te_weight, bw)
    spec.block_multipliers()  # validate now, before anything is touched
    return spec


def normalize_stack(stack) -> list[LoraSpec]:
    if stack is None:
        return []
    if isinstance(stack, (str, os.PathLike, LoraFile, LoraSpec)):
        stack = [stack]
    return [as_spec(item) for item in stack]

