"""Full / diff (LyCORIS `full`): the module stores its whole delta, `diff` (and `diff_b` for the bias).

Read and applied, never trained here (a full fine-tune is not an adapter).
"""

from __future__ import annotations

from .base import Method, numel


class FullMethod(Method):
    name = kind = "full"
    suffixes = ("diff", "diff_b")
    algo = "full"

    def is_complete(self, t):
        return "diff" in t

    def delta(self, t, shape, base=None):
        return t["diff"].reshape(shape) * self.scale(t)

    def delta_shape(self, t):
        return int(t["diff"].shape[0]), numel(t["diff"].shape)

    def weight_shape(self, t):
        return tuple(int(s) for s in t["diff"].shape)

    def scaled(self, t, w):
        out = {**t, "diff": t["diff"].float() * w}
        if "diff_b" in t:
            out["diff_b"] = t["diff_b"].float() * w
        return out

    def bias_delta(self, t):
        b = t.get("diff_b")
        return None if b is None else b.float()

    def random_tensors(self, shape, rank, generator):
        import torch

        return {"diff": torch.randn(*shape, generator=generator) * 0.01}


METHOD = FullMethod()
