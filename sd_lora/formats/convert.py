"""Convert a LoRA between formats: kohya (default, for A1111/Forge/ComfyUI), diffusers, PEFT."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .diffusers_peft import save_diffusers, save_peft
from .kohya import resolve_dtype, save_lora
from .lora_file import LoraFile, LoraModule
from .read import load_lora

TARGETS = ("kohya", "diffusers", "peft")
# Header keys that describe another format's layout; they must not travel into a kohya file.
_FOREIGN_METADATA = ("lora_adapter_metadata", "format")


def convert_lora(src: str | os.PathLike, out: str | os.PathLike, to: str = "kohya", dtype="fp16", strict: bool = True) -> Path:
    """Read `src` (any format load_lora reads) and write it to `out` in format `to`.

    kohya: one .safetensors file with the source's metadata (ss_*, modelspec.*) kept and hashes redone.
    diffusers: one .safetensors file. peft: a folder with one PEFT adapter per component.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}.")
    lora = load_lora(src, strict=strict)
    torch_dtype = resolve_dtype(dtype)
    if to == "kohya":
        return save_lora(out, with_explicit_alphas(lora), {k: v for k, v in lora.metadata.items() if k not in _FOREIGN_METADATA}, dtype=torch_dtype)
    if to == "diffusers":
        if Path(out).suffix.lower() != ".safetensors":
            raise ValueError(f"{out}: a diffusers LoRA is one .safetensors file; use a name ending in .safetensors.")
        return save_diffusers(out, lora, torch_dtype)
    return save_peft(out, lora, torch_dtype)


def with_explicit_alphas(lora: LoraFile) -> LoraFile:
    """A copy whose LoRA modules all carry `.alpha` (= rank where the source had none: scale 1).

    Loaders agree that a missing alpha means scale 1, but an explicit one removes any doubt.
    """
    modules = {}
    for name, m in lora.modules.items():
        tensors = dict(m.tensors)
        if "alpha" not in tensors and m.rank is not None:
            tensors["alpha"] = torch.tensor(float(m.rank))
        modules[name] = LoraModule(name, m.kind, tensors)
    return LoraFile(modules=modules, metadata=dict(lora.metadata), format=lora.format, arch=lora.arch, path=lora.path)
