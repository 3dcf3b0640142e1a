"""Write LoRA files in kohya format: the one A1111 / Forge / ComfyUI / Civitai load.

One `.safetensors` file; keys `<kohya module name>.<suffix>`, the suffixes those of the module's
method (sd_lora.methods: LoRA / LoCon lora_down.weight, lora_up.weight, alpha (+ dora_scale for DoRA);
LoHa hada_*; LoKr lokr_*; ...).
Module names: lora_unet_..., lora_te_text_model_... (SD1/SD2), lora_te1_/lora_te2_ (SDXL, whose
UNet names use the SGM layout like kohya's). All metadata values are strings.

Files are written atomically, NaN/inf weights are refused (a broken file would load silently and
produce black or noise images), and the header is written in a canonical order, so saving the same
weights and metadata twice gives byte-identical files (safetensors alone orders metadata randomly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import methods
from ..io import atomic_path
from ..methods import dora
from .lora_file import LoraFile, is_finite
from .metadata import compute_sshs_hashes

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KNOWN_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class NonFiniteWeightsError(ValueError):
    """The adapter has NaN or inf values: saving it would make a file that breaks every image."""


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("float16", "fp16").replace("bfloat16", "bf16").replace("float32", "fp32")
    if key not in SAVE_DTYPES:
        raise ValueError(f"save dtype {dtype!r} is not supported; use fp16 (default), bf16 or fp32.")
    return SAVE_DTYPES[key]


def lora_file_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    """A LoraFile's modules as flat kohya keys."""
    return {f"{name}.{suffix}": t for name, module in lora.modules.items() for suffix, t in module.tensors.items()}


def _check_keys(sd: dict[str, torch.Tensor]) -> None:
    suffixes = methods.file_suffixes()
    bad = [k for k in sd if not k.startswith(KNOWN_PREFIXES) or not any(k.endswith("." + s) for s in suffixes)]
    if bad:
        raise ValueError(
            f"{len(bad)} keys are not kohya LoRA keys (first: {', '.join(bad[:3])}); expected "
            "lora_unet_*/lora_te*_ names ending in .lora_down.weight / .lora_up.weight / .alpha (or LyCORIS names). "
            "Convert other formats with sd_lora.formats.read.load_lora first."
        )


def _check_finite(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not is_finite(v)]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to save: {len(bad)} tensors contain NaN or inf (first: {', '.join(bad[:3])}). The training "
            "diverged; lower the learning rate, use fp32/bf16 mixed precision, or resume from an earlier checkpoint."
        )
    if dtype is not None and dtype != torch.float32:
        limit = torch.finfo(dtype).max
        big = [k for k, v in sd.items() if v.is_floating_point() and v.abs().max().item() > limit]
        if big:
            raise NonFiniteWeightsError(
                f"refusing to save: {len(big)} tensors exceed the range of {str(dtype).replace('torch.', '')} and would "
                f"become inf (first: {big[0]}). Save with dtype='bf16' or 'fp32'."
            )


def save_lora(
    path: str | os.PathLike,
    network_or_state_dict,
    metadata: dict[str, str] | None = None,
    dtype=torch.float16,
) -> Path:
    """Write a kohya-format LoRA `.safetensors` file atomically and return its path.

    network_or_state_dict: a LoraNetwork (sd_lora.network.inject), a LoraFile, or a dict of kohya keys.
    metadata: string -> string (see formats.metadata.build_training_metadata); `sshs_model_hash` and
        `sshs_legacy_hash` are (re)computed here. For a LoraFile, its own metadata is used if None.
    dtype: torch.float16 (default), torch.bfloat16, torch.float32 or "fp16"/"bf16"/"fp32"; None keeps
        each tensor's dtype.
    """
    dtype = resolve_dtype(dtype)
    if isinstance(network_or_state_dict, LoraFile):
        sd = lora_file_state_dict(network_or_state_dict)
        if metadata is None:
            metadata = dict(network_or_state_dict.metadata)
    elif hasattr(network_or_state_dict, "kohya_state_dict"):
        sd = network_or_state_dict.kohya_state_dict()
        if metadata is None:
            metadata = _network_metadata(network_or_state_dict)
    elif isinstance(network_or_state_dict, dict):
        sd = network_or_state_dict
    else:
        raise TypeError(f"save_lora needs a LoraNetwork, LoraFile or dict of tensors, not {type(network_or_state_dict).__name__}")
    if not sd:
        raise ValueError("nothing to save: the LoRA has no tensors.")
    _check_keys(sd)
    metadata = dict(metadata or {})
    non_str = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if non_str:
        raise TypeError(
            f"metadata values must be strings (not for {', '.join(map(str, non_str[:3]))}); build them with "
            "sd_lora.formats.metadata.build_training_metadata or convert with str()."
        )
    _check_finite(sd, dtype)
    dora.warn_output_axis(path, sd)
    tensors = {
        k: (v.detach().to("cpu") if dtype is None or not v.is_floating_point() else v.detach().to("cpu", dtype)).contiguous()
        for k, v in sd.items()
    }
    metadata.pop("sshs_model_hash", None)
    metadata.pop("sshs_legacy_hash", None)
    model_hash, legacy_hash = compute_sshs_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors; use a name ending in .safetensors.")
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonicalize_header(tmp)
    return path


def _network_metadata(network) -> dict[str, str]:
    """Minimal metadata for a network saved without any: what A1111/ComfyUI need to show it."""
    from ..models import architecture_of
    from .metadata import build_training_metadata

    pipe = getattr(network, "pipe", None)
    prediction = architecture_of(pipe).prediction_type if pipe is not None else None
    return build_training_metadata(arch=network.arch, prediction_type=prediction, **network.metadata_fields())


def _canonicalize_header(path: Path) -> None:
    """Rewrite the safetensors JSON header in sorted key order (same length, same data offsets).

    The safetensors library serialises the metadata map in a random order per process; sorting it
    makes identical content give identical bytes (reproducible files and hashes of whole files).
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {}
        if meta is not None:
            ordered["__metadata__"] = dict(sorted(meta.items()))
        for key in sorted(header):
            info = header[key]
            ordered[key] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": info["data_offsets"]}
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > n:  # cannot happen for the same content; never corrupt the file if it does
            return
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))
