"""Target presets: which modules of the UNet and text encoder(s) get an adapter.

The rules follow kohya's networks/lora.py, because its files define what A1111/ComfyUI users
expect a LoRA to contain (module counts for SD1.5 in brackets):

  attention  UNet attn1/attn2 to_q, to_k, to_v, to_out.0; TE self_attn q/k/v/out_proj   [128 + 48]
  kohya      every Linear and 1x1 Conv2d inside a UNet Transformer2DModel (attention,
             feed-forward, proj_in/proj_out); TE attention + MLP (fc1, fc2)             [192 + 72]
  full       kohya + inside ResnetBlock2D / Downsample2D / Upsample2D: 3x3 convs at
             conv_rank (LoCon), time_emb_proj and 1x1 conv_shortcut at rank           [+ 86 SD1.5]

fp16 file sizes for SD1.5 are in docs/formats.md (measured by tests/test_network.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from ..models import ARCH_SDXL, unread_text_encoder_layers
from .blocks import block_family, block_index
from .naming import kohya_module_name, te_prefixes, unet_layout

TRANSFORMER_CLASSES = ("Transformer2DModel",)
RESNET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_UNET_ATTENTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TE_ATTENTION = re.compile(r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TE_MLP = re.compile(r"(.*\.)?mlp\.(fc1|fc2)$")
_TE_LAYER = re.compile(r"(?:^|.*\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One base module to adapt."""

    component: str  # "unet", "text_encoder", "text_encoder_2"
    path: str  # module path inside the component (diffusers / transformers names)
    kohya_name: str  # lora_unet_..., lora_te_text_model_..., lora_te1_...
    module: nn.Module
    block: str | None  # "down" / "mid" / "up" for UNet modules inside those blocks
    conv3x3: bool  # a conv with a kernel larger than 1x1 (gets conv_rank / conv_alpha)
    block_index: int | None = None  # kohya's UNet block number (sd_lora/network/blocks.py)
    # (rank, alpha) the network gives it: set by inject_network from the config (blocks.BlockPlan)
    rank: int | None = None
    alpha: float | None = None

    @property
    def in_features(self) -> int:
        m = self.module
        return m.in_features if isinstance(m, nn.Linear) else m.in_channels

    @property
    def out_features(self) -> int:
        m = self.module
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    @property
    def kernel_numel(self) -> int:
        return 1 if isinstance(self.module, nn.Linear) else int(self.module.kernel_size[0] * self.module.kernel_size[1])


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def adapts_convs(preset: str) -> bool:
    """The preset adapts the ResNet 3x3 convs (LoCon), so conv_rank / conv_alpha apply."""
    return preset == "full"


def unet_targets(unet, preset: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of every UNet module the preset adapts, in model order."""
    found: dict[str, nn.Module] = {}
    classes = TRANSFORMER_CLASSES + (RESNET_CLASSES if adapts_convs(preset) else ())
    for name, parent in unet.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_name, child in parent.named_modules():
            if not child_name or not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{name}.{child_name}"
            if preset == "attention" and not _UNET_ATTENTION.fullmatch(path):
                continue
            # Inside transformer blocks kohya adapts Linear and 1x1 convs only (proj_in/proj_out of SD1).
            if type(parent).__name__ in TRANSFORMER_CLASSES and _is_conv3x3(child):
                continue
            found.setdefault(path, child)
    return list(found.items())


def text_encoder_targets(text_encoder, preset: str) -> list[tuple[str, nn.Module]]:
    found = []
    for path, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _TE_ATTENTION.fullmatch(path) or (preset != "attention" and _TE_MLP.fullmatch(path)):
            found.append((path, module))
    return found


def select_targets(pipe_or_components, arch: str, preset: str, train_unet: bool = True, train_text_encoder: bool = True,
                   clip_skip: int | None = None) -> list[Target]:
    """Every module the preset adapts in a pipeline (or a dict of components), with its kohya name
    (clip_skip: the training's; the text-encoder layers it skips get no adapter)."""
    components = pipe_or_components if isinstance(pipe_or_components, dict) else {
        name: getattr(pipe_or_components, name, None) for name in ("unet", "text_encoder", "text_encoder_2")
    }
    targets: list[Target] = []
    unet = components.get("unet")
    if train_unet and unet is not None:
        layout = unet_layout(unet) if arch == ARCH_SDXL else None
        for path, module in unet_targets(unet, preset):
            try:
                name = kohya_module_name("unet", path, arch, layout)
            except KeyError:
                continue  # no kohya name in this layout: kohya cannot adapt it either
            index = block_index(name, arch)
            targets.append(Target("unet", path, name, module, block_family(index, arch), _is_conv3x3(module), index))
    if train_text_encoder:
        for component in te_prefixes(arch):
            te = components.get(component)
            if te is None:
                continue
            # Layers the UNet's conditioning never reads (SDXL CLIP-L's last) get no adapter.
            unread = unread_text_encoder_layers(arch, component, te.config.num_hidden_layers, clip_skip)
            for path, module in text_encoder_targets(te, preset):
                layer = _TE_LAYER.match(path)
                if layer and int(layer[1]) in unread:
                    continue
                name = kohya_module_name(component, path, arch)
                targets.append(Target(component, path, name, module, None, False))
    return targets


def estimate_file_bytes(targets: list[Target], config, bytes_per_param: int = 2) -> int | None:
    """Tensor bytes of a kohya file for these targets (fp16 by default; alphas included), counted by
    the method (sd_lora.methods: LoRA/LoCon/DoRA exactly, LoHa twice a LoRA); None where the method
    cannot say in advance (LoKr: its factorisation depends on each layer's shape). The targets are a
    network's (`LoraNetwork.targets`: each with the rank the config gives it)."""
    from .. import methods

    method = methods.get(config.method)
    total = 0
    for t in targets:
        if t.rank is None:
            raise ValueError(f"{t.kohya_name}: no rank resolved; pass a network's targets (LoraNetwork.targets)")
        n = method.file_params(t, t.rank, config)
        if n is None:
            return None
        total += n * bytes_per_param
    return total
