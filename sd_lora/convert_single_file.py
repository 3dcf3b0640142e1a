"""Convert a diffusers pipeline to an original-layout single-file checkpoint (A1111 / ComfyUI / Forge).

The original (CompVis for SD1/SD2, SAI "SGM" for SDXL) layout puts every component in one state
dict under a prefix:

    model.diffusion_model.*                       UNet
    first_stage_model.*                           VAE
    cond_stage_model.transformer.text_model.*     SD1 text encoder (CLIP ViT-L, HF layout)
    cond_stage_model.model.*                      SD2 text encoder (OpenCLIP ViT-H, open_clip layout)
    conditioner.embedders.0.transformer.text_model.*   SDXL CLIP ViT-L
    conditioner.embedders.1.model.*                    SDXL OpenCLIP ViT-bigG

The mapping is the inverse of what diffusers' `from_single_file` reads (and of its
scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py), but computed from the keys
themselves rather than from fixed tables: block indices follow from `layers_per_block` and from
which blocks have attentions, so non-standard UNets (the tiny test models, fine-tunes with other
block counts) convert as well as the real ones.

Every function works on plain `{name: tensor}` dicts and never copies a tensor it does not have to
(only OpenCLIP's fused q/k/v and the transposed text projection are new tensors), so it also works
on meta-device state dicts when only names and shapes matter. The merge tool uses the same
functions to bake LoRA stacks into a checkpoint.
"""

from __future__ import annotations

import os
import re

import torch

from .io import save_safetensors_atomic
from .models import ARCH_SD1, ARCH_SD2, ARCH_SD2_V, ARCH_SDXL, architecture_of

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
# Written by ComfyUI / kohya for v-prediction models (an empty tensor); `detect_architecture` reads it.
V_PRED_KEY = "v_pred"

# ---------------------------------------------------------------------------------------------- UNet

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL (addition_embed_type="text_time")
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

# diffusers ResnetBlock2D -> ldm ResBlock (in_layers = [GroupNorm, SiLU, Conv], out_layers = [GroupNorm, SiLU, Dropout, Conv]).
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(f"unexpected UNet resnet parameter {rest!r}")


def _layers_per_block(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not idx:
        raise ValueError("not a diffusers UNet state dict (no down_blocks.0.resnets.* keys)")
    return max(idx) + 1


def unet_key_map(keys) -> dict[str, str]:
    """{diffusers UNet key: original `input_blocks/middle_block/output_blocks` key} (without prefix).

    In the original UNet, input block 0 is conv_in and each down block contributes
    `layers_per_block` (resnet [+ attention]) blocks followed by one downsampler block; each up
    block contributes `layers_per_block + 1` blocks, the last of which also holds the upsampler
    (at position .1, or .2 when the block has an attention at .1).
    """
    keys = list(keys)
    lpb = _layers_per_block(keys)
    up_with_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    mapping = {}
    for key in keys:
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = i * (lpb + 1) + j + 1
            new = f"input_blocks.{n}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m.group(1))}.{_rename_resnet(m.group(2))}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = i * (lpb + 1) + j
            new = f"output_blocks.{n}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m.group(1))
            slot = 2 if i in up_with_attn else 1
            new = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{m.group(2)}"
        else:
            for old, repl in _UNET_TOP_LEVEL.items():
                if key.startswith(old):
                    new = repl + key[len(old):]
                    break
            else:
                raise KeyError(
                    f"UNet parameter {key!r} has no original-layout name (is this a Stable Diffusion 1/2/XL UNet?)"
                )
        mapping[key] = new
    return mapping


def unet_to_original(state_dict: dict[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the original layout (`model.diffusion_model.*`)."""
    return {prefix + new: state_dict[old] for old, new in unet_key_map(state_dict.keys()).items()}


# ----------------------------------------------------------------------------------------------- VAE


def vae_to_original(state_dict: dict[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original layout (`first_stage_model.*`).

    The original mid-block attention uses 1x1 convolutions where diffusers uses linear layers, so
    those weights get two trailing unit dimensions (a view, not a copy).
    """
    n_up = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1
    )
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state_dict.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            part, rest = m.group(1), m.group(2)
            for old, repl in attn.items():
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
                    break
            new = f"{part}.mid.attn_1.{rest}"
            if rest.endswith("weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.downsample.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # The original decoder numbers its up blocks from the lowest resolution upwards, reversed.
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.{m.group(2)}"
        new = new.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        out[prefix + new] = value
    return out


# ------------------------------------------------------------------------------------- text encoders


def _with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel (not from
    # CLIPTextModelWithProjection); normalise so both spellings convert the same way.
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state_dict.items()}


def clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str = SD1_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under `prefix` + `text_model.*` (HF names are kept)."""
    return {prefix + k: v for k, v in _with_text_model_prefix(state_dict).items() if not k.startswith("text_projection.")}


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def open_clip_to_original(state_dict: dict[str, torch.Tensor], prefix: str = SD2_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model state dict in open_clip's layout under `prefix`.

    open_clip uses torch.nn.MultiheadAttention, whose q, k and v live in one `in_proj_weight`
    (rows q, then k, then v), and stores `text_projection` as the matrix x is multiplied with on the
    right, i.e. the transpose of the nn.Linear weight.
    """
    sd = _with_text_model_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.position_ids":
            continue  # a buffer, not a weight; open_clip has none
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = m.group(2)
            for old, repl in _OPEN_CLIP_LAYER.items():
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
                    break
            else:
                raise KeyError(f"text encoder parameter {key!r} has no open_clip name")
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{rest}"] = value
        else:
            raise KeyError(f"text encoder parameter {key!r} has no open_clip name")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"text encoder layer {layer}: {kind} of q/k/v projections incomplete ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---------------------------------------------------------------------------------------- pipelines


def components_to_single_file_state_dict(
    arch: str, unet: dict, vae: dict | None, text_encoders: list[dict]
) -> dict[str, torch.Tensor]:
    """Assemble an original-layout checkpoint from diffusers/transformers component state dicts.

    `text_encoders` holds one state dict for SD1/SD2 and two (CLIP-L, OpenCLIP-G) for SDXL. Pass
    meta-device state dicts to get names and shapes only.
    """
    for component in (unet, *text_encoders):
        wrapped = next((k for k in component if ".base_layer." in k or ".lora_" in k), None)
        if wrapped is not None:
            # Injected adapters would be written under names no other tool reads, and silently lost.
            raise ValueError(
                f"the pipeline still has adapter layers injected (e.g. {wrapped!r}); fuse them into the base "
                "weights (or remove them) before writing a single-file checkpoint."
            )
    sd = unet_to_original(unet)
    if vae is not None:
        sd.update(vae_to_original(vae))
    expected = 2 if arch == ARCH_SDXL else 1
    if len(text_encoders) != expected:
        raise ValueError(f"{arch} needs {expected} text encoder state dict(s), got {len(text_encoders)}")
    if arch == ARCH_SD1:
        sd.update(clip_to_original(text_encoders[0], SD1_TEXT_PREFIX))
    elif arch in (ARCH_SD2, ARCH_SD2_V):
        # diffusers' SD2 text encoder has 23 of OpenCLIP-H's 24 layers (SD2 uses the penultimate
        # layer's output) and no text projection; we write what exists, as diffusers' own script does.
        sd.update(open_clip_to_original(text_encoders[0], SD2_TEXT_PREFIX))
    elif arch == ARCH_SDXL:
        sd.update(clip_to_original(text_encoders[0], SDXL_TEXT1_PREFIX))
        sd.update(open_clip_to_original(text_encoders[1], SDXL_TEXT2_PREFIX))
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return sd


def pipeline_to_single_file_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a diffusers SD1/SD2/SDXL pipeline (tensors shared, not copied).

    A v-prediction pipeline (scheduler `prediction_type="v_prediction"`) also gets the `v_pred`
    marker key that ComfyUI and kohya write, so the architecture can be told from the file alone.
    """
    info = architecture_of(pipe)
    encoders = [pipe.text_encoder.state_dict()]
    if info.arch == ARCH_SDXL:
        encoders.append(pipe.text_encoder_2.state_dict())
    vae = pipe.vae.state_dict() if getattr(pipe, "vae", None) is not None else None
    sd = components_to_single_file_state_dict(info.arch, pipe.unet.state_dict(), vae, encoders)
    if info.prediction_type == "v_prediction":
        sd[V_PRED_KEY] = torch.tensor([])
    return sd


def save_single_file(
    pipe, path: str | os.PathLike, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write `pipe` as one original-layout .safetensors file (atomically: whole or not at all).

    `dtype` (e.g. torch.float16) casts floating-point weights on the way out; the pipeline itself is
    not changed. The file loads in A1111, ComfyUI, Forge and with `sd_lora.load_base`.
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only (never pickle).")
    sd = pipeline_to_single_file_state_dict(pipe)
    if any(v.is_meta for v in sd.values()):
        raise ValueError("the pipeline has weights on the meta device (no data); load real weights before saving.")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_safetensors_atomic({k: v.detach().cpu() for k, v in sd.items()}, path, metadata=metadata)
