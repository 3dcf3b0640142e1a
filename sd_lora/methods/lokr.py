"""LoKr (LyCORIS): delta = kron(w1, w2) * alpha / rank, each factor full or a low-rank product.

Keys `lokr_w1` or `lokr_w1_a` @ `lokr_w1_b`; `lokr_w2` or `lokr_w2_a` @ `lokr_w2_b`, with a Tucker
core `lokr_t2` (r, r, kh, kw) for convs. The rank is that of the factorised factor; with both factors
full there is no rank and LyCORIS / ComfyUI apply no scale, while PEFT still scales by alpha / r: the
scale is folded into `lokr_w2` on the way out of PEFT and back out on the way in.
"""

from __future__ import annotations

from .base import Method, numel, same_name_keys
from .lora import copy_into

KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _both_full(t) -> bool:
    return "lokr_w1_b" not in t and "lokr_w2_b" not in t


class LokrMethod(Method):
    name = kind = "lokr"
    suffixes = KEYS
    peft_keys = same_name_keys(KEYS)
    algo = "lokr"

    def is_complete(self, t):
        return ("lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)) and (
            "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t))

    def rank(self, t):
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in t:
                return int(t[k].shape[0])
        return None

    def scale(self, t):
        return 1.0 if _both_full(t) else super().scale(t)  # LyCORIS: an unfactorised LoKr has no rank to scale by

    def _w2_shape(self, t):
        if "lokr_w2" in t:
            return tuple(t["lokr_w2"].shape)
        if "lokr_t2" in t:
            return (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        return (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])

    def _w1_shape(self, t):
        return tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])

    def delta(self, t, shape, base=None):
        import torch

        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2).reshape(shape) * self.scale(t)

    def delta_shape(self, t):
        w1, w2 = self._w1_shape(t), self._w2_shape(t)
        return int(w1[0]) * int(w2[0]), numel(w1) * numel(w2)

    def weight_shape(self, t):
        if "lokr_t2" in t or ("lokr_w2" in t and t["lokr_w2"].dim() == 4):
            w1, w2 = self._w1_shape(t), self._w2_shape(t)
            return (int(w1[0] * w2[0]), int(w1[1] * w2[1]), *map(int, w2[2:]))
        return None

    def scaled(self, t, w):
        key = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        return {**t, key: t[key].float() * w}

    def from_peft(self, t, alpha, r):
        if self.rank(t) is None and r:
            # PEFT scales a LoKr with both factors full by alpha / r; LyCORIS does not: fold it in.
            t["lokr_w2"] = t["lokr_w2"].float() * (float(alpha) / float(r))
            return t
        return super().from_peft(t, alpha, r)

    def random_tensors(self, shape, rank, generator):
        import torch

        # kron((2, 2), (out/2, flat/2)), the second factor low rank.
        out, flat = shape[0], numel(shape[1:])
        return {"lokr_w1": torch.randn(2, 2, generator=generator),
                "lokr_w2_a": torch.randn(out // 2, rank, generator=generator) * 0.3,
                "lokr_w2_b": torch.randn(rank, flat // 2, generator=generator) * 0.3}

    # ---- training ---------------------------------------------------------------------------
    def peft_config(self, config, common, total_steps):
        from peft import LoKrConfig

        return LoKrConfig(r=config.rank, alpha=config.alpha, rank_dropout=config.rank_dropout,
                          module_dropout=config.module_dropout, init_weights=True, **common)

    def export(self, layer, adapter):
        import torch

        t = {k: getattr(layer, k)[adapter] for k in KEYS if adapter in getattr(layer, k)}
        if _both_full(t):
            t["lokr_w2"] = t["lokr_w2"] * float(layer.scaling[adapter])
        t["alpha"] = torch.tensor(float(layer.alpha[adapter]))
        return t

    def load(self, layer, adapter, t):
        full = adapter not in layer.lokr_w1_b and adapter not in layer.lokr_w2_b
        for k in KEYS:
            if adapter in getattr(layer, k):
                factor = 1.0 / float(layer.scaling[adapter]) if full and k == "lokr_w2" else 1.0
                copy_into(getattr(layer, k)[adapter], t[k], factor)


METHOD = LokrMethod()
