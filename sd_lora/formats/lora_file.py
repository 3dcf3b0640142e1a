"""The one in-memory form every LoRA file is read into.

A `LoraFile` maps kohya module names (`lora_unet_...`, `lora_te_text_model_...`) to `LoraModule`s.
Each module keeps the factors exactly as stored (low rank, small) and computes its dense delta W in
fp32 only when asked, so a cache of many files stays small. What the tensors mean (rank, scale,
delta formula, shape) is the module's method's business: see sd_lora.methods (one module per method).
A `dora_scale` on any module renormalises its delta to the stored magnitude (methods/dora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import methods
from ..methods.dora import weight_decompose


def is_finite(tensor: torch.Tensor) -> bool:
    """True if a floating-point tensor holds no NaN or inf.

    One min/max reduction (NaN and inf both surface in it) instead of `isfinite(t).all()`, which
    allocates a bool tensor the tensor's size: ~10x faster, and every file read checks every tensor.
    """
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass
class LoraModule:
    """One adapted base module. `tensors` are keyed by their suffix in the file (e.g. "lora_down.weight");
    `kind` names the method that reads them (sd_lora.methods.method_names())."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def method(self):
        return methods.get(self.kind)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().item())

    @property
    def rank(self) -> int | None:
        return self.method.rank(self.tensors)

    @property
    def scale(self) -> float:
        """alpha / rank, as kohya and A1111 apply it (1.0 when the file has no alpha)."""
        return self.method.scale(self.tensors)

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def needs_base(self) -> bool:
        """The delta depends on the base weight (DoRA, OFT): computed at apply time, never summed into a LoRA."""
        return self.has_dora or self.method.needs_base

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def delta_shape(self) -> tuple[int, int | None]:
        """(out_features, numel) of the delta, from the factor shapes (numel None: fits any input size)."""
        return self.method.delta_shape(self.tensors)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) as 2-D fp32 when the delta is exactly up @ down * scale (plain LoRA/LoCon), else None."""
        return None if self.has_dora else self.method.factors(self.tensors)

    def delta(self, shape: torch.Size | tuple[int, ...], base_weight: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """The dense delta W (fp32) to add to the base weight of `shape`.

        `base_weight` is required where the delta depends on it (DoRA, OFT).
        """
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.needs_base and base_weight is None:
            raise ValueError(f"{self.name}: this {'DoRA' if self.has_dora else self.kind.upper()} module needs the base weight to compute its delta")
        base = base_weight.to(device=device, dtype=torch.float32).reshape(shape) if self.needs_base else None
        d = self.method.delta(t, tuple(shape), base)
        if self.has_dora:
            d = weight_decompose(base, d, t["dora_scale"])
        return d

    def bias_delta(self) -> torch.Tensor | None:
        return self.method.bias_delta(self.tensors)


@dataclass
class LoraFile:
    """A LoRA file read into memory: modules by kohya name, plus the file's metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # "kohya", "lycoris", "diffusers", "peft"
    arch: str | None = None  # "sd1", "sd2", "sdxl" when known (from metadata or key shapes)
    path: str | None = None

    def num_bytes(self) -> int:
        return sum(m.num_bytes() for m in self.modules.values())

    @property
    def trigger_words(self) -> list[str]:
        """The words to type to call this LoRA up (instance tokens, then frequent short tags), from its
        `ss_tag_frequency` metadata: sd_lora.formats.metadata.trigger_words decides them."""
        from .metadata import trigger_words

        return trigger_words(self.metadata)
