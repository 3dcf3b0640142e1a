"""Extract a LoRA from the difference of two checkpoints (kohya's extract_lora_from_models.py).

For every targeted Linear / Conv2d of the UNet and text encoder(s), D = W_tuned - W_base is split
by SVD into up @ down of rank r (conv_rank for 3x3 convs) with alpha = r (scale 1). What the LoRA
cannot carry is reported:
  * the SVD error of each module and overall (relative Frobenius error, tools/svd.py), and
  * the part of the fine-tune outside the targeted weights (biases, norms, embeddings, untargeted
    layers, the VAE is never compared): `untargeted` = ||diff there|| / ||whole diff||.

Targets: "kohya" (default; the `kohya` preset: every Linear / 1x1 conv in the UNet's transformer
blocks, text-encoder attention + MLP, what most shared LoRAs contain) or "all" (every Linear and
Conv2d, including ResNet 3x3 convs as LoCon).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from ..formats.lora_file import LoraFile, LoraModule
from ..methods.lora import METHOD as LORA
from ..models import architecture_of
from .merge import lora_metadata, write_report
from .svd import ToolReport, choose_rank, factors_to_tensors, module_report, split_factors, svd_of_dense

logger = logging.getLogger(__name__)

TARGET_SETS = ("kohya", "all")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def extract_lora(
    base,
    tuned,
    out: str | os.PathLike | None = None,
    rank: int = 16,
    conv_rank: int | None = None,
    targets: str = "kohya",
    text_encoder: bool = True,
    min_diff: float = 1e-5,
    dynamic: str | None = None,
    param: float | None = None,
    dtype="fp16",
    config_from: str | os.PathLike | None = None,
) -> ToolReport:
    """A LoRA approximating `tuned - base`, written to `out` (kohya format) when given.

    Args:
        base, tuned: model paths (diffusers folder or single file, read with `load_base`) or loaded
            pipelines of the same architecture.
        rank / conv_rank: the LoRA's rank (conv_rank for 3x3 convs with targets="all"; default rank).
        targets: "kohya" (transformer blocks + text-encoder attention/MLP) or "all" (every Linear/Conv2d).
        text_encoder: False leaves the text encoder(s) out.
        min_diff: modules whose largest absolute weight change is at most this are left out (an
            unchanged text encoder, fp16 rounding noise).
        dynamic / param: optional per-module rank choice as in `resize_lora` (rank is then the cap).

    Returns a ToolReport (`.rel_error`, `.modules`, `.notes` with the untargeted share, `.lora`).
    """
    from ..models import load_base

    started = time.perf_counter()
    if targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_SETS)} (got {targets!r}).")
    if int(rank) < 1:
        raise ValueError(f"rank must be at least 1 (got {rank}).")
    pipe_a = load_base(base, config_from=config_from) if isinstance(base, (str, os.PathLike)) else base
    pipe_b = load_base(tuned, config_from=config_from) if isinstance(tuned, (str, os.PathLike)) else tuned
    arch = architecture_of(pipe_a).arch
    arch_b = architecture_of(pipe_b).arch
    if arch != arch_b:
        raise ValueError(f"the base is {arch} but the tuned model is {arch_b}; extract needs two models of the same architecture.")

    report = ToolReport(f"extract (rank {rank}, {targets} targets)")
    modules: dict[str, LoraModule] = {}
    covered_sq = 0.0
    skipped = 0
    with torch.no_grad():
        for component, path, name, module_a in _targets(pipe_a, arch, targets, text_encoder):
            module_b = getattr(pipe_b, component).get_submodule(path)
            wa, wb = module_a.weight, module_b.weight
            if tuple(wa.shape) != tuple(wb.shape):
                raise ValueError(f"{component}.{path}: weight shapes differ ({tuple(wa.shape)} vs {tuple(wb.shape)}); the models are not the same architecture.")
            delta = wb.detach().float() - wa.detach().float()
            if delta.abs().max().item() <= min_diff:
                skipped += 1
                continue
            covered_sq += float(delta.pow(2).sum())
            shape = tuple(delta.shape)
            conv = len(shape) == 4 and shape[2:] != (1, 1)
            limit = (conv_rank or rank) if conv else rank
            u, s, vh = svd_of_dense(delta.reshape(shape[0], -1))
            new = choose_rank(s, limit, dynamic, param)
            up, down = split_factors(u, s, vh, new)
            modules[name] = LoraModule(name, LORA.name, factors_to_tensors(up, down, shape, alpha=new))
            report.modules.append(module_report(name, s, new, None))
        total_sq = _total_diff_sq(pipe_a, pipe_b, text_encoder)

    if not modules:
        raise ValueError(
            f"the two models do not differ in any targeted weight (largest change <= min_diff={min_diff}); "
            "check that --tuned is the fine-tuned model, or lower --min-diff."
        )
    untargeted = math.sqrt(max(total_sq - covered_sq, 0.0) / total_sq) if total_sq > 0 else 0.0
    report.notes.append(
        f"{len(modules)} modules extracted, {skipped} unchanged modules left out; the part of the fine-tune outside "
        f"the targeted weights (biases, norms, other layers) is {untargeted:.2%} of the whole difference"
    )
    if not text_encoder:
        report.notes.append("text encoder(s) left out (--no-text-encoder)")
    base_name = _name(base)
    comment = f"extracted from {_name(tuned)} - {base_name} with sd-lora ({targets} targets, relative error {report.rel_error:.4f})"
    extra = {
        "ss_sd_model_name": base_name,
        "sd_lora_extracted_from": _name(tuned),
        "sd_lora_extract_rel_error": f"{report.rel_error:.6g}",
        "sd_lora_extract_untargeted": f"{untargeted:.6g}",
    }
    lora = LoraFile(modules=modules, metadata=lora_metadata(arch, modules, out, comment, extra), format="kohya", arch=arch,
                    path=str(out) if out else None)
    report.untargeted = untargeted
    return write_report(report, lora, out, dtype, started)


def _name(model) -> str:
    return os.path.basename(os.fspath(model).rstrip("/")) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _targets(pipe, arch: str, targets: str, text_encoder: bool):
    """(component, path, kohya name, module) of every weight to extract, each once."""
    import torch.nn as nn

    from ..network.naming import module_index
    from ..network.presets import select_targets

    if targets == "kohya":
        for t in select_targets(pipe, arch, "kohya", train_unet=True, train_text_encoder=text_encoder):
            yield t.component, t.path, t.kohya_name, t.module
        return
    seen = set()
    for name, (component, path, module) in module_index(pipe, arch).items():
        if (component, path) in seen or (component != "unet" and not text_encoder):
            continue  # module_index lists UNet modules under two names; the first is the canonical one
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        seen.add((component, path))
        yield component, path, name, module


def _total_diff_sq(pipe_a, pipe_b, text_encoder: bool) -> float:
    """||W_tuned - W_base||^2 over every parameter of the UNet and (optionally) the text encoder(s)."""
    total = 0.0
    for component in COMPONENTS:
        if component != "unet" and not text_encoder:
            continue
        a, b = getattr(pipe_a, component, None), getattr(pipe_b, component, None)
        if a is None or b is None:
            continue
        params_b = dict(b.named_parameters())
        for key, pa in a.named_parameters():
            pb = params_b.get(key)
            if pb is not None and pb.shape == pa.shape:
                total += float((pb.detach().float() - pa.detach().float()).pow(2).sum())
    return total
