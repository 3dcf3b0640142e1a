"""Merge a weighted stack of LoRAs: into one LoRA file, or baked into a full base-model checkpoint.

Into a LoRA (`merge_loras`), per module (kohya name) of any file in the stack:
  exact (rank=None)  plain LoRA/LoCon modules are concatenated: down = [d1; d2; ...] and
                     up = [w1 s1 u1, w2 s2 u2, ...] (s = alpha/rank), alpha = the new rank (scale 1), so
                     up @ down = sum_i w_i s_i u_i d_i, the very sum the stack loader adds. A module
                     only one file has keeps its method (LoHa, LoKr, full, DoRA at weight 1) with
                     the weight folded in. Other mixes are summed densely and split by SVD, keeping
                     every singular value above 1e-6 of the largest (error reported, ~0).
  rank=R             the summed delta is split by SVD to rank R (conv_rank for 3x3 convs), and the
                     error is reported per module and overall (see tools/svd.py).
The result is a plain kohya file that A1111/ComfyUI load like any other.

Into a model (`merge_into_model`): the stack is fused with sd_lora.stack.apply_loras (the same code
generation uses, so the checkpoint equals what you saw) and the pipeline is saved as one
original-layout .safetensors file (sd_lora.convert_single_file) or as a diffusers folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import methods
from ..formats.kohya import save_lora
from ..formats.lora_file import LoraFile, LoraModule
from ..formats.metadata import build_training_metadata, data_sha256
from ..formats.read import ARCH_FAMILY, load_lora
from ..io import file_mode
from ..methods.lora import METHOD as LORA
from ..stack.spec import LoraSpec, normalize_stack
from .svd import (
    ModuleReport, ToolReport, choose_rank, dense_delta, factors_to_tensors, is_plain_lora, lora_factors,
    module_report, single_thread, split_factors, svd_of_dense, svd_of_product, weight_shape,
)

logger = logging.getLogger(__name__)

# Singular values below this fraction of the largest are numerical noise in an "exact" dense merge.
EXACT_SV_CUTOFF = 1e-6


# --------------------------------------------------------------------------------------------------
# Shared by merge / resize / extract: reading inputs and describing them in the output's metadata
# --------------------------------------------------------------------------------------------------
def read_stack(stack, strict: bool = True) -> list[tuple[LoraSpec, LoraFile]]:
    """(spec, LoraFile) for every entry of a stack, all of one architecture family."""
    specs = normalize_stack(stack)
    if not specs:
        raise ValueError("nothing to merge: pass at least one LoRA (a path, (path, weight) or LoraSpec).")
    loaded = []
    for spec in specs:
        lora = spec.path if isinstance(spec.path, LoraFile) else load_lora(spec.path, strict=strict)
        loaded.append((spec, lora))
    families = {ARCH_FAMILY[lo.arch]: sp.label for sp, lo in loaded if lo.arch}
    for sp, lo in loaded:  # files too small to tell their model still name their text encoders
        if lo.arch is None and any(n.startswith(("lora_te1_", "lora_te2_")) for n in lo.modules):
            families.setdefault("sdxl", sp.label)
        elif lo.arch is None and any(n.startswith("lora_te_") for n in lo.modules):
            families.setdefault("sd1/sd2", sp.label)
    if {"sd1", "sd2"} & set(families) and "sd1/sd2" in families:
        del families["sd1/sd2"]
    if len(families) > 1:
        raise ValueError(
            "these LoRAs are for different model families and cannot be merged: "
            + ", ".join(f"{label} ({fam})" for fam, label in families.items())
        )
    return loaded


def source_info(spec: LoraSpec, lora: LoraFile) -> dict:
    """What the output's metadata says about one input: file name, hash, weights."""
    path = None if isinstance(spec.path, LoraFile) else Path(spec.path)
    digest = lora.metadata.get("sshs_model_hash")
    if digest is None and path is not None and path.is_file() and path.suffix == ".safetensors":
        digest = data_sha256(path)
    return {
        "file": path.name if path is not None else (Path(lora.path).name if lora.path else "<in memory>"),
        "sshs_model_hash": digest or "",
        "weight": spec.unet_weight,
        "te_weight": spec.text_encoder_weight,
    }


def lora_metadata(
    arch: str | None, modules: dict[str, LoraModule], out: str | os.PathLike | None, comment: str, extra: dict[str, str],
    keep: dict[str, str] | None = None,
) -> dict[str, str]:
    """ss_* / modelspec.* metadata of a tool's output: rank and alpha as written, what it was made from.

    `keep` is the source's metadata (resize), whose training details stay true for the result.
    """
    ranks = {m.rank for m in modules.values() if m.method is LORA}
    alphas = {m.alpha for m in modules.values() if m.method is LORA}
    title = Path(out).stem if out is not None else None
    md = dict(keep or {})
    if arch is not None:
        fresh = build_training_metadata(
            arch, method=LORA.name, rank=None, alpha=None, output_name=title, training_comment=comment,
            resolution=_resolution(keep),
            # A v-prediction source (an SD1/SDXL base can be trained into it) stays labelled so.
            prediction_type="v_prediction" if (keep or {}).get("ss_v_parameterization") == "True" else None,
        )
        # The source's own training details (tag frequency, steps, ...) stay; what we changed is replaced.
        for k, v in fresh.items():
            if k not in md or k.startswith(("modelspec.", "ss_network", "ss_training_comment", "ss_output_name")):
                md[k] = v
        md["modelspec.date"] = fresh["modelspec.date"]
    else:
        md["ss_training_comment"] = comment
        if title:
            md["ss_output_name"] = title
    md["ss_network_module"] = methods.network_module_of({m.kind for m in modules.values()})
    md["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    md["ss_network_alpha"] = str(float(next(iter(alphas)))) if len(alphas) == 1 and None not in alphas else "Dynamic"
    md.pop("ss_network_args", None)  # conv_dim etc. of the source no longer describe the file
    md.update(extra)
    return md


def _resolution(md: dict[str, str] | None):
    raw = (md or {}).get("ss_resolution", "")
    try:
        nums = [int(x) for x in raw.strip("()[] ").replace(" ", "").split(",") if x]
    except ValueError:
        return None
    return tuple(nums) if len(nums) == 2 else None


def write_report(report: ToolReport, lora: LoraFile, out, dtype, started: float, bytes_before: int | None = None) -> ToolReport:
    report.lora = lora
    if out is not None:
        path = save_lora(out, lora, lora.metadata, dtype=dtype)
        report.path = str(path)
        report.bytes_after = path.stat().st_size
        report.bytes_before = bytes_before
    report.seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------------------------------
# LoRA + LoRA -> LoRA
# --------------------------------------------------------------------------------------------------
# Reading, checking and writing a LoRA are many small tensor operations: one thread is fastest
# (see tools/svd.py; on a busy 2-core machine 2 threads made a full SD1.5 resize 15x slower).
@single_thread()
def merge_loras(
    stack,
    out: str | os.PathLike | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype="fp16",
    strict: bool = True,
) -> ToolReport:
    """Combine a weighted stack of LoRA files into one LoRA and (if `out` is given) write it.

    Args:
        stack: as for `apply_loras`: paths, `(path, weight)`, `(path, unet_weight, te_weight)` or
            LoraSpec (block weights are not supported here; use `merge_into_model`).
        out: a `.safetensors` path (kohya format, written atomically); None only builds it.
        rank: None merges exactly (the ranks add up); an int splits each module by SVD to that rank.
        conv_rank: rank for 3x3 conv (LoCon) modules when `rank` is given (default: `rank`).
        dtype: "fp16" (default), "bf16" or "fp32" for the file.

    Returns a ToolReport: `.rel_error` (overall relative Frobenius error of the deltas, 0 for an exact
    merge), `.modules` (per module), `.lora` (the merged LoraFile), `.path`, `.bytes_after`.
    """
    started = time.perf_counter()
    if rank is not None and int(rank) < 1:
        raise ValueError(f"rank must be at least 1 (got {rank}); leave it out for an exact merge.")
    loaded = read_stack(stack, strict=strict)
    for spec, _ in loaded:
        if spec.block_weights:
            raise ValueError(
                f"{spec.label}: block weights cannot be merged into a LoRA (a LoRA file has one weight per module "
                "and file); bake them into a checkpoint with merge_into_model / `sd-lora merge --into-model`."
            )
    contributions: dict[str, list[tuple[LoraModule, float]]] = {}
    for spec, lora in loaded:
        for name, module in lora.modules.items():
            w = spec.unet_weight if name.startswith("lora_unet_") else spec.text_encoder_weight
            entry = contributions.setdefault(name, [])
            if w != 0:
                entry.append((module, float(w)))

    modules: dict[str, LoraModule] = {}
    report = ToolReport("merge" if rank is None else f"merge (SVD to rank {rank})")
    for name, contribs in contributions.items():
        if contribs:  # (weight 0 everywhere: the module adds nothing)
            _merge_module(name, contribs, rank, conv_rank, modules, report)
    if not modules:
        raise ValueError("nothing to merge: every LoRA in the stack has weight 0.")
    arch = next((lo.arch for _, lo in loaded if lo.arch), None)
    sources = [source_info(spec, lora) for spec, lora in loaded]
    comment = "merged from " + ", ".join(f"{s['file']} ({s['weight']:g}/{s['te_weight']:g})" for s in sources)
    if rank is not None:
        comment += f", SVD to rank {rank} (relative error {report.rel_error:.4f})"
    extra = {"sd_lora_merged_from": json.dumps(sources), "sd_lora_merge_rel_error": f"{report.rel_error:.6g}"}
    # Training details of a single source still describe the merge (a stack of one = re-weighting).
    keep = loaded[0][1].metadata if len(loaded) == 1 else None
    merged = LoraFile(modules=modules, metadata=lora_metadata(arch, modules, out, comment, extra, keep=keep),
                      format="kohya", arch=arch, path=str(out) if out else None)
    return write_report(report, merged, out, dtype, started)


def _merge_module(name, contribs, rank, conv_rank, modules: dict, report: ToolReport) -> None:
    """Merge one module's weighted contributions into `modules[name]` and report its error."""
    shape = _common_shape(name, contribs)
    conv = len(shape) == 4 and shape[2:] != (1, 1)
    target = (conv_rank or rank) if conv else rank
    old_rank = sum(m.rank or 0 for m, _ in contribs) or None
    if target is None and len(contribs) == 1 and not is_plain_lora(contribs[0][0]):
        module, w = contribs[0]
        modules[name] = _weighted_copy(module, w)
        norm = 0.0 if module.needs_base else float(dense_delta(module, w).norm())
        report.modules.append(ModuleReport(name, module.rank, module.rank or 0, 1.0, 0.0, norm))
        return
    if all(is_plain_lora(m) for m, _ in contribs):
        ups, downs = zip(*(lora_factors(m, w) for m, w in contribs))
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        if target is None:  # exact: the concatenated factors are the weighted sum
            modules[name] = LoraModule(name, LORA.name, factors_to_tensors(up, down, shape, alpha=down.shape[0]))
            s = svd_of_product(up, down)[1]
            report.modules.append(module_report(name, s, len(s), old_rank))
            return
        u, s, vh = svd_of_product(up, down)
    else:
        total = sum(dense_delta(m, w) for m, w in contribs)
        u, s, vh = svd_of_dense(total)
    if target is None:
        keep = max(1, int((s > s[0] * EXACT_SV_CUTOFF).sum())) if s[0] > 0 else 1
    else:
        keep = choose_rank(s, target)
    up, down = split_factors(u, s, vh, keep)
    modules[name] = LoraModule(name, LORA.name, factors_to_tensors(up, down, shape, alpha=keep))
    report.modules.append(module_report(name, s, keep, old_rank))


def _common_shape(name: str, contribs: list[tuple[LoraModule, float]]) -> tuple[int, ...]:
    """The weight shape all contributions to a module agree on (a 4-D form wins over a flat one)."""
    shapes = [weight_shape(m) for m, _ in contribs]
    best = max(shapes, key=len)
    numel = torch.Size(best).numel()
    for s in shapes:
        if s[0] != best[0] or torch.Size(s).numel() != numel:
            raise ValueError(
                f"{name}: the LoRAs disagree on this layer's shape ({', '.join(map(str, sorted(set(shapes))))}); "
                "they were made for different models."
            )
    return best


def _weighted_copy(module: LoraModule, w: float) -> LoraModule:
    """The same module with its delta multiplied by `w` (every method's delta is linear in one tensor)."""
    t = dict(module.tensors)
    if w == 1.0:
        return LoraModule(module.name, module.kind, t)
    if module.has_dora:
        raise ValueError(
            f"{module.name}: a DoRA module at weight {w:g} cannot be written as a LoRA (its effect is not linear in "
            "the weight). Use weight 1, or merge into a checkpoint with `sd-lora merge --into-model`."
        )
    return LoraModule(module.name, module.kind, module.method.scaled(t, w))


# --------------------------------------------------------------------------------------------------
# Base model + LoRAs -> checkpoint
# --------------------------------------------------------------------------------------------------
def merge_into_model(
    base,
    stack,
    out: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    config_from: str | os.PathLike | None = None,
) -> Path:
    """Bake a weighted LoRA stack into a base model and save it as a new checkpoint.

    Args:
        base: a base model path (diffusers folder or single file, read with `load_base`) or a loaded
            pipeline (its weights are restored after saving).
        stack: as for `apply_loras` (block weights allowed).
        out: `NAME.safetensors` for one original-layout file (A1111 / ComfyUI / Forge), anything else
            (an existing empty folder or a new name) for a diffusers folder.
        dtype: "fp16" / "bf16" / "fp32" (or a torch dtype) for the file; None keeps the weights' dtype.

    The deltas are the stack loader's own (`sd_lora.stack.apply_loras`), so the checkpoint generates
    exactly what the applied stack does. Returns the written path.
    """
    from ..formats.kohya import resolve_dtype
    from ..models import load_base
    from ..stack import loras

    out = Path(out)
    torch_dtype = resolve_dtype(dtype)
    single_file = out.suffix.lower() == ".safetensors"
    if not single_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists; write the diffusers folder to a new (or empty) folder, or end the name in .safetensors for one file.")
    own = isinstance(base, (str, os.PathLike))
    pipe = load_base(base, config_from=config_from) if own else base
    with loras(pipe, stack, strict=strict) as applied:
        sources = [source_info(spec, lora) for spec, lora in zip(applied.specs, applied.files)]
        metadata = {
            "sd_lora_merged_loras": json.dumps(sources),
            "modelspec.title": out.stem,
            "modelspec.description": "merged with sd-lora: " + ", ".join(f"{s['file']}:{s['weight']:g}" for s in sources),
        }
        if single_file:
            from ..convert_single_file import save_single_file

            save_single_file(pipe, out, dtype=torch_dtype, metadata=metadata)
        else:
            _save_folder_atomic(pipe, out, torch_dtype, own, metadata)
    logger.info("wrote %s (%d LoRA(s) merged into %d weights)", out, len(sources), applied.modules)
    return out


def _save_folder_atomic(pipe, out: Path, dtype, own: bool, metadata: dict[str, str]) -> None:
    """`save_pretrained` into a temporary folder next to `out`, then one rename: whole or nothing."""
    if dtype is not None:
        if not own:
            raise ValueError("dtype= with a diffusers folder output needs a base path (the pipeline passed in is not cast).")
        pipe.to(dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sd_lora_merge.json").write_text(json.dumps({k: v for k, v in metadata.items()}, indent=2))
        # mkdtemp makes a 0700 folder and safetensors 0600 files: give the model open()/mkdir()'s modes.
        for item in [tmp, *tmp.rglob("*")]:
            os.chmod(item, file_mode(directory=item.is_dir()))
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
