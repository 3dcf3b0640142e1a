"""LoHa (LyCORIS): delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank (Hadamard product of two LoRAs).

Keys `hada_w1_a` (out, r), `hada_w1_b` (r, in*kh*kw), `hada_w2_a`, `hada_w2_b`, and for Tucker convs
cores `hada_t1` / `hada_t2` (r, r, kh, kw) with a (r, out) and b (r, in). PEFT's LoHa layer uses the
same names. The scale is applied once, as A1111 and ComfyUI do (LyCORIS 4.1.3's merge applies it
twice; DESIGN.md section 8).
"""

from __future__ import annotations

from .base import Method, numel, same_name_keys
from .lora import copy_into

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def _factor(t, a: str, b: str, core: str):
    import torch

    if core in t:  # Tucker: core (r, r, kh, kw) with a (r, out) and b (r, in)
        return torch.einsum("i j k l, j r, i p -> p r k l", t[core], t[b].flatten(1), t[a].flatten(1))
    return t[a].flatten(1) @ t[b].flatten(1)


class LohaMethod(Method):
    name = kind = "loha"
    suffixes = KEYS
    peft_keys = same_name_keys(KEYS)
    algo = "loha"

    def is_complete(self, t):
        return all(k in t for k in KEYS[:4])

    def rank(self, t):
        return int(t["hada_w1_b"].shape[0])

    def delta(self, t, shape, base=None):
        d = _factor(t, "hada_w1_a", "hada_w1_b", "hada_t1") * _factor(t, "hada_w2_a", "hada_w2_b", "hada_t2")
        return d.reshape(shape) * self.scale(t)

    def delta_shape(self, t):
        if "hada_t1" in t:
            out, inp = t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]
            return int(out), int(out) * int(inp) * numel(t["hada_t1"].shape[2:])
        return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_a"].shape[0]) * int(t["hada_w1_b"].shape[1])

    def weight_shape(self, t):
        if "hada_t1" in t:
            return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *map(int, t["hada_t1"].shape[2:]))
        return None

    def in_features(self, t):
        return None if "hada_t1" in t else int(t["hada_w1_b"].shape[1])

    def scaled(self, t, w):
        return {**t, "hada_w1_a": t["hada_w1_a"].float() * w}

    def random_tensors(self, shape, rank, generator):
        import torch

        out, flat = shape[0], numel(shape[1:])
        return {f"hada_w{i}_{ab}": torch.randn(*((out, rank) if ab == "a" else (rank, flat)), generator=generator) * 0.3
                for i in (1, 2) for ab in ("a", "b")}

    # ---- training ---------------------------------------------------------------------------
    def peft_config(self, config, common, total_steps):
        from peft import LoHaConfig

        return LoHaConfig(r=config.rank, alpha=config.alpha, rank_dropout=config.rank_dropout,
                          module_dropout=config.module_dropout, init_weights=True, **common)

    def export(self, layer, adapter):
        import torch

        t = {k: getattr(layer, k)[adapter] for k in KEYS if adapter in getattr(layer, k)}
        t["alpha"] = torch.tensor(float(layer.alpha[adapter]))
        return t

    def load(self, layer, adapter, t):
        for k in KEYS:
            if adapter in getattr(layer, k):
                copy_into(getattr(layer, k)[adapter], t[k])

    def file_params(self, target, rank, config=None):
        return 2 * rank * (target.in_features * target.kernel_numel + target.out_features) + 1


METHOD = LohaMethod()
