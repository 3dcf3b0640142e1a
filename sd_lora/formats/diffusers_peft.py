"""Export a LoraFile in diffusers or PEFT format (kohya is the default and the most portable).

diffusers format: one .safetensors file, keys `unet.<module path>.lora_A.weight` / `.lora_B.weight`
(+ `.lora_magnitude_vector` for DoRA) and `text_encoder.` / `text_encoder_2.` prefixes, plus the
`lora_adapter_metadata` header diffusers itself writes (r, lora_alpha, rank/alpha patterns), so
`pipe.load_lora_weights(file)` rebuilds the exact scales. ComfyUI and A1111 do not read it.

PEFT format: a folder per component (unet/, text_encoder/, text_encoder_2/), each what
`PeftModel.save_pretrained` writes: adapter_model.safetensors (`base_model.model.<path>.lora_A.weight`)
and adapter_config.json. Module paths are those of the installed transformers version (5.x
CLIPTextModel has no `text_model.` prefix), so `PeftModel.from_pretrained(model, folder)` works.

Both hold LoRA / LoCon / DoRA only; LyCORIS LoHa/LoKr stay in kohya format.
The scale alpha / rank is folded into lora_B and alpha written equal to the rank, which is exact and
avoids loaders that guess alphas.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from ..io import atomic_write, save_safetensors_atomic
from ..methods import dora
from ..methods.dora import warn_output_axis
from ..methods.lora import DOWN, UP, METHOD as LORA
from .kohya import lora_file_state_dict
from .lora_file import LoraFile, LoraModule

# Multi-word identifiers in module paths (kohya names join every path part with "_").
_MULTI = {
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks", "transformer_blocks",
    "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "in_layers", "out_layers",
    "emb_layers", "skip_connection", "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection", "add_k_proj",
    "add_v_proj",
}
_PREFIX_COMPONENT = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
_SGM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SGM_TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "out.0": "conv_norm_out", "out.2": "conv_out"}


def kohya_name_to_module(name: str, layers_per_block: int = 2, up_attention: tuple[bool, ...] = (True, True, False)) -> tuple[str, str]:
    """(component, diffusers/transformers module path) of a kohya module name, without a model.

    Text encoder paths keep kohya's `text_model.` prefix; SGM UNet names (input_blocks...) are mapped
    back to diffusers names for the given layout (default: the real SDXL UNet).
    """
    for prefix, component in _PREFIX_COMPONENT:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        raise ValueError(f"{name}: not a kohya module name (expected lora_unet_ / lora_te_ / lora_te1_ / lora_te2_).")
    tokens = rest.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for n in (3, 2):
            if "_".join(tokens[i:i + n]) in _MULTI and i + n <= len(tokens):
                parts.append("_".join(tokens[i:i + n]))
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    path = ".".join(parts)
    if component == "unet" and path.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out.")):
        path = sgm_to_diffusers(path, layers_per_block, up_attention)
    return component, path


def sgm_to_diffusers(path: str, layers_per_block: int = 2, up_attention: tuple[bool, ...] = (True, True, False)) -> str:
    """Inverse of naming.unet_diffusers_to_sgm."""
    for sgm, diff in _SGM_TOP.items():
        if path == sgm:
            return diff
    L = layers_per_block

    def resnet(tail: str) -> str:
        for sgm, diff in _SGM_RESNET.items():
            if tail == sgm or tail.startswith(sgm + "."):
                return diff + tail[len(sgm):]
        return tail

    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, sub, tail = int(m[1]), int(m[2]), m[3]
        if n % (L + 1) == 0:
            return f"down_blocks.{n // (L + 1) - 1}.downsamplers.0.conv"
        i, j = (n - 1) // (L + 1), (n - 1) % (L + 1)
        return f"down_blocks.{i}.resnets.{j}.{resnet(tail)}" if sub == 0 else f"down_blocks.{i}.attentions.{j}.{tail}"
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        k, tail = int(m[1]), m[2]
        return f"mid_block.attentions.0.{tail}" if k == 1 else f"mid_block.resnets.{k // 2}.{resnet(tail)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        n, sub, tail = int(m[1]), int(m[2]), m[3]
        i, j = n // (L + 1), n % (L + 1)
        has_attn = up_attention[i] if i < len(up_attention) else False
        if sub == 0:
            return f"up_blocks.{i}.resnets.{j}.{resnet(tail)}"
        if sub == 1 and has_attn:
            return f"up_blocks.{i}.attentions.{j}.{tail}"
        return f"up_blocks.{i}.upsamplers.0.{tail}"
    raise ValueError(f"no diffusers name for SGM UNet module {path!r}")


@lru_cache(maxsize=None)
def _clip_has_text_model_prefix() -> bool:
    """Whether the installed transformers names CLIPTextModel modules `text_model.*` (< 5.6) or not."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1, vocab_size=10,
                         max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return any(n.startswith("text_model.") for n, _ in CLIPTextModel(cfg).named_modules())


def _installed_module_path(name: str) -> tuple[str, str]:
    """(component, module path) as the installed diffusers/transformers name the module.

    CLIPTextModel (SD1/SD2's encoder, SDXL's first) lost `text_model.` in transformers 5.6;
    CLIPTextModelWithProjection (SDXL's second) kept it. PEFT needs the exact path; diffusers uses
    the paths as target_modules, which PEFT matches by suffix, so the shorter path also works with
    older transformers.
    """
    component, path = kohya_name_to_module(name)
    if component == "text_encoder" and path.startswith("text_model.") and not _clip_has_text_model_prefix():
        path = path[len("text_model."):]
    return component, path


def _lora_modules(lora: LoraFile, target: str) -> list[LoraModule]:
    bad = [n for n, m in lora.modules.items() if m.method is not LORA or not LORA.peft_exportable(m.tensors)]
    if bad:
        raise ValueError(
            f"{lora.path or 'LoRA'}: {len(bad)} modules are LyCORIS ({lora.modules[bad[0]].kind}) or CP-decomposed "
            f"LoCon (first: {bad[0]}); the {target} format holds plain LoRA/LoCon/DoRA only. Keep this file in kohya format."
        )
    return list(lora.modules.values())


def _peft_tensors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lora_A, lora_B with the alpha/rank scale folded in, PEFT-shaped magnitude or None), fp32."""
    t = module.tensors
    down = t[DOWN].float()
    up = t[UP].float() * module.scale
    magnitude = None
    if "dora_scale" in t:
        try:
            magnitude = dora.to_peft(t["dora_scale"].float(), up)
        except ValueError as e:
            raise ValueError(f"{module.name}: {e}") from None
    return down, up, magnitude


def _portable_metadata(lora: LoraFile) -> dict[str, str]:
    # Training metadata (ss_*, modelspec.*) travels along; the sshs hashes describe the kohya file only.
    return {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec."))}


def _config_dict(entries: list[tuple[str, int]], use_dora: bool) -> dict:
    ranks = Counter(r for _, r in entries)
    r = ranks.most_common(1)[0][0]
    pattern = {path: rank for path, rank in entries if rank != r}
    return {
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(path for path, _ in entries), "use_dora": use_dora, "lora_dropout": 0.0,
        "bias": "none", "init_lora_weights": True,
    }


def to_diffusers(lora: LoraFile, dtype: torch.dtype | None = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, header metadata) of the diffusers-format file for `lora`."""
    sd: dict[str, torch.Tensor] = {}
    per_component: dict[str, list[tuple[str, int]]] = {}
    dora: dict[str, bool] = {}
    for module in _lora_modules(lora, "diffusers"):
        component, path = _installed_module_path(module.name)
        down, up, magnitude = _peft_tensors(module)
        key = f"{component}.{path}"
        sd[f"{key}.lora_A.weight"] = down
        sd[f"{key}.lora_B.weight"] = up
        if magnitude is not None:
            sd[f"{key}.lora_magnitude_vector"] = magnitude
            dora[component] = True
        per_component.setdefault(component, []).append((path, int(down.shape[0])))
    meta_cfg = {}
    for component, entries in per_component.items():
        for k, v in _config_dict(entries, dora.get(component, False)).items():
            meta_cfg[f"{component}.{k}"] = v
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta_cfg, indent=2, sort_keys=True)}
    metadata.update(_portable_metadata(lora))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd, metadata


def save_diffusers(path: str | os.PathLike, lora: LoraFile, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write `lora` as a diffusers-format .safetensors file (for `pipe.load_lora_weights`)."""
    sd, metadata = to_diffusers(lora, dtype)
    save_safetensors_atomic(sd, path, metadata)
    warn_output_axis(path, lora_file_state_dict(lora))  # (every DoRA module here is per output row)
    return Path(path)


def save_peft(folder: str | os.PathLike, lora: LoraFile, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write `lora` as PEFT adapters: folder/<component>/adapter_model.safetensors + adapter_config.json."""
    folder = Path(folder)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    entries: dict[str, list[tuple[str, int]]] = {}
    dora: dict[str, bool] = {}
    for module in _lora_modules(lora, "PEFT"):
        component, path = _installed_module_path(module.name)
        down, up, magnitude = _peft_tensors(module)
        sd = groups.setdefault(component, {})
        sd[f"base_model.model.{path}.lora_A.weight"] = down
        sd[f"base_model.model.{path}.lora_B.weight"] = up
        if magnitude is not None:
            sd[f"base_model.model.{path}.lora_magnitude_vector"] = magnitude
            dora[component] = True
        entries.setdefault(component, []).append((path, int(down.shape[0])))
    for component, sd in groups.items():
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        save_safetensors_atomic(sd, folder / component / "adapter_model.safetensors", {"format": "pt", **_portable_metadata(lora)})
        config = _config_dict(entries[component], dora.get(component, False))
        config.update(peft_type="LORA", task_type=None, base_model_name_or_path=None, inference_mode=True)
        with atomic_write(folder / component / "adapter_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    warn_output_axis(folder, lora_file_state_dict(lora))
    return folder
