"""Resize a LoRA to a lower rank by SVD, per module (what kohya's networks/resize_lora.py does).

For a plain LoRA/LoCon module the delta up @ down is split again by SVD (from the factors, never
the dense matrix: see tools/svd.py) and the best rank-r part is kept. Like kohya, the module keeps
its scale: alpha_new = (alpha / rank) * r, so `ss_network_alpha` keeps its meaning and a DoRA
module's magnitude (`dora_scale`) still applies to the same direction. Other methods (LoHa, LoKr,
CP-LoCon, full) are expanded to their dense delta and become plain LoRA modules of rank r.

Rank choice per module, as in kohya:
  rank=R                 every module to R (3x3 convs to conv_rank, default R); a module already
                         at or below R is copied unchanged
  dynamic="sv_ratio"     keep singular values > largest / param
  dynamic="sv_fro"       keep the fewest giving sqrt(kept energy) >= param (e.g. 0.9)
  dynamic="sv_cumulative" keep the fewest whose sum >= param of the sum of all
With a dynamic method, `rank` (if given) is the most any module may keep.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..formats.lora_file import LoraFile, LoraModule
from ..formats.metadata import data_sha256
from ..formats.read import load_lora
from ..methods.lora import METHOD as LORA
from .merge import lora_metadata, write_report
from .svd import (
    DYNAMIC_METHODS, ModuleReport, ToolReport, choose_rank, dense_delta, factors_to_tensors, module_report,
    single_thread, split_factors, svd_of_dense, svd_of_product, weight_shape,
)

logger = logging.getLogger(__name__)


# Reading, checking and writing a LoRA are many small tensor operations: one thread is fastest
# (see tools/svd.py; on a busy 2-core machine 2 threads made a full SD1.5 resize 15x slower).
@single_thread()
def resize_lora(
    lora,
    out: str | os.PathLike | None = None,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    conv_rank: int | None = None,
    dtype="fp16",
    strict: bool = True,
) -> ToolReport:
    """Reduce a LoRA's rank by SVD and (if `out` is given) write the result atomically.

    Args:
        lora: a LoRA file path (any format `load_lora` reads) or a LoraFile.
        out: the `.safetensors` to write (kohya format); None only computes it.
        rank: the new rank (or, with `dynamic`, the largest allowed).
        dynamic / param: "sv_ratio" | "sv_fro" | "sv_cumulative" and its target (kohya semantics).
        conv_rank: rank for 3x3 conv modules (default: `rank`).
        dtype: "fp16" (default), "bf16" or "fp32".

    Returns a ToolReport: per-module kept energy and relative error, the overall error, the file
    size before and after (`.bytes_before`, `.bytes_after`), `.lora` (the resized LoraFile).
    """
    started = time.perf_counter()
    if rank is None and dynamic is None:
        raise ValueError("resize needs a new rank (rank=R / --rank R) or a dynamic method (--dynamic sv_fro --param 0.9).")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"rank must be at least 1 (got {rank}).")
    if dynamic is not None:
        if dynamic not in DYNAMIC_METHODS:
            raise ValueError(f"unknown dynamic method {dynamic!r}; choose one of {', '.join(DYNAMIC_METHODS)}.")
        if param is None:
            raise ValueError(f"--dynamic {dynamic} needs --param X (sv_ratio: e.g. 4; sv_fro / sv_cumulative: e.g. 0.9).")
        _check_param(dynamic, param)
    source = lora if isinstance(lora, LoraFile) else load_lora(lora, strict=strict)
    src_path = None if isinstance(lora, LoraFile) else Path(lora)
    bytes_before = src_path.stat().st_size if src_path is not None and src_path.is_file() else None

    report = ToolReport("resize" + (f" ({dynamic} {param:g})" if dynamic else ""))
    modules: dict[str, LoraModule] = {}
    converted: list[str] = []
    for name, module in source.modules.items():
        new_module, module_rep = _resize_module(module, rank, dynamic, param, conv_rank)
        modules[name] = new_module
        report.modules.append(module_rep)
        if module.method.factors(module.tensors) is None:  # (DoRA modules stay LoRA + dora_scale)
            converted.append(f"{name} ({module.kind})")
    if converted:
        report.notes.append(f"{len(converted)} LyCORIS/CP modules became plain LoRA modules: {', '.join(converted[:3])}"
                            + (" ..." if len(converted) > 3 else ""))
    old_ranks = sorted({m.old_rank for m in report.modules if m.old_rank})
    how = f"{dynamic} {param:g}" + (f" (max rank {rank})" if rank else "") if dynamic else f"rank {rank}"
    comment = f"resized from rank {'/'.join(map(str, old_ranks)) or '?'} by {how} with sd-lora (relative error {report.rel_error:.4f})"
    old_comment = source.metadata.get("ss_training_comment")
    if old_comment:
        comment += "; " + old_comment
    name = src_path.name if src_path else Path(source.path or "<in memory>").name
    extra = {
        "sd_lora_resized_from": name,
        "sd_lora_resized_from_hash": _source_hash(source, src_path),
        "sd_lora_resize_rel_error": f"{report.rel_error:.6g}",
    }
    metadata = lora_metadata(source.arch, modules, out, comment, extra, keep=source.metadata)
    resized = LoraFile(modules=modules, metadata=metadata, format="kohya", arch=source.arch, path=str(out) if out else None)
    return write_report(report, resized, out, dtype, started, bytes_before)


def _resize_module(module: LoraModule, rank, dynamic, param, conv_rank) -> tuple[LoraModule, ModuleReport]:
    name = module.name
    shape = weight_shape(module)
    conv = len(shape) == 4 and shape[2:] != (1, 1)
    limit = (conv_rank or rank) if conv else rank
    old_rank = module.rank
    factors = module.method.factors(module.tensors)  # (of the LoRA part: a DoRA magnitude is kept below)
    if factors is not None:
        # kohya: SVD of up @ down without the scale; alpha follows the rank, so the scale stays.
        scale = module.scale
        u, s, vh = svd_of_product(*factors)
        new = choose_rank(s, limit, dynamic, param)
        if dynamic is None and old_rank is not None and old_rank <= new:
            # nothing to reduce: the module is copied as it is
            return LoraModule(name, module.kind, dict(module.tensors)), module_report(name, s, len(s), old_rank, scale)
        new_up, new_down = split_factors(u, s, vh, new)
        tensors = factors_to_tensors(new_up, new_down, shape, alpha=scale * new)
        if module.has_dora:
            tensors["dora_scale"] = module.tensors["dora_scale"]
        return LoraModule(name, LORA.name, tensors), module_report(name, s, new, old_rank, scale)
    u, s, vh = svd_of_dense(dense_delta(module))  # LoHa / LoKr / CP-LoCon / full -> LoRA
    new = choose_rank(s, limit if limit is not None else old_rank, dynamic, param)
    new_up, new_down = split_factors(u, s, vh, new)
    return LoraModule(name, LORA.name, factors_to_tensors(new_up, new_down, shape, alpha=new)), module_report(name, s, new, old_rank)


def _source_hash(source: LoraFile, path: Path | None) -> str:
    digest = source.metadata.get("sshs_model_hash")
    if not digest and path is not None and path.is_file() and path.suffix == ".safetensors":
        digest = data_sha256(path)
    return digest or ""


def _check_param(dynamic: str, param: float) -> None:
    if dynamic == "sv_ratio" and not param >= 1:
        raise ValueError(f"sv_ratio keeps singular values above largest / param: param must be >= 1 (got {param}).")
    if dynamic in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise ValueError(f"{dynamic} is a fraction of the delta to keep: param must be in (0, 1] (got {param}).")
