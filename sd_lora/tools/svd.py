"""The SVD arithmetic shared by merge, resize and extract, and the error report they all give.

Every tool ends the same way: a dense (or low-rank) delta W per module is split into a rank-r
product `up @ down`, and the user is told how much of the delta was lost. The loss is measured in the
Frobenius norm, which the singular values give for free:

    ||D - D_r||_F^2 = sum of the discarded S_i^2        kept energy = sum kept S_i^2 / sum S_i^2

so "relative error" = ||D - D_r||_F / ||D||_F = sqrt(1 - kept energy), per module and over the whole
file (discarded and total energies summed over modules). kohya's resize_lora.py prints
`fro retained` = sqrt(kept energy); we report both.

A LoRA's delta is already a low-rank product `U @ V` (rank k, often 4..128) of a large matrix
(up to 5120 x 1280 in SD1.5). Its SVD does not need the dense matrix: with U = Qu Ru and
V^T = Qv Rv (thin QR), U V = Qu (Ru Rv^T) Qv^T, and the SVD of the small k x k core gives the rest.
That costs O((out + in) k^2) instead of O(out * in * min(out, in)), which is what makes resizing a
full SD1.5 file take seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# Singular values below this are zero (kohya's MIN_SV): an all-zero module keeps rank 1.
MIN_SV = 1e-6


# LAPACK's SVD of a small matrix gains nothing from threads, and on a busy CPU every OpenMP barrier
# waits for a time slice: measured 4 ms single-threaded vs 38 ms with 2 threads for 64 x 576 on a
# loaded 2-core machine. Small SVDs therefore run on one thread (the setting is restored after);
# large dense ones (extract) keep the caller's threads, which pay off on an idle many-core CPU.
_SMALL_SVD = 512 * 512


@contextlib.contextmanager
def _threads_for(numel: int):
    """One thread while working on a matrix of `numel` <= _SMALL_SVD elements (0: always one)."""
    before = torch.get_num_threads()
    if numel > _SMALL_SVD or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    """Run a block of many small tensor operations on one thread (merge / resize loops: see above)."""
    return _threads_for(0)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of `up @ down` (2-D, fp32) without forming the product. len(S) <= inner rank."""
    up, down = up.float(), down.float()
    # Tall-skinny QRs and a k x k SVD: one thread is as fast or faster (10240 x 32 QR: 5 ms on one
    # thread, 210 ms on two threads of a busy 2-core machine).
    with _threads_for(0):
        qu, ru = torch.linalg.qr(up)  # (out, p), (p, k)
        qv, rv = torch.linalg.qr(down.T)  # (in, q), (q, k)
        u, s, vh = torch.linalg.svd(ru @ rv.T, full_matrices=False)
        return qu @ u, s, vh @ qv.T


def svd_of_dense(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a dense 2-D delta (fp32)."""
    with _threads_for(delta.numel()):
        return torch.linalg.svd(delta.float(), full_matrices=False)


def choose_rank(s: torch.Tensor, max_rank: int | None, dynamic: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep, with kohya resize_lora.py's rules.

    Fixed: `max_rank`. Dynamic (`max_rank` then only caps the result; None = no cap):
      sv_ratio       keep S_i > S_0 / param                  (param >= 1, e.g. 2..10)
      sv_fro         smallest r with sqrt(sum_{i<r} S_i^2 / sum S^2) >= param   (0 < param <= 1)
      sv_cumulative  smallest r with sum_{i<r} S_i / sum S >= param              (0 < param <= 1)
    An all-zero delta keeps rank 1 (a file must have at least one row per module).
    """
    n = int(s.numel())
    if n == 0:
        return 1
    if dynamic is None:
        if max_rank is None:
            raise ValueError("choose a rank (rank=R) or a dynamic method (sv_ratio, sv_fro, sv_cumulative) with its param")
        r = int(max_rank)
    else:
        if dynamic not in DYNAMIC_METHODS:
            raise ValueError(f"unknown dynamic method {dynamic!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
        if param is None:
            raise ValueError(f"dynamic method {dynamic} needs a parameter (--param X)")
        s = s.float()
        if dynamic == "sv_ratio":
            r = int((s > s[0] / param).sum().item())
        elif dynamic == "sv_fro":
            sq = s.pow(2)
            r = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(float(param) ** 2)).item()) + 1
        else:
            r = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param))).item()) + 1
        if max_rank is not None:
            r = min(r, int(max_rank))
    if s[0] <= MIN_SV:
        r = 1
    return max(1, min(r, n))


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the best rank-`rank` approximation, with sqrt(S) on each side.

    Balanced factors (rather than kohya's S all in `up`) keep both tensors in the same range, which
    matters once they are stored in fp16 and when the file is trained further.
    """
    root = s[:rank].clamp_min(0).sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if rank > s.numel():  # an all-zero module padded to rank 1
        up = torch.zeros(u.shape[0], rank)
        down = torch.zeros(rank, vh.shape[1])
    return up.contiguous(), down.contiguous()


@dataclass
class ModuleReport:
    """What one module lost: ranks before/after and the Frobenius error of its delta."""

    name: str
    old_rank: int | None
    new_rank: int
    kept_energy: float  # sum kept S^2 / sum S^2 (1.0 = nothing lost)
    rel_error: float  # ||D - D_r||_F / ||D||_F = sqrt(1 - kept_energy)
    norm: float  # ||D||_F (weights and alpha/rank scale included)

    @property
    def fro_retained(self) -> float:
        """kohya's `fro retained`: sqrt(kept energy)."""
        return math.sqrt(max(self.kept_energy, 0.0))


def module_report(name: str, s: torch.Tensor, rank: int, old_rank: int | None, scale: float = 1.0) -> ModuleReport:
    """Report for keeping `rank` of singular values `s` of a delta (multiplied by `scale` when applied)."""
    sq = s.double().pow(2)
    total = float(sq.sum())
    kept = float(sq[:rank].sum())
    energy = 1.0 if total <= 0 else min(kept / total, 1.0)
    return ModuleReport(name, old_rank, int(rank), energy, math.sqrt(max(1.0 - energy, 0.0)), abs(scale) * math.sqrt(total))


@dataclass
class ToolReport:
    """The outcome of merge / resize / extract: per-module errors, the overall error and file sizes."""

    operation: str
    modules: list[ModuleReport] = field(default_factory=list)
    path: str | None = None
    bytes_before: int | None = None  # input file size (resize), or None
    bytes_after: int | None = None  # written file size
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    untargeted: float | None = None  # extract: share of the weight difference outside the targeted weights
    lora: object = field(default=None, repr=False)  # the LoraFile written (merge / resize / extract)

    @property
    def rel_error(self) -> float:
        """Overall ||D - D_r||_F / ||D||_F over every module's delta together."""
        total = sum(m.norm ** 2 for m in self.modules)
        lost = sum((m.norm * m.rel_error) ** 2 for m in self.modules)
        return 0.0 if total <= 0 else math.sqrt(lost / total)

    @property
    def kept_energy(self) -> float:
        return 1.0 - self.rel_error ** 2

    @property
    def max_module_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        keys = ("operation", "path", "bytes_before", "bytes_after", "seconds", "notes", "untargeted")
        d = {k: getattr(self, k) for k in keys}  # not asdict(self): it would deep-copy the LoraFile
        d.update(rel_error=self.rel_error, kept_energy=self.kept_energy, max_module_error=self.max_module_error)
        d["modules"] = [asdict(m) | {"fro_retained": m.fro_retained} for m in self.modules]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self, per_module: bool = False) -> str:
        lines = []
        if per_module:
            width = max((len(m.name) for m in self.modules), default=10)
            for m in self.modules:
                old = "?" if m.old_rank is None else str(m.old_rank)
                lines.append(
                    f"{m.name:{width}}  rank {old:>4} -> {m.new_rank:<4}  kept energy {m.kept_energy:8.3%}  "
                    f"rel. error {m.rel_error:.4f}"
                )
        ranks = sorted({m.new_rank for m in self.modules})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}" if ranks else "-"
        lines.append(
            f"{self.operation}: {len(self.modules)} modules, rank {rank_text}, relative delta error "
            f"{self.rel_error:.4f} overall (worst module {self.max_module_error:.4f}), kept energy {self.kept_energy:.3%}"
        )
        if self.bytes_after is not None:
            size = f"{self.bytes_after / 1e6:.2f} MB"
            if self.bytes_before:
                size = f"{self.bytes_before / 1e6:.2f} MB -> {size} ({self.bytes_after / self.bytes_before:.0%})"
            lines.append(f"wrote {self.path} ({size})" + (f" in {self.seconds:.1f} s" if self.seconds is not None else ""))
        lines += self.notes
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# A LoRA module as a matrix: the shape of the weight it changes, and its delta as factors or dense
# --------------------------------------------------------------------------------------------------
# SD's 3x3 convolutions (ResNet convs, down/upsamplers, conv_in/out) in diffusers and SGM names.
# Only needed for LyCORIS modules that store a conv kernel flattened (LoHa / factorised LoKr
# without a Tucker core), whose kernel size the file itself does not say.
_CONV3X3_NAME = ("conv1", "conv2", "_conv", "_op", "conv_in", "conv_out", "in_layers_2", "out_layers_3")


def is_plain_lora(module) -> bool:
    """A module whose delta is exactly up @ down * scale (plain LoRA/LoCon: no CP core, no DoRA)."""
    return module.factors() is not None


def weight_shape(module) -> tuple[int, ...]:
    """The shape of the base weight `module` changes, from its tensors alone."""
    if module.method.needs_base:  # (OFT: the tensors give the output rows only)
        _refuse_base_dependent(module)
    shape = module.method.weight_shape(module.tensors)
    if shape is not None:
        return shape
    out, numel = module.delta_shape()
    flat = numel // out
    if module.name.endswith(_CONV3X3_NAME) and flat % 9 == 0:
        return (out, flat // 9, 3, 3)
    return (out, flat)


def lora_factors(module, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) as fp32 2-D matrices with the module's alpha/rank scale and `weight` folded into up."""
    up, down = module.factors()
    return up * (module.scale * weight), down


def dense_delta(module, weight: float = 1.0) -> torch.Tensor:
    """The module's delta (scale and `weight` included) as a fp32 2-D matrix (out, in * kh * kw)."""
    if module.needs_base:
        _refuse_base_dependent(module)
    shape = weight_shape(module)
    return module.delta(shape).reshape(shape[0], -1) * weight


def _refuse_base_dependent(module) -> None:
    what = "DoRA" if module.has_dora else module.kind.upper()
    raise ValueError(
        f"{module.name}: the delta of this {what} module depends on the base weights, so it cannot be combined into a "
        "LoRA without them. Merge it into a checkpoint instead (sd-lora merge --into-model BASE ...)."
    )


def factors_to_tensors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], alpha: float) -> dict[str, torch.Tensor]:
    """kohya tensors of a LoRA/LoCon module for a weight of `shape` (conv: 4-D down, 1x1 up)."""
    from ..methods.lora import METHOD as LORA

    return LORA.tensors_from_factors(up, down, shape, alpha)
