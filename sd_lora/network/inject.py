"""Inject trainable adapters into a diffusers pipeline through PEFT, and read them out in kohya form.

PEFT does the layer work (LoRA / LoHa / LoKr / AdaLoRA layers, dtype handling; DoRA is PEFT's LoRA
layer plus the input-axis magnitude of sd_lora.methods.dora);
this module decides *which* layers (presets.py) and gives PEFT exact module paths plus rank/alpha
patterns. Everything particular to one method (its PEFT config, extra hooks such as kohya's rank /
module dropout, how its PEFT parameters become file keys and back) is that method's, in
sd_lora.methods; the file keys are `<kohya name>.<suffix>` with the method's suffixes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace

import torch
import torch.nn as nn

from .. import methods
from ..models import architecture_of
from .blocks import BlockPlan, block_label, block_plan
from .blocks import network_args as block_network_args
from .config import NetworkConfig
from .presets import Target, adapts_convs, select_targets

logger = logging.getLogger(__name__)

ADAPTER_NAME = "sd_lora"


def _peft_config(config: NetworkConfig, targets: list[Target], total_steps: int | None):
    """The PEFT config for one component: exact target paths, each target's rank/alpha as PEFT patterns."""
    import re

    rank_groups: dict[int, list[str]] = defaultdict(list)
    alpha_groups: dict[float, list[str]] = defaultdict(list)
    for t in targets:
        if t.rank != config.rank:
            rank_groups[t.rank].append(re.escape(t.path))
        if t.alpha != float(config.alpha):
            alpha_groups[t.alpha].append(re.escape(t.path))
    # One alternation of exact paths per value: PEFT tries every pattern on every module (a regex each),
    # so a pattern per module would cost n^2 matches on SDXL's ~700 modules.
    common = dict(target_modules=[t.path for t in targets],
                  rank_pattern={"|".join(paths): rank for rank, paths in rank_groups.items()},
                  alpha_pattern={"|".join(paths): alpha for alpha, paths in alpha_groups.items()})
    return methods.get(config.method).peft_config(config, common, total_steps)


def resolve_targets(targets: list[Target], plan: BlockPlan) -> list[Target]:
    """The targets with the (rank, alpha) the plan gives each; a target at rank 0 is left out."""
    out = []
    for t in targets:
        rank, alpha = plan.rank_alpha(t.block_index, t.conv3x3) if t.component == "unet" else (
            plan.conv_default if t.conv3x3 else plan.default)
        if rank > 0:
            out.append(replace(t, rank=int(rank), alpha=float(alpha)))
    return out


class LoraNetwork:
    """The adapters injected into one pipeline: parameters for the optimizer, kohya state dict, removal."""

    def __init__(self, pipe, config: NetworkConfig, arch: str, targets: list[Target], tuners: dict, plan: BlockPlan | None = None):
        self.pipe = pipe
        self.config = config
        self.arch = arch
        self.targets = targets
        self.plan = plan or block_plan(config, arch)
        self.method = methods.get(config.method)
        self._tuners = tuners  # component -> PEFT tuner (BaseTuner) kept for AdaLoRA's allocator
        self._hooks: list = [h for t in targets for h in self.method.hooks(self._layer(t), ADAPTER_NAME, config)]

    # -- parameters ---------------------------------------------------------------------------
    def _layer(self, target: Target):
        return getattr(self.pipe, target.component).get_submodule(target.path)

    def _params(self, components: tuple[str, ...]) -> list[nn.Parameter]:
        params = []
        for component in components:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            params += [p for n, p in model.named_parameters() if ADAPTER_NAME in n.split(".")]
        return params

    def unet_parameters(self) -> list[nn.Parameter]:
        return self._params(("unet",))

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return self._params(("text_encoder", "text_encoder_2"))

    def parameters(self) -> list[nn.Parameter]:
        return self.unet_parameters() + self.text_encoder_parameters()

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(module path, parameter) of every adapter parameter (LoRA+ picks the up matrices by name)."""
        return list(self._named_adapter_params())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def lr_weights(self) -> dict[int, tuple[str, float]] | None:
        """Block LR weights (down/mid/up_lr_weight): id(parameter) -> (block label, LR multiplier) of every
        UNet adapter parameter; None when none are set (all at the UNet rate, one group). The optimizer's
        param_groups split the UNet group by it, as kohya's prepare_optimizer_params does per block."""
        if self.plan.lr_weights is None:
            return None
        out = {}
        for t in self.targets:
            if t.component != "unet":
                continue
            label = block_label(t.block_index, self.arch) if t.block_index is not None else "other"
            for n, p in self._layer(t).named_parameters():
                if ADAPTER_NAME in n.split("."):
                    out[id(p)] = (label, self.plan.lr_weight(t.block_index))
        return out

    # -- per-step work of the method (AdaLoRA) ------------------------------------------------
    def update_ranks(self, global_step: int) -> None:
        """AdaLoRA: re-allocate ranks (nothing for the other methods); call after backward() and
        before optimizer.zero_grad()."""
        self.method.update(self._tuners, global_step)

    def regularization_loss(self) -> torch.Tensor | float:
        """The method's extra loss term (AdaLoRA's orthogonality penalty; 0 for the others)."""
        return self.method.regularization_loss(self._named_adapter_params())

    def _named_adapter_params(self):
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, component, None)
            if model is not None:
                for n, p in model.named_parameters():
                    if ADAPTER_NAME in n.split("."):
                        yield n, p

    # -- kohya state dict ----------------------------------------------------------------------
    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters under kohya / LyCORIS keys (fp32, CPU), including every `.alpha`."""
        sd: dict[str, torch.Tensor] = {}
        for target in self.targets:
            for suffix, t in self.method.export(self._layer(target), ADAPTER_NAME).items():
                t = t.detach()
                # Meta tensors (full-size shape checks without weights) stay on meta; the rest go to CPU.
                sd[f"{target.kohya_name}.{suffix}"] = (
                    t.float() if t.device.type == "meta" else t.to(device="cpu", dtype=torch.float32).clone())
        return sd

    def metadata_fields(self) -> dict:
        """The method / rank / alpha (and conv rank / alpha where convs are adapted) arguments of
        formats.metadata.build_training_metadata for this network."""
        cfg = self.config
        convs = adapts_convs(cfg.preset)
        return dict(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha,
                    conv_rank=cfg.effective_conv_rank if convs else None,
                    conv_alpha=cfg.effective_conv_alpha if convs else None,
                    # kohya writes its block settings inside ss_network_args (train_network.py: json.dumps(net_kwargs))
                    network_args={**block_network_args(cfg, self.plan, convs), **self.method.config_network_args(cfg)} or None)

    def kohya_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of the kohya state dict (works on meta-device pipelines: no data needed)."""
        return {k: tuple(v.shape) for k, v in self.kohya_state_dict().items()}

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load kohya keys (as written by kohya_state_dict / save_lora) into the adapters.

        Every key must belong to a module of this network and every module must be present: a
        mismatch raises with the names, so a resume never silently starts from zero.
        """
        expected = self.kohya_state_dict()
        unknown = sorted(set(sd) - set(expected))
        missing = sorted(set(expected) - set(sd))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} keys this network does not have (first: {', '.join(unknown[:3])})")
            if missing:
                parts.append(f"{len(missing)} keys missing (first: {', '.join(missing[:3])})")
            raise ValueError(
                "the weights do not fit this network (" + "; ".join(parts) + "). Use the same method, preset, "
                "rank and architecture as the run that wrote them."
            )
        for key, value in sd.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} in the weights, {tuple(expected[key].shape)} in this network "
                    "(different rank or architecture)."
                )
        for target in self.targets:
            prefix = target.kohya_name + "."
            tensors = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            self.method.load(self._layer(target), ADAPTER_NAME, tensors)

    # -- removal -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take every adapter out: the pipeline's modules are the plain base modules again."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for component in {t.component for t in self.targets}:
            model = getattr(self.pipe, component)
            for path, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    parent_path, _, child = path.rpartition(".")
                    parent = model.get_submodule(parent_path) if parent_path else model
                    setattr(parent, child, module.get_base_layer())
            if hasattr(model, "peft_config"):
                del model.peft_config
        self._tuners.clear()


def inject_network(pipe, config: NetworkConfig | None = None, total_steps: int | None = None,
                   clip_skip: int | None = None) -> LoraNetwork:
    """Add trainable adapters to `pipe.unet` and its text encoder(s), in place.

    Base weights are frozen; adapter parameters are fp32 and trainable (whatever the base dtype).
    `total_steps` is the training length, for methods that plan over it (AdaLoRA's rank schedule,
    unless `config.adalora_total_steps` says otherwise). `clip_skip` is the training's: the
    text-encoder layers it skips get no adapters (sd_lora.models.unread_text_encoder_layers).
    Returns the LoraNetwork that gives the parameters to optimise and the kohya state dict to save.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import PeftType
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    config = config or NetworkConfig()
    config.check()
    arch = architecture_of(pipe).arch
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None and any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                f"pipe.{component} already has adapters injected. Call network.remove() (or load a fresh "
                "pipeline) before injecting a new network."
            )
    targets = select_targets(pipe, arch, config.preset, config.train_unet, config.train_text_encoder, clip_skip)
    targets = methods.get(config.method).select(targets)
    plan = block_plan(config, arch)
    selected = len(targets)
    targets = resolve_targets(targets, plan)
    if len(targets) < selected:
        logger.info("%d modules left out: their block's dim or LR weight is 0", selected - len(targets))
    if not targets:
        raise ValueError(f"preset {config.preset!r} found no modules to adapt in this {arch} pipeline"
                         + (" (every block's dim or LR weight is 0)." if selected else "."))

    grouped: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        grouped[t.component].append(t)
    tuners = {}
    for component, comp_targets in grouped.items():
        model = getattr(pipe, component)
        model.requires_grad_(False)
        peft_config = _peft_config(config, comp_targets, total_steps=total_steps)
        on_meta = next(model.parameters()).device.type == "meta"
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(peft_config.peft_type).value]
        tuner = tuner_cls(model, peft_config, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=on_meta)
        tuners[component] = tuner
        for n, p in model.named_parameters():
            if ADAPTER_NAME in n.split("."):
                if p.dtype != torch.float32 and not on_meta:
                    p.data = p.data.float()
                p.requires_grad_(True)
    network = LoraNetwork(pipe, config, arch, targets, tuners, plan)
    if config.init_lora:
        from .init_lora import load_init_lora

        load_init_lora(network, config.init_lora)
    logger.info(
        "Injected %s (%s preset, rank %d, alpha %g) into %d modules: %s trainable parameters",
        config.method, config.preset, config.rank, config.alpha, len(targets), f"{network.num_parameters():,}",
    )
    return network
