"""kohya / A1111 / ComfyUI module names for the modules of a diffusers pipeline.

One LoRA module is named by a prefix for its component plus its module path with "." -> "_":
  UNet:               lora_unet_<path>
  text encoder SD1/2: lora_te_text_model_<path>       (SDXL: lora_te1_... CLIP-L, lora_te2_... OpenCLIP-G)
Two details decide whether other tools match our keys:
  * transformers >= 5.6 names CLIPTextModel modules without the `text_model.` prefix, but every
    LoRA in the wild (and A1111/ComfyUI's matching) expects `text_model_`: we always add it.
  * kohya's SDXL UNet uses the original SGM block names (input_blocks / middle_block /
    output_blocks), not diffusers' (down_blocks / mid_block / up_blocks), so SDXL UNet keys are
    written in SGM names, and both layouts are read for every architecture.
"""

from __future__ import annotations

import re

from ..models import ARCH_SDXL

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = {  # component attribute on the pipeline -> kohya prefix, per architecture family
    "sd": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


def te_prefixes(arch: str) -> dict[str, str]:
    return TE_PREFIXES["sdxl" if arch == ARCH_SDXL else "sd"]


def text_encoder_module_path(path: str) -> str:
    """Normalise a CLIP module path to the `text_model.`-prefixed form kohya names use."""
    return path if path.startswith("text_model.") else "text_model." + path


def unet_diffusers_to_sgm(path: str, layers_per_block: int = 2, up_attention: tuple[bool, ...] = (True, True, False)) -> str:
    """Map a diffusers UNet module path to the original SGM/LDM path (for kohya's SDXL names).

    down_blocks.i.resnets.j      -> input_blocks.{1 + i*(L+1) + j}.0   (L = layers_per_block)
    down_blocks.i.attentions.j   -> input_blocks.{1 + i*(L+1) + j}.1
    down_blocks.i.downsamplers.0.conv -> input_blocks.{(i+1)*(L+1)}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
    up_blocks.i.resnets.j        -> output_blocks.{i*(L+1) + j}.0
    up_blocks.i.attentions.j     -> output_blocks.{i*(L+1) + j}.1
    up_blocks.i.upsamplers.0.conv -> output_blocks.{i*(L+1) + L}.{1 or 2}.conv
    Resnet sub-layers are renamed too (conv1 -> in_layers.2, ...).
    """
    resnet_names = {
        "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
    }
    top = {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    if path in top:
        return top[path]

    def resnet_tail(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return resnet_names.get(head, head) + (("." + tail) if tail else "")

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (layers_per_block + 1) + j
        return f"input_blocks.{n}.0.{resnet_tail(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (layers_per_block + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{resnet_tail(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (layers_per_block + 1) + j
        return f"output_blocks.{n}.0.{resnet_tail(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        i = int(m[1])
        # The upsampler follows the block's last layer: index 1 without attention, 2 with.
        return f"output_blocks.{i * (layers_per_block + 1) + layers_per_block}.{2 if up_attention[i] else 1}.conv"
    raise KeyError(f"no SGM name for UNet module {path!r}")


def kohya_module_name(component: str, module_path: str, arch: str, unet_layout: dict | None = None) -> str:
    """The kohya LoRA name of `module_path` in pipeline component `component` ("unet", "text_encoder", ...).

    `unet_layout` (from `unet_layout(unet)`) is needed for SDXL, whose kohya names use SGM block names.
    """
    if component == "unet":
        if arch == ARCH_SDXL:
            layout = unet_layout or {"layers_per_block": 2, "up_attention": (True, True, False)}
            module_path = unet_diffusers_to_sgm(module_path, **layout)
        return UNET_PREFIX + module_path.replace(".", "_")
    prefix = te_prefixes(arch).get(component)
    if prefix is None:
        raise KeyError(f"component {component!r} has no kohya prefix for architecture {arch!r}")
    return prefix + text_encoder_module_path(module_path).replace(".", "_")


def unet_layout(unet) -> dict:
    return {
        "layers_per_block": int(unet.config.layers_per_block),
        "up_attention": tuple("CrossAttn" in t for t in unet.config.up_block_types),
    }


def module_index(pipe_or_components, arch: str) -> dict[str, tuple[str, str, object]]:
    """Every Linear/Conv2d of the UNet and text encoder(s), by kohya name -> (component, module path, module).

    UNet modules are listed under both layouts (diffusers `lora_unet_down_blocks_...` and SGM
    `lora_unet_input_blocks_...`), so files written by either convention resolve to the same module;
    the kohya name for the architecture comes first.
    """
    import torch.nn as nn

    components = pipe_or_components if isinstance(pipe_or_components, dict) else {
        name: getattr(pipe_or_components, name, None) for name in ("unet", "text_encoder", "text_encoder_2")
    }
    index: dict[str, tuple[str, str, object]] = {}
    for component, model in components.items():
        if model is None:
            continue
        layout = unet_layout(model) if component == "unet" else None
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not path:
                continue
            path = _strip_peft_wrapping(path)
            if path is None:
                continue
            try:
                name = kohya_module_name(component, path, arch, layout)
            except KeyError:
                continue
            index[name] = (component, path, module)
            if component == "unet":
                diffusers_name = UNET_PREFIX + path.replace(".", "_")
                try:
                    sgm_name = UNET_PREFIX + unet_diffusers_to_sgm(path, **layout).replace(".", "_")
                except KeyError:
                    sgm_name = diffusers_name
                for alias in (diffusers_name, sgm_name):
                    index.setdefault(alias, (component, path, module))
    return index


def _strip_peft_wrapping(path: str) -> str | None:
    """Map a module path inside a PEFT-wrapped model back to the base layer's path (None to skip)."""
    if ".lora_" in path:
        # PEFT's own adapter sub-layers (lora_A / lora_B ... of the LoRA family; LoHa / LoKr keep
        # parameters, not Linear / Conv2d layers, so never reach here)
        return None
    path = path.replace("base_model.model.", "")
    if path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    return path
