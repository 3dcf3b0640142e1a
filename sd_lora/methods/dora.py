"""DoRA: LoRA with weight decomposition. Files are LoRA files plus a `dora_scale` (the magnitude) per module.

  W' = m * (W + delta) / ||W + delta||    ->   delta_dora = W' - W  (needs the base W)

The norm is per output row when `dora_scale` has one value per output channel (PEFT, kohya, LyCORIS
with wd_on_out=True: shape (out, 1[, 1, 1])), otherwise per input column (older LyCORIS: (1, in)).
See DESIGN.md section 8 for how A1111 / ComfyUI differ on the output-axis form.
PEFT keeps the magnitude as `lora_magnitude_vector`, shaped (out,) for Linear, (1, out, 1, 1) for conv.
"""

from __future__ import annotations

import re

from .base import LYCORIS_NETWORK, Method
from .lora import LoraMethod, copy_into

SCALE = "dora_scale"


def weight_decompose(weight, delta, magnitude):
    """delta_dora: W + delta renormalised to the stored magnitude, minus W (all fp32)."""
    merged = weight + delta
    if magnitude.shape[0] == merged.shape[0] and magnitude.numel() == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    else:
        norm = (
            merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        )
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def fits(magnitude, delta_shape) -> bool:
    """A magnitude has one value per output row or per input column of the delta."""
    return magnitude.numel() in tuple(delta_shape)[:2]


def from_peft(magnitude, up):
    """PEFT's lora_magnitude_vector in kohya's (out, 1[, 1, 1]) layout."""
    out = int(up.shape[0]) if up is not None else int(magnitude.numel())
    dims = up.dim() if up is not None else 2
    return magnitude.reshape(out, *[1] * (dims - 1)) if magnitude.numel() == out else magnitude


def to_peft(magnitude, up):
    """kohya's dora_scale as PEFT's magnitude ((out,) for Linear, (1, out, 1, 1) for conv)."""
    out = up.shape[0]
    if magnitude.numel() != out:
        raise ValueError("per-input-channel dora_scale (old LyCORIS DoRA) has no PEFT equivalent.")
    return magnitude.reshape(1, out, 1, 1) if up.dim() == 4 else magnitude.reshape(out)


class DoraMethod(LoraMethod):
    name = "dora"
    kind = "lora"  # its files are read by the LoRA reader (dora_scale is a shared suffix)
    suffixes = ()
    peft_keys = ((re.compile(r"\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$"), SCALE),)
    network_module = LYCORIS_NETWORK
    use_dora = True

    def export(self, layer, adapter):
        t = super().export(layer, adapter)
        base = layer.get_base_layer().weight
        # PEFT keeps (out,) for Linear and (1, out, 1, 1) for conv; LyCORIS/kohya store (out, 1[, 1, 1]).
        t[SCALE] = layer.lora_magnitude_vector[adapter].weight.reshape(base.shape[0], *[1] * (base.dim() - 1))
        return t

    def load(self, layer, adapter, t):
        super().load(layer, adapter, t)
        copy_into(layer.lora_magnitude_vector[adapter].weight, t[SCALE])

    def file_params(self, target, rank):
        return super().file_params(target, rank) + target.out_features

    def network_args(self, alpha, conv_rank, conv_alpha):
        # LyCORIS's form (algo=lora + dora_wd), not kohya's networks.lora (which has no DoRA).
        module, args = Method.network_args(self, alpha, conv_rank, conv_alpha)
        return module, {"algo": args.pop("algo"), "dora_wd": "True", **args}


METHOD = DoraMethod()
