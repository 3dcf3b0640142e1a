"""Read any common LoRA file into a LoraFile, and match a LoraFile against a pipeline.

Formats read (detected from the keys, never from the file name):
  kohya      lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* with lora_down/lora_up/alpha (LoRA, LoCon,
             DoRA dora_scale); UNet names in diffusers (down_blocks) or SAI/CompVis (input_blocks) layout
  lycoris    the same prefixes with hada_* (LoHa, Tucker t1/t2), lokr_* (LoKr, t2), diff (full),
             oft_blocks / oft_diag (OFT; kohya's oft_unet_ names too): the suffixes of sd_lora.methods
  diffusers  unet.<path>.lora_A.weight / .lora.down.weight / .lora_linear_layer.down.weight /
             .processor.to_q_lora.down.weight, text_encoder[_2].<path>...; alphas from diffusers'
             `lora_adapter_metadata` header or `.alpha` keys
  peft       base_model.model.<path>.lora_A.weight (PeftModel.save_pretrained / get_peft_model_state_dict),
             LoHa/LoKr parameter names; r / alpha / patterns from adapter_config.json next to the file

Every module is renamed to its kohya name (`lora_unet_...`, `lora_te_text_model_...`), so one resolver,
sd_lora.network.naming.module_index(pipe, arch), serves all formats. Keys that belong to no known
format are an error (strict=True) or a warning that lists them; they are never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

from .. import methods
from ..io import CheckpointError, read_state_dict
from ..methods import dora
from ..methods.base import KOHYA_NETWORK, SHARED_SUFFIXES
from ..models import ARCH_DESCRIPTIONS, ARCH_SD1, ARCH_SD2, ARCH_SD2_V, ARCH_SDXL, architecture_of
from ..network.naming import kohya_module_name, module_index
from .kohya import KNOWN_PREFIXES
from .lora_file import LoraFile, LoraModule, is_finite

logger = logging.getLogger(__name__)

ARCH_FAMILY = {ARCH_SD1: "sd1", ARCH_SD2: "sd2", ARCH_SD2_V: "sd2", ARCH_SDXL: "sdxl"}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
_UNET_HEADS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding", "conv_norm_out")
# Real SDXL UNet layout (for SGM names of modules read from diffusers/PEFT files).
_SDXL_LAYOUT = {"layers_per_block": 2, "up_attention": (True, True, False)}
# Text-embedding width (= cross-attention key/value input) -> architecture.
_CONTEXT_WIDTH = {768: ARCH_SD1, 1024: ARCH_SD2, 2048: ARCH_SDXL}


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or does not fit the pipeline; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# Key parsing
# --------------------------------------------------------------------------------------------------
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _split_kohya_key(key: str) -> tuple[str, str] | None:
    for old, new in methods.name_prefixes().items():
        if key.startswith(old):
            key = new + key[len(old):]
    if not key.startswith(KNOWN_PREFIXES):
        return None
    for suffix in methods.file_suffixes():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _split_other_key(key: str) -> tuple[str | None, str, str] | None:
    """(component or None, module path, our suffix) for a diffusers / PEFT key, or None."""
    component = None
    rest = key
    for prefix, comp in (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                         ("base_model.model.", None), ("model.", None)):
        if rest.startswith(prefix):
            component, rest = comp, rest[len(prefix):]
            break
    rest = rest.replace("base_model.model.", "")
    m = _PROCESSOR.match(rest)
    if m:
        attn = m[2] if m[2] != "to_out" else "to_out.0"
        return component, f"{m[1]}.{attn}", f"lora_{m[3]}.weight"
    for pattern, suffix in methods.peft_keys():
        m = pattern.search(rest)
        if m:
            return component, rest[: m.start()], suffix or m[1]
    return None


def _module(name: str, tensors: dict[str, torch.Tensor]) -> LoraModule:
    return LoraModule(name, methods.for_keys(tensors).name, tensors)


# --------------------------------------------------------------------------------------------------
# Architecture detection
# --------------------------------------------------------------------------------------------------
def arch_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return ARCH_SDXL
    if version.startswith("sd_v2") or spec.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        v = metadata.get("ss_v_parameterization") == "True" or spec.startswith("stable-diffusion-v2-768-v")
        return ARCH_SD2_V if v else ARCH_SD2
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return ARCH_SD1
    return None


def arch_from_modules(modules: dict[str, LoraModule]) -> str | None:
    """SD1 / SD2 / SDXL from module names and shapes alone (None if the file does not say)."""
    names = modules.keys()
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return ARCH_SDXL
    for name, module in modules.items():
        in_features = _in_features(module)
        if in_features is None:
            continue
        if re.search(r"attn2_to_[kv]$", name):  # cross-attention width = text embedding width
            return _CONTEXT_WIDTH.get(in_features)
    for name, module in modules.items():
        if name.startswith("lora_te_") and re.search(r"self_attn_q_proj$", name):
            # (lora_te_ is SD1/SD2: SDXL names its encoders te1/te2), so the same widths tell them apart
            return _CONTEXT_WIDTH.get(_in_features(module))
    return None


def _in_features(module: LoraModule) -> int | None:
    """The base layer's input width, where the module's (complete) tensors show it."""
    if not module.method.is_complete(module.tensors):
        return None
    return module.method.in_features(module.tensors)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
COMPONENT_DIRS = ("unet", "text_encoder", "text_encoder_2")


def _find_weights_files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, component hint) pairs: a file, a folder with one, or a PEFT folder per component."""
    if not path.is_dir():
        return [(path, None)]
    per_component = [
        (path / c / "adapter_model.safetensors", c) for c in COMPONENT_DIRS if (path / c / "adapter_model.safetensors").is_file()
    ]
    if per_component:
        return per_component
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        if (path / name).is_file():
            return [(path / name, None)]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return [(found[0], None)]
    raise LoraFormatError(
        f"{path}: folder has {len(found)} .safetensors files; pass the LoRA file itself."
        if found else f"{path}: no LoRA .safetensors file in this folder."
    )


def _peft_alpha_config(path: Path, metadata: dict[str, str]) -> dict[str | None, dict]:
    """r / alpha / patterns per component from diffusers' header metadata or PEFT's adapter_config.json."""
    configs: dict[str | None, dict] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError:
            flat = {}
        if not isinstance(flat, dict):
            flat = {}
        for key, value in flat.items():
            comp, _, field = key.partition(".")
            if field:
                configs.setdefault(comp, {})[field] = value
            else:  # a single model's PEFT config written without component prefixes
                configs.setdefault(None, {})[key] = value
    cfg_file = path.parent / "adapter_config.json"
    if cfg_file.is_file():
        try:
            configs[None] = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LoraFormatError(f"{cfg_file}: cannot read the PEFT adapter config: {e}") from e
    return configs


def _pattern_value(patterns: dict, path: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def load_lora(path: str | os.PathLike, strict: bool = True) -> LoraFile:
    """Read a kohya / LyCORIS / diffusers / PEFT LoRA file (or a folder holding one) into a LoraFile.

    strict=True raises on keys that belong to no known format; strict=False logs them as a warning.
    A PEFT folder may hold one sub-folder per component (unet/, text_encoder/, text_encoder_2/), each
    with adapter_model.safetensors + adapter_config.json, as `sd-lora convert --to peft` writes.

    Every problem with the file raises LoraFormatError (or CheckpointError for a damaged
    .safetensors container) naming the file.
    """
    try:
        return _load_lora(Path(path), strict)
    except ValueError:  # LoraFormatError, CheckpointError: already say what is wrong
        if isinstance(sys.exc_info()[1], (LoraFormatError, CheckpointError)):
            raise
        raise _damaged(path, sys.exc_info()[1]) from sys.exc_info()[1]
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        # A hostile or damaged file reached code that trusts shapes/metadata: one clear error instead.
        raise _damaged(path, e) from e


def _damaged(path, e: BaseException) -> LoraFormatError:
    return LoraFormatError(f"{path}: damaged or unsupported LoRA file ({type(e).__name__}: {e}).")


def _load_lora(root: Path, strict: bool) -> LoraFile:
    files = _find_weights_files(root)
    kohya_parts: dict[str, dict[str, torch.Tensor]] = {}
    resolved: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    unknown: list[str] = []
    metadata: dict[str, str] = {}
    fmt = "kohya"
    for file, hint in files:
        sd, file_metadata = read_state_dict(file)
        metadata.update(file_metadata)
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        other_parts: dict[tuple[str | None, str], dict[str, torch.Tensor]] = {}
        for key, tensor in sd.items():
            split = _split_kohya_key(key)
            if split:
                kohya_parts.setdefault(split[0], {})[split[1]] = tensor
                continue
            other = _split_other_key(key)
            if other:
                other_parts.setdefault((other[0] or hint, other[1]), {})[other[2]] = tensor
                continue
            unknown.append(key)
        if not other_parts:
            continue
        fmt = "peft" if (hint or any(comp is None for comp, _ in other_parts)) else "diffusers"
        configs = _peft_alpha_config(file, file_metadata)
        for (comp, module_path), tensors in other_parts.items():
            comp = comp or _component_of(module_path, tensors)
            if comp is None:
                unknown += [f"{module_path}.{s}" for s in tensors]
                continue
            cfg = configs.get(comp) or configs.get(None) or {}
            tensors = dict(tensors)
            method = methods.for_keys(tensors)
            if "alpha" not in tensors and cfg and method.is_complete(tensors):
                rank = method.rank(tensors)
                r = _pattern_value(cfg.get("rank_pattern"), module_path, cfg.get("r", rank))
                alpha_default = cfg.get("lora_alpha", cfg.get("alpha", r))
                alpha = _pattern_value(cfg.get("alpha_pattern"), module_path, alpha_default)
                if alpha is not None:
                    tensors = method.from_peft(tensors, alpha, r)
            if "dora_scale" in tensors:
                tensors["dora_scale"] = dora.from_peft(tensors["dora_scale"], tensors.get("lora_up.weight"))
            resolved.append((comp, module_path, tensors))

    if not kohya_parts and not resolved and not unknown:
        raise LoraFormatError(f"{root}: the file holds no tensors.")
    modules: dict[str, LoraModule] = {}
    for name, tensors in kohya_parts.items():
        modules[name] = _module(name, tensors)
    if modules and methods.network_module_of({m.kind for m in modules.values()}) != KOHYA_NETWORK:
        fmt = "lycoris"

    if resolved:
        # Which architecture names them (lora_te_ vs lora_te1_, SGM UNet names for SDXL).
        arch = arch_from_metadata(metadata)
        if any(comp == "text_encoder_2" for comp, _, _ in resolved):
            arch = ARCH_SDXL
        if arch is None:
            for comp, module_path, tensors in resolved:
                width = _in_features(_module(module_path, tensors)) if comp == "unet" and module_path.endswith("attn2.to_k") else None
                if width is not None:
                    arch = _CONTEXT_WIDTH.get(width)
                    break
        arch_for_names = arch or ARCH_SD1
        layout = _SDXL_LAYOUT if arch_for_names == ARCH_SDXL else None
        for comp, module_path, tensors in resolved:
            try:
                name = kohya_module_name(comp, module_path, arch_for_names, layout)
            except KeyError:
                unknown += [f"{comp}.{module_path}.{s}" for s in tensors]
                continue
            if name in modules:
                modules[name].tensors.update(tensors)
            else:
                modules[name] = _module(name, tensors)

    # Incomplete, or mixing keys of two methods (which one would apply is a guess): reported, not used.
    incomplete = [n for n, m in modules.items()
                  if not m.method.is_complete(m.tensors) or set(m.tensors) - set(m.method.suffixes) - set(SHARED_SUFFIXES)]
    if incomplete:
        unknown += [f"{n}.{s}" for n in incomplete for s in modules[n].tensors]
        for n in incomplete:
            del modules[n]
    if unknown:
        msg = (
            f"{root}: {len(unknown)} keys are not part of any LoRA format sd-lora reads (kohya, LyCORIS, diffusers, "
            f"PEFT) or belong to incomplete modules: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
        if strict:
            raise LoraFormatError(msg + ". Pass strict=False to load the rest and skip these.")
        logger.warning("%s. They are skipped.", msg)
    if not modules:
        raise LoraFormatError(f"{root}: no LoRA modules found in this file.")
    for module in modules.values():
        _check_module(root, module)

    arch = arch_from_modules(modules) or arch_from_metadata(metadata)
    if arch == ARCH_SD2 and arch_from_metadata(metadata) == ARCH_SD2_V:
        arch = ARCH_SD2_V
    return LoraFile(modules=modules, metadata=dict(metadata), format=fmt, arch=arch, path=str(root))


def _check_module(root: Path, module: LoraModule) -> None:
    """Refuse a module whose tensors cannot make a delta (hostile or damaged files), naming the file.

    The delta is computed on the meta device (shapes only, no memory), so a file that loads here
    also applies later; NaN/inf values are refused because they turn every image black.
    """
    t = module.tensors
    what = f"{root}: module {module.name}"
    for suffix, tensor in t.items():
        if not (tensor.is_floating_point() or suffix == "alpha"):
            raise LoraFormatError(f"{what}: {suffix} has dtype {tensor.dtype}; LoRA weights are floating point. The file is damaged.")
        if tensor.numel() == 0:
            raise LoraFormatError(f"{what}: {suffix} is empty (shape {tuple(tensor.shape)}). The file is damaged.")
        if tensor.is_floating_point() and not is_finite(tensor):
            raise LoraFormatError(f"{what}: {suffix} holds NaN or inf values; it would break every image. Use another copy of the file.")
    if "alpha" in t and t["alpha"].numel() != 1:
        raise LoraFormatError(f"{what}: alpha must be a single number, found shape {tuple(t['alpha'].shape)}.")
    try:
        module.method.check(t)
        # (a conv's input-axis dora_scale has one value per input channel, not per kernel entry)
        if "dora_scale" in t and not dora.fits(t["dora_scale"], module.method.shape(t)):
            raise ValueError(f"dora_scale has {t['dora_scale'].numel()} values for a {module.method.shape(t)} weight")
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError, ZeroDivisionError) as e:
        raise LoraFormatError(f"{what}: its tensor shapes do not fit together ({e}). The file is damaged.") from e


def _component_of(module_path: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """Which pipeline component a PEFT key (no component prefix) belongs to."""
    if module_path.startswith(_UNET_HEADS):
        return "unet"
    if module_path.startswith(("text_model.", "encoder.layers.")):
        # OpenCLIP ViT-bigG (SDXL's second encoder) is 1280 wide; CLIP-L 768, OpenCLIP-H 1024.
        if _in_features(_module(module_path, tensors)) == 1280:
            return "text_encoder_2"
        return "text_encoder"
    return None


# --------------------------------------------------------------------------------------------------
# Matching against a pipeline
# --------------------------------------------------------------------------------------------------
def check_arch(lora: LoraFile, arch: str) -> None:
    """Raise if the file was made for another architecture family than the pipeline's."""
    if lora.arch is None:
        return
    if ARCH_FAMILY.get(lora.arch) != ARCH_FAMILY.get(arch):
        raise LoraFormatError(
            f"{lora.path or 'LoRA'}: this LoRA is for {FAMILY_NAMES[ARCH_FAMILY[lora.arch]]} ({lora.arch}), but the "
            f"pipeline is {ARCH_DESCRIPTIONS[arch]} ({arch}). Use a LoRA trained on the same base family."
        )


def match_lora(lora: LoraFile, pipe, strict: bool = True) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """Resolve every module of `lora` to a base module of `pipe`: kohya name -> (component, path, module).

    Raises (strict) or warns (strict=False, skipping them) for modules with no base module or with a
    shape that does not fit, and always raises for a file made for another architecture.
    """
    arch = architecture_of(pipe).arch
    check_arch(lora, arch)
    index = module_index(pipe, arch)
    matched: dict[str, tuple[str, str, torch.nn.Module]] = {}
    unmatched, mismatched = [], []
    for name, module in lora.modules.items():
        entry = index.get(name)
        if entry is None:
            unmatched.append(name)
            continue
        base = entry[2]
        weight_shape = tuple(base.weight.shape)
        out, numel = module.delta_shape()
        if out != weight_shape[0] or numel not in (None, base.weight.numel()):
            mismatched.append(f"{name} (the file's delta is {_shape_text(module.method.shape(module.tensors))}, "
                              f"the base weight is {_shape_text(weight_shape)})")
            continue
        matched[name] = entry
    problems = []
    if unmatched:
        problems.append(
            f"{len(unmatched)} modules have no matching layer in this {arch} pipeline: "
            f"{', '.join(unmatched[:6])}{' ...' if len(unmatched) > 6 else ''}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} modules do not fit their layer's shape: {'; '.join(mismatched[:4])}")
    if problems:
        msg = f"{lora.path or 'LoRA'}: " + " and ".join(problems)
        if strict:
            raise LoraFormatError(f"{msg}. {_other_base_hint(lora, arch)}")
        logger.warning("%s. These modules are skipped.", msg)
    return matched


def _shape_text(shape) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"


def _other_base_hint(lora: LoraFile, arch: str) -> str:
    """What a CLI / UI / Python user can do about modules that fit no layer of the pipeline."""
    trained_on = lora.metadata.get("ss_sd_model_name")
    made_for = f" (its metadata says it was trained on {trained_on!r})" if trained_on else ""
    return (
        f"This LoRA was made for another base model than this {FAMILY_NAMES[ARCH_FAMILY[arch]]} one{made_for}, "
        "one with other layer sizes or layers (e.g. a full-size model vs a tiny or pruned one). "
        "Pick the base model it was trained on, or apply only the modules that fit: `sd-lora generate "
        "--skip-mismatched`, strict=False in Python (sd_lora.generate / apply_loras)."
    )
