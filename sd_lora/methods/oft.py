"""OFT (orthogonal fine-tuning; kohya `networks.oft`, LyCORIS `diag-oft`): read and applied, not trained.

The module rotates the base weight's output rows block by block instead of adding a low-rank term:

  oft_blocks  B (k, n, n), k * n = out       Q = B - B^T (skew), R = (I + Q)(I - Q)^-1 (Cayley)
  oft_diag    R (k, n, n) stored directly    (LyCORIS 2.x files, Nov 2023)
  alpha       the constraint: if alpha > 0, Q is scaled down to norm alpha * out when larger
  rescale     optional (out, 1[, 1, 1]) multiplier of the rotated rows (LyCORIS `rescaled=True`)

  W'_k = R_k^T W_k  (block k: rows k*n .. k*n + n - 1),   W' = rescale * W',   delta = W' - W

so the delta depends on the base weight (`needs_base`): it is computed from the backup at apply time
and cannot be summed into a LoRA (merge it into a checkpoint instead). At weight s the stack adds
s * delta, i.e. it interpolates W -> W', as A1111 and LyCORIS do.

Sources (the formulas agree on R and on W'_k = R_k^T W_k; einsum "k n m, k n ... -> k m ..."):
  LyCORIS lycoris/modules/diag_oft.py @ f49d30d6 (get_r, make_weight): constraint = alpha * out_dim,
      no constraint for alpha <= 0, rescale applied to the rotated weight.
  kohya sd-scripts networks/oft.py (what writes `oft_blocks` + alpha): the same constraint alpha * out_dim.
  A1111 extensions-builtin/Lora/network_oft.py @ 3772a82a (calc_updown): reads oft_blocks and oft_diag;
      constraint alpha * out_dim, but clamps ||Q|| to it even for alpha = 0 (so an unconstrained file
      does nothing there); ignores `rescale`.
  ComfyUI comfy/weight_adapter/oft.py @ a125cd84 (calc_weight): reads oft_blocks only; uses alpha
      itself, not alpha * out_dim, as the constraint; multiplies by the strength twice (s^2 at s != 1);
      loads `rescale` but does not apply it.
We follow LyCORIS (the reference implementation, and kohya's writer agrees): alpha * out, alpha <= 0
unconstrained, rescale applied, linear in the strength. At strength 1 with an unconstrained or inactive
constraint and no rescale, all four give the same weight.
"""

from __future__ import annotations

from .base import Method

BLOCKS, DIAG, RESCALE = "oft_blocks", "oft_diag", "rescale"


def rotation(t, out: int):
    """The (k, n, n) block rotations R of a module whose weight has `out` rows."""
    import torch

    if DIAG in t:
        return t[DIAG]
    blocks = t[BLOCKS]
    q = blocks - blocks.transpose(1, 2)
    a = t.get("alpha")
    constraint = float(a.float().item()) * out if a is not None else 0.0
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        q = torch.where(norm > constraint, q * (constraint / norm), q)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


class OftMethod(Method):
    name = kind = "oft"
    suffixes = (BLOCKS, DIAG, RESCALE)
    name_prefixes = {"oft_unet_": "lora_unet_"}  # kohya's networks/oft.py (UNet only)
    algo = "diag-oft"
    needs_base = True

    def _blocks(self, t):
        return t[DIAG] if DIAG in t else t[BLOCKS]

    def is_complete(self, t):
        return (BLOCKS in t and t[BLOCKS].dim() == 3) or DIAG in t

    def delta(self, t, shape, base=None):
        import torch

        if base is None:
            raise ValueError("an OFT module needs the base weight to compute its delta")
        out = shape[0]
        r = rotation(t, out)
        k, n, _ = r.shape
        w = base.reshape(shape)
        rotated = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(k, n, *w.shape[1:])).reshape(w.shape)
        if RESCALE in t:
            rotated = t[RESCALE].reshape(out, *[1] * (w.dim() - 1)) * rotated
        return rotated - w

    def delta_shape(self, t):
        b = self._blocks(t)
        return int(b.shape[0]) * int(b.shape[1]), None

    def check(self, t):
        b = self._blocks(t)
        if b.dim() != 3 or b.shape[1] != b.shape[2]:
            raise ValueError(f"OFT blocks must be (blocks, n, n), got {tuple(b.shape)}")
        out = int(b.shape[0]) * int(b.shape[1])
        if RESCALE in t and t[RESCALE].numel() != out:
            raise ValueError(f"rescale has {t[RESCALE].numel()} values for {out} output rows")
        return (out, None)

    def fits(self, t, shape):
        return self.delta_shape(t)[0] == shape[0]

    def scaled(self, t, w):
        if w == 1.0:
            return dict(t)
        raise ValueError("an OFT module rotates the base weight: at a weight other than 1 it cannot be written "
                         "as a file; merge it into a checkpoint instead (sd-lora merge --into-model).")

    def random_tensors(self, shape, rank, generator):
        import torch

        k = rank if shape[0] % rank == 0 else 1
        n = shape[0] // k
        return {BLOCKS: torch.randn(k, n, n, generator=generator) * 0.05, "alpha": torch.tensor(0.0)}


METHOD = OftMethod()
