"""LoRA (kohya networks.lora): delta = up @ down * alpha / rank. LoCon is the same on convs.

Keys: `lora_down.weight` (rank, in[, kh, kw]), `lora_up.weight` (out, rank[, 1, 1]), `alpha`, and for
LyCORIS's CP-decomposed LoCon a `lora_mid.weight` core (rank, rank, kh, kw):
  delta = einsum(mid, down, up) * alpha / rank.
PEFT names them lora_A / lora_B; older diffusers files lora.down / lora.up or lora_linear_layer.
"""

from __future__ import annotations

import re

from .base import KOHYA_NETWORK, Method, numel

DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"


class LoraMethod(Method):
    name = kind = "lora"
    suffixes = (DOWN, UP, MID)
    peft_keys = (
        (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_\-]+)?\.weight$"), DOWN),
        (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_\-]+)?\.weight$"), UP),
        (re.compile(r"\.lora\.down\.weight$"), DOWN),
        (re.compile(r"\.lora\.up\.weight$"), UP),
        (re.compile(r"\.lora_linear_layer\.down\.weight$"), DOWN),
        (re.compile(r"\.lora_linear_layer\.up\.weight$"), UP),
    )
    network_module = KOHYA_NETWORK
    algo = "lora"
    use_dora = False  # its modules carry a dora_scale (DoRA's layer is its own: methods/dora.py)

    # ---- files ------------------------------------------------------------------------------
    def is_complete(self, t):
        return DOWN in t and UP in t

    def rank(self, t):
        return int(t[DOWN].shape[0])

    def delta(self, t, shape, base=None):
        import torch

        down, up = t[DOWN], t[UP]
        if MID in t:
            d = torch.einsum("i j k l, j r, p i -> p r k l", t[MID], down.flatten(1), up.flatten(1))
        else:
            d = up.flatten(1) @ down.flatten(1)
        return d.reshape(shape) * self.scale(t)

    def delta_shape(self, t):
        up, down = t[UP], t[DOWN]
        if MID in t:
            return int(up.shape[0]), int(up.shape[0]) * int(down.shape[1]) * numel(t[MID].shape[2:])
        return int(up.shape[0]), int(up.shape[0]) * numel(down.shape[1:])

    def weight_shape(self, t):
        down = t[DOWN]
        if MID in t:
            return (int(t[UP].shape[0]), int(down.shape[1]), *map(int, t[MID].shape[2:]))
        return (int(t[UP].shape[0]), *map(int, down.shape[1:]))

    def in_features(self, t):
        return int(t[DOWN].shape[1])

    def check(self, t):
        if MID in t:
            return super().check(t)
        # Most modules of most files: checked by arithmetic, because the meta-device delta costs
        # ~0.25 ms a module in Python.
        up, down = t[UP], t[DOWN]
        if up.dim() < 2 or down.dim() < 2 or up[0].numel() != down.shape[0]:
            raise ValueError(f"up {tuple(up.shape)} does not multiply down {tuple(down.shape)}")
        out, n = self.delta_shape(t)
        return (out, n // out)

    def fits(self, t, shape):
        if MID in t:
            return super().fits(t, shape)
        up, down = t[UP], t[DOWN]
        return (
            up.shape[0] == shape[0]
            and down.shape[0] == up.flatten(1).shape[1]
            and down[0].numel() == numel(shape[1:])
            and (len(shape) == 2 or down.dim() == 4 and tuple(down.shape[2:]) == tuple(shape[2:])
                 or down.dim() == 2 and tuple(shape[2:]) == (1, 1))
        )

    def factors(self, t):
        if MID in t:
            return None
        return t[UP].float().flatten(1), t[DOWN].float().flatten(1)

    def scaled(self, t, w):
        return {**t, UP: t[UP].float() * w}

    def random_tensors(self, shape, rank, generator):
        import torch

        if len(shape) == 4:
            return {DOWN: torch.randn(rank, *shape[1:], generator=generator),
                    UP: torch.randn(shape[0], rank, 1, 1, generator=generator) * 0.1}
        return {DOWN: torch.randn(rank, shape[1], generator=generator), UP: torch.randn(shape[0], rank, generator=generator) * 0.1}

    def tensors_from_factors(self, up, down, shape, alpha: float) -> dict:
        """kohya tensors of a LoRA/LoCon module for a weight of `shape` (conv: 4-D down, 1x1 up)."""
        import torch

        rank = int(down.shape[0])
        if len(shape) == 4:
            down = down.reshape(rank, *shape[1:])
            up = up.reshape(shape[0], rank, 1, 1)
        return {DOWN: down.contiguous(), UP: up.contiguous(), "alpha": torch.tensor(float(alpha))}

    def peft_exportable(self, t) -> bool:
        """diffusers / PEFT LoRA files hold plain LoRA factors (no CP core)."""
        return MID not in t

    # ---- training ---------------------------------------------------------------------------
    def peft_config(self, config, common, total_steps):
        from peft import LoraConfig

        return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          init_lora_weights=True, **common)

    def hooks(self, layer, adapter, config):
        # kohya's rank and module dropout, which PEFT's LoRA lacks (it has input dropout only).
        out = []
        if config.rank_dropout > 0:
            out.append(layer.lora_A[adapter].register_forward_hook(_rank_dropout_hook(config.rank_dropout)))
        if config.module_dropout > 0:
            out.append(layer.lora_B[adapter].register_forward_hook(_module_dropout_hook(config.module_dropout)))
        return out

    def export(self, layer, adapter):
        import torch

        return {DOWN: layer.lora_A[adapter].weight, UP: layer.lora_B[adapter].weight,
                "alpha": torch.tensor(float(layer.scaling[adapter] * layer.r[adapter]))}

    def load(self, layer, adapter, t):
        copy_into(layer.lora_A[adapter].weight, t[DOWN])
        copy_into(layer.lora_B[adapter].weight, t[UP])

    def file_params(self, target, rank, config=None):
        # down: rank x in x k x k, up: out x rank, alpha: one value.
        return rank * (target.in_features * target.kernel_numel + target.out_features) + 1

    def network_args(self, alpha, conv_rank, conv_alpha):
        module, args = super().network_args(alpha, conv_rank, conv_alpha)
        del args["algo"]  # kohya's networks.lora has one algorithm
        return module, args


def copy_into(param, value, factor: float = 1.0) -> None:
    """Copy a file tensor into a PEFT parameter of the same numel (no autograd)."""
    import torch

    with torch.no_grad():
        param.copy_((value.float() * factor).reshape(param.shape).to(param.dtype))


def _rank_dropout_hook(p: float):
    import torch
    import torch.nn as nn

    # kohya: drop whole rank channels per sample, rescale the rest (after lora_down).
    def hook(module, inputs, output):
        if not module.training:
            return output
        if output.dim() == 4 and isinstance(module, nn.Conv2d):  # (B, r, H, W)
            mask = torch.rand(output.shape[0], output.shape[1], 1, 1, device=output.device) > p
        else:  # (B, ..., r)
            shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)
            mask = torch.rand(shape, device=output.device) > p
        return output * mask.to(output.dtype) / (1.0 - p)

    return hook


def _module_dropout_hook(p: float):
    import torch

    # kohya: skip the adapter of this module for the whole step with probability p.
    def hook(module, inputs, output):
        if module.training and torch.rand(1).item() < p:
            return output * 0.0
        return output

    return hook


METHOD = LoraMethod()
