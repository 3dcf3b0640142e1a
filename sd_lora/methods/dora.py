"""DoRA: LoRA with weight decomposition. Files are LoRA files plus a `dora_scale` (the magnitude) per module.

  W' = m * (W + delta) / ||W + delta||    ->   delta_dora = W' - W  (needs the base W)

Two conventions exist for the axis of m and of the norm (DESIGN.md section 8):

  input axis   one magnitude per input column, the norm over the output dimension(s): `dora_scale`
               (1, in) for a Linear, (1, in, 1, 1) for a conv. The DoRA paper's ||.||_c; older LyCORIS,
               LyCORIS with wd_on_output=False. What sd-lora trains and writes.
  output axis  one magnitude per output row: `dora_scale` (out, 1[, 1, 1]). PEFT / diffusers
               (`lora_magnitude_vector`, (out,) or (1, out, 1, 1) for conv), LyCORIS's default since
               057df54 (2025-04, `wd_on_output=True`). Read and fused here; written when trained with
               network.dora_axis = "output", to PEFT / diffusers, or when such a file is converted
               or edited; every such write logs OUTPUT_AXIS_NOTE (formats/kohya.py, diffusers_peft.py).

Why the input axis: it is the one form A1111 1.10 and ComfyUI both apply as we do. A1111's
`extensions-builtin/Lora/network.py` (v1.10.x) `apply_weight_decompose` (L175-194) always takes the
norm over the output dimension (transpose(0, 1) ... transpose(0, 1)) and so broadcasts an (out, 1)
scale into an (out, in) product; `finalize_updown` (L196-216) scales the delta by alpha/rank before
the decomposition and multiplies the result by the strength after it. ComfyUI
(Comfy-Org/ComfyUI a125cd84, comfy/weight_adapter/base.py:weight_decompose L62-90) picks the axis from
the scale's shape but its output-axis branch divides by ||W|| instead of ||W + delta|| (L68-73; open
upstream: PR #15458, issue #12938, LyCORIS #216); its input-axis branch (L74-81) is the same formula.

Training: PEFT's DoRA (peft/tuners/lora/dora.py) has no axis setting (it norms every output row and
scales the output), so this method injects PEFT's plain LoRA layer and adds the input-axis magnitude
itself, as a parameter on that layer and a forward pre-hook. For W' = (W + s B A) diag(c) with
c = m / ||W + s B A||_col, W' x = (W + s B A)(c * x): scaling the layer's input per channel by c is
exact for a Linear and for a conv (zero padding commutes with a per-channel scale). The norm is
detached, as the DoRA paper suggests (sec. 4.3) and PEFT does, so m gets the only extra gradient.
PEFT's own merge() does not know the magnitude; nothing here merges a training network (files are
fused by sd_lora.stack). `network.dora_axis = "output"` trains PEFT's DoRA layer instead, for files
diffusers / PEFT load (PEFT form: A1111 and ComfyUI apply those differently, see above).
Not the LyCORIS package: it would be a second injection mechanism beside PEFT for one method, and
LyCORIS computes the whole merged weight in every forward without detaching the norm.
"""

from __future__ import annotations

import logging
import re

from .base import LYCORIS_NETWORK, Method
from .lora import LoraMethod, copy_into

logger = logging.getLogger(__name__)

SCALE = "dora_scale"
MAGNITUDE = "dora_magnitude"  # the ParameterDict this method adds to a PEFT LoRA layer (adapter -> (in,))

OUTPUT_AXIS_NOTE = (
    "per-output-row DoRA magnitudes (PEFT/diffusers form, dora_scale (out, 1)) are applied differently "
    "elsewhere: A1111/Forge 1.10 broadcast them wrongly (they only know the per-input-column form) and "
    "ComfyUI divides by ||W|| instead of ||W + dW||; diffusers, PEFT and sd-lora apply them as written"
)


def is_output_axis(magnitude, out_features: int) -> bool:
    """The magnitude has one value per output row (ComfyUI's test: dora_scale.shape[0] == weight.shape[0])."""
    return magnitude.dim() >= 1 and magnitude.shape[0] == out_features and magnitude.numel() == out_features


def column_norm(weight):
    """||weight|| per input column, over the output dimension and any kernel: shape (in,)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def weight_decompose(weight, delta, magnitude):
    """delta_dora: W + delta renormalised to the stored magnitude, minus W (all fp32). Either axis."""
    merged = weight + delta
    if is_output_axis(magnitude, merged.shape[0]):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    else:
        norm = column_norm(merged).reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def fits(magnitude, weight_shape) -> bool:
    """A magnitude has one value per output row or per input column of a weight of `weight_shape`."""
    return magnitude.numel() in tuple(weight_shape)[:2]


def output_axis_modules(state_dict: dict) -> list[str]:
    """Module names of a flat kohya state dict (`<module>.<suffix>` keys) whose dora_scale is per output row."""
    from . import for_keys

    names = [k[: -len(SCALE) - 1] for k in state_dict if k.endswith("." + SCALE)]
    out = []
    for name in names:
        t = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
        if is_output_axis(t[SCALE], int(for_keys(t).delta_shape(t)[0])):
            out.append(name)
    return out


def warn_output_axis(what, state_dict: dict) -> None:
    """Say, for a file being written, which programs apply its output-axis DoRA modules differently."""
    names = output_axis_modules(state_dict)
    if names:
        logger.warning("%s: %d DoRA modules (first: %s) hold %s.", what, len(names), names[0], OUTPUT_AXIS_NOTE)


def from_peft(magnitude, up):
    """PEFT's lora_magnitude_vector in kohya's (out, 1[, 1, 1]) layout."""
    out = int(up.shape[0]) if up is not None else int(magnitude.numel())
    dims = up.dim() if up is not None else 2
    return magnitude.reshape(out, *[1] * (dims - 1)) if magnitude.numel() == out else magnitude


def to_peft(magnitude, up):
    """kohya's dora_scale as PEFT's magnitude ((out,) for Linear, (1, out, 1, 1) for conv)."""
    out = up.shape[0]
    if not is_output_axis(magnitude, out):
        raise ValueError("its DoRA magnitude is per input column (the form sd-lora trains and A1111 / ComfyUI "
                         "apply); PEFT and diffusers only know the per-output-row form, so it has no equivalent "
                         "there. Keep this file in kohya format.")
    return magnitude.reshape(1, out, 1, 1) if up.dim() == 4 else magnitude.reshape(out)


def _input_scale(layer, adapter: str):
    """c = m / ||W + s B A|| per input column (the norm detached: DoRA paper sec. 4.3, as PEFT does)."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    with torch.no_grad():
        weight = dequantize_module_weight(layer.get_base_layer()).float()  # (bitsandbytes / fp8 bases too)
        down, up = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
        merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * layer.scaling[adapter]
        norm = column_norm(merged)
    return getattr(layer, MAGNITUDE)[adapter] / norm


def _scale_input_hook(adapter: str):
    def hook(layer, args):
        if layer.disable_adapters or layer.merged or adapter not in layer.active_adapters:
            return None
        x = args[0]
        c = _input_scale(layer, adapter).to(x.dtype)
        # Linear: (..., in); conv: (batch, in, h, w)
        c = c.view(1, -1, *[1] * (x.dim() - 2)) if layer.lora_A[adapter].weight.dim() == 4 else c
        return (x * c, *args[1:])

    return hook


class DoraMethod(LoraMethod):
    name = "dora"
    kind = "lora"  # its files are read by the LoRA reader (dora_scale is a shared suffix)
    suffixes = ()
    peft_keys = ((re.compile(r"\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$"), SCALE),)
    network_module = LYCORIS_NETWORK
    use_dora = True

    # network.dora_axis "input" (default): PEFT's LoRA layer + the magnitude and pre-hook here;
    # "output": PEFT's own DoRA layer (`lora_magnitude_vector`), for files diffusers / PEFT load.
    def peft_config(self, config, common, total_steps):
        from dataclasses import replace

        cfg = super().peft_config(config, common, total_steps)
        return replace(cfg, use_dora=True) if config.dora_axis == "output" else cfg

    def hooks(self, layer, adapter, config):
        out = super().hooks(layer, adapter, config)
        if config.dora_axis == "output":
            return out
        import torch
        from peft.utils.integrations import dequantize_module_weight

        # m starts at ||W||_col, so c = 1 while B is zero: the network starts as the base model.
        weight = dequantize_module_weight(layer.get_base_layer()).detach().float()
        magnitude = torch.nn.Parameter(column_norm(weight), requires_grad=True)
        setattr(layer, MAGNITUDE, torch.nn.ParameterDict({adapter: magnitude}))
        return out + [layer.register_forward_pre_hook(_scale_input_hook(adapter))]

    def export(self, layer, adapter):
        t = super().export(layer, adapter)
        down = layer.lora_A[adapter].weight
        if hasattr(layer, MAGNITUDE):  # (1, in[, 1, 1])
            t[SCALE] = getattr(layer, MAGNITUDE)[adapter].reshape(1, -1, *[1] * (down.dim() - 2))
        else:  # PEFT keeps (out,) for Linear and (1, out, 1, 1) for conv; LyCORIS/kohya store (out, 1[, 1, 1])
            up = layer.lora_B[adapter].weight
            t[SCALE] = layer.lora_magnitude_vector[adapter].weight.reshape(up.shape[0], *[1] * (down.dim() - 1))
        return t

    def load(self, layer, adapter, t):
        input_axis = hasattr(layer, MAGNITUDE)
        own = getattr(layer, MAGNITUDE)[adapter] if input_axis else layer.lora_magnitude_vector[adapter].weight
        scale = t[SCALE]
        out = layer.lora_B[adapter].weight.shape[0]
        file_output_axis = is_output_axis(scale, out) and scale.shape[0] != 1  # ((1, 1) fits both)
        if scale.numel() != own.numel() or file_output_axis == input_axis:
            have, want = ("per output row", "per input column") if input_axis else ("per input column", "per output row")
            raise ValueError(f"its dora_scale {tuple(scale.shape)} is {have} and this network's DoRA magnitude is {want} "
                             f"({own.numel()} values); set network.dora_axis = \"{'output' if input_axis else 'input'}\" "
                             "to continue it")
        super().load(layer, adapter, t)
        copy_into(own, scale)

    def file_params(self, target, rank, config=None):
        axis = getattr(config, "dora_axis", "input")
        return super().file_params(target, rank) + (target.out_features if axis == "output" else target.in_features)

    def network_args(self, alpha, conv_rank, conv_alpha):
        # LyCORIS's form (algo=lora + dora_wd), not kohya's networks.lora (which has no DoRA).
        module, args = Method.network_args(self, alpha, conv_rank, conv_alpha)
        return module, {"algo": args.pop("algo"), "dora_wd": "True", **args}

    def config_network_args(self, config):
        # the axis as LyCORIS's kohya.py names it (`wd_on_output`, default True since 057df54)
        return {"wd_on_output": str(config.dora_axis == "output")}


METHOD = DoraMethod()
