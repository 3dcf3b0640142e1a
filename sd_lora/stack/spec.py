"""What a stack is: a list of LoRA files, each with a UNet weight, a text-encoder weight and optional
block weights. `LoraSpec` is the explicit form; tuples and plain paths are accepted as shorthands.

Order of numbers: our API and CLI put the UNet weight first (`(file, unet_w, te_w)`,
`--lora FILE:W:TE_W`) because most users only set one weight and mean the whole LoRA; A1111's
prompt tag puts the text encoder first (`<lora:NAME:TE_W:UNET_W>`) and prompt.py follows A1111 there.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..formats.lora_file import LoraFile

# Block names of hako-mikan's sd-webui-lora-block-weight extension (the de-facto standard). BASE is
# the text encoder(s); INnn / M00 / OUTnn are the SGM UNet blocks input_blocks.n / middle_block /
# output_blocks.n. A list of weights is read by its length, as the extension does.
BLOCK_IDS_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCK_IDS_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
BLOCK_IDS_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]  # SDXL, all
BLOCK_IDS_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]  # SDXL
BLOCK_LISTS = {26: BLOCK_IDS_26, 17: BLOCK_IDS_17, 20: BLOCK_IDS_20, 12: BLOCK_IDS_12}
_BLOCK_NAME = re.compile(r"^(BASE|IN\d\d|M00|MID|OUT\d\d)$")


@dataclass(frozen=True)
class LoraSpec:
    """One entry of a LoRA stack.

    path: a LoRA file (.safetensors; any format `load_lora` reads) or an already loaded `LoraFile`.
    weight: multiplier for the UNet part (negative values invert the LoRA's effect).
    te_weight: multiplier for the text encoder part(s); None means "same as weight".
    block_weights: optional per-block multipliers on top of `weight`, as in A1111's LoRA Block Weight
        extension: a dict {"BASE": 0, "IN04": 0.5, "M00": 1, "OUT03": 0.2, ...} (blocks not named keep
        1.0), or a list of 17 (SD1/SD2), 12 (SDXL), 20 (SDXL, all blocks) or 26 (SD1/SD2, all
        blocks) numbers in the extension's order. BASE multiplies the text-encoder weight.
    """

    path: str | os.PathLike | LoraFile
    weight: float = 1.0
    te_weight: float | None = None
    block_weights: dict[str, float] | tuple[float, ...] | list[float] | None = None

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

    def block_multipliers(self) -> dict[str, float]:
        """The block weights as {block id: multiplier} ("MID" is spelled "M00")."""
        bw = self.block_weights
        if bw is None:
            return {}
        if isinstance(bw, dict):
            out = {}
            for k, v in bw.items():
                key = str(k).upper().replace("MID", "M00")
                if not _BLOCK_NAME.match(key):
                    raise ValueError(
                        f"{self.label}: unknown block {k!r} in block_weights; use BASE, IN00..IN11, M00 (or MID), OUT00..OUT11."
                    )
                out[key] = float(v)
            return out
        values = [float(v) for v in bw]
        if len(values) not in BLOCK_LISTS:
            raise ValueError(
                f"{self.label}: block_weights has {len(values)} numbers; the LoRA Block Weight lists have "
                "17 or 26 (SD1/SD2) or 12 or 20 (SDXL) numbers. Or pass a dict such as {'IN04': 0.5}."
            )
        return dict(zip(BLOCK_LISTS[len(values)], values))


def as_spec(item) -> LoraSpec:
    """Normalise one stack entry: LoraSpec, path, LoraFile, (path, w) or (path, w, te_w)."""
    if isinstance(item, LoraSpec):
        spec = item
    elif isinstance(item, (str, os.PathLike, LoraFile)):
        spec = LoraSpec(item)
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
        spec = LoraSpec(*item)
    else:
        raise TypeError(
            f"a stack entry must be a LoraSpec, a path, or a tuple (path, unet_weight[, te_weight]); got {item!r}"
        )
    for name, value in (("weight", spec.weight), ("te_weight", spec.te_weight)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{spec.label}: {name} must be a finite number, not {value!r}")
    if not isinstance(spec.path, LoraFile):
        spec = LoraSpec(Path(spec.path), spec.weight, spec.te_weight, spec.block_weights)
    spec.block_multipliers()  # validate now, before anything is touched
    return spec


def normalize_stack(stack) -> list[LoraSpec]:
    if stack is None:
        return []
    if isinstance(stack, (str, os.PathLike, LoraFile, LoraSpec)):
        stack = [stack]
    return [as_spec(item) for item in stack]


def unet_block_id(sgm_path: str) -> str | None:
    """Block id (IN04, M00, OUT11) of a UNet module from its SGM path, None for modules outside blocks."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", sgm_path)
    if not m:
        return None
    if m[1] == "middle_block":
        return "M00"
    return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
