"""The one in-memory form every LoRA file is read into, and the delta-W math for each method.

A `LoraFile` maps kohya module names (`lora_unet_...`, `lora_te_text_model_...`) to `LoraModule`s.
Each module keeps the factors exactly as stored (low rank, small) and computes its dense delta W in
fp32 only when asked, so a cache of many files stays small.

Formulas follow LyCORIS / kohya / ComfyUI, which define what these files mean:
  LoRA / LoCon: delta = up @ down * alpha / rank               (conv: flattened, reshaped to kernel)
  LoHa:         delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank  (Tucker: t1/t2 cores)
  LoKr:         delta = kron(w1, w2) * alpha / rank              (w1, w2 full or factorised; t2 core)
  full / diff:  delta = diff
  DoRA:         W' = m * (W + delta) / ||W + delta||  ->  delta_dora = W' - W (needs the base W)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KIND_LORA = "lora"
KIND_LOHA = "loha"
KIND_LOKR = "lokr"
KIND_FULL = "full"


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
    """One adapted base module. `tensors` are keyed by their suffix in the file (e.g. "lora_down.weight")."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().item())

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == KIND_LORA:
            return int(t["lora_down.weight"].shape[0])
        if self.kind == KIND_LOHA:
            return int(t["hada_w1_b"].shape[0])
        if self.kind == KIND_LOKR:
            for k in ("lokr_w1_b", "lokr_w2_b"):
                if k in t:
                    return int(t[k].shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank, as kohya and A1111 apply it (1.0 when the file has no alpha)."""
        rank, alpha = self.rank, self.alpha
        if rank is None:
            return 1.0
        if self.kind == KIND_LOKR and "lokr_w1_b" not in self.tensors and "lokr_w2_b" not in self.tensors:
            return 1.0  # LyCORIS: an unfactorised LoKr has no rank to scale by
        return 1.0 if alpha is None else alpha / rank

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def delta(self, shape: torch.Size | tuple[int, ...], base_weight: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """The dense delta W (fp32) to add to the base weight of `shape`.

        `base_weight` is required for DoRA modules (their delta depends on W).
        """
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == KIND_LORA:
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            d = up.flatten(1) @ down.flatten(1)
            if "lora_mid.weight" in t:  # LoCon with a CP-decomposed 3x3 core
                mid = t["lora_mid.weight"]
                d = torch.einsum("i j k l, j r, p i -> p r k l", mid, down.flatten(1), up.flatten(1))
        elif self.kind == KIND_LOHA:
            w1 = _factor(t, "hada_w1_a", "hada_w1_b", "hada_t1")
            w2 = _factor(t, "hada_w2_a", "hada_w2_b", "hada_t2")
            d = w1 * w2
        elif self.kind == KIND_LOKR:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            d = torch.kron(w1, w2)
        elif self.kind == KIND_FULL:
            d = t["diff"]
        else:
            raise ValueError(f"{self.name}: unknown module kind {self.kind!r}")
        d = d.reshape(shape) * self.scale
        if self.kind == KIND_FULL and "diff_b" in t:
            pass  # bias deltas are returned by bias_delta()
        if self.has_dora:
            if base_weight is None:
                raise ValueError(f"{self.name}: a DoRA module needs the base weight to compute its delta")
            d = _dora_delta(base_weight.to(device=device, dtype=torch.float32), d, t["dora_scale"])
        return d

    def bias_delta(self) -> torch.Tensor | None:
        b = self.tensors.get("diff_b")
        return None if b is None else b.float()


def _factor(t: dict[str, torch.Tensor], a: str, b: str, core: str) -> torch.Tensor:
    if core in t:  # Tucker: core (r, r, kh, kw) with a (out, r) and b (r, in)
        return torch.einsum("i j k l, j r, i p -> p r k l", t[core], t[b].flatten(1), t[a].flatten(1))
    return t[a].flatten(1) @ t[b].flatten(1)


def _dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA as ComfyUI/LyCORIS apply `dora_scale`: renormalise W + delta to the stored magnitude.

    The magnitude is per output channel when its first dimension equals out_features (PEFT and kohya
    DoRA), otherwise per input channel (older LyCORIS files).
    """
    merged = weight + delta
    if magnitude.shape[0] == merged.shape[0] and magnitude.numel() == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    else:
        norm = (
            merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        )
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


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
        """Most frequent tags from kohya's `ss_tag_frequency` metadata, the usual trigger words first."""
        import json

        raw = self.metadata.get("ss_tag_frequency")
        if not raw:
            return []
        try:
            freq = json.loads(raw)
        except json.JSONDecodeError:
            return []
        counts: dict[str, int] = {}
        for tags in freq.values() if isinstance(freq, dict) else []:
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
        return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:10]
