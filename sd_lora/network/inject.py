"""Inject trainable adapters into a diffusers pipeline through PEFT, and read them out in kohya form.

PEFT does the layer work (LoRA / DoRA / LoHa / LoKr / AdaLoRA layers, merging, dtype handling);
this module decides *which* layers (presets.py) and gives PEFT exact module paths plus rank/alpha
patterns. Everything particular to one method (its PEFT config, extra hooks such as kohya's rank /
module dropout, how its PEFT parameters become file keys and back) is that method's, in
sd_lora.methods; the file keys are `<kohya name>.<suffix>` with the method's suffixes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn as nn

from .. import methods
from ..models import architecture_of
from .config import NetworkConfig
from .presets import Target, adapts_convs, select_targets

logger = logging.getLogger(__name__)

ADAPTER_NAME = "sd_lora"


def _peft_config(config: NetworkConfig, targets: list[Target], is_unet: bool, total_steps: int | None):
    """The PEFT config for one component: exact target paths, ranks/alphas as PEFT patterns."""
    import re

    paths = [t.path for t in targets]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    # 3x3 convs (LoCon) first: PEFT uses the first pattern that matches a module.
    for t in targets:
        if t.conv3x3 and (config.effective_conv_rank, config.effective_conv_alpha) != (config.rank, config.alpha):
            rank_pattern[re.escape(t.path)] = config.effective_conv_rank
            alpha_pattern[re.escape(t.path)] = config.effective_conv_alpha
    if is_unet:
        prefixes = {"down": r"down_blocks\..*", "mid": r"mid_block\..*", "up": r"up_blocks\..*"}
        for block, rank in (config.block_ranks or {}).items():
            rank_pattern[prefixes[block]] = int(rank)
        for block, alpha in (config.block_alphas or {}).items():
            alpha_pattern[prefixes[block]] = float(alpha)
    common = dict(target_modules=paths, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return methods.get(config.method).peft_config(config, common, total_steps)


class LoraNetwork:
    """The adapters injected into one pipeline: parameters for the optimizer, kohya state dict, removal."""

    def __init__(self, pipe, config: NetworkConfig, arch: str, targets: list[Target], tuners: dict):
        self.pipe = pipe
        self.config = config
        self.arch = arch
        self.targets = targets
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
                    conv_alpha=cfg.effective_conv_alpha if convs else None)

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


def inject_network(pipe, config: NetworkConfig | None = None, total_steps: int | None = None) -> LoraNetwork:
    """Add trainable adapters to `pipe.unet` and its text encoder(s), in place.

    Base weights are frozen; adapter parameters are fp32 and trainable (whatever the base dtype).
    `total_steps` is the training length, for methods that plan over it (AdaLoRA's rank schedule,
    unless `config.adalora_total_steps` says otherwise).
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
    targets = select_targets(pipe, arch, config.preset, config.train_unet, config.train_text_encoder)
    targets = methods.get(config.method).select(targets)
    if not targets:
        raise ValueError(f"preset {config.preset!r} found no modules to adapt in this {arch} pipeline.")

    grouped: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        grouped[t.component].append(t)
    tuners = {}
    for component, comp_targets in grouped.items():
        model = getattr(pipe, component)
        model.requires_grad_(False)
        peft_config = _peft_config(config, comp_targets, is_unet=component == "unet", total_steps=total_steps)
        on_meta = next(model.parameters()).device.type == "meta"
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(peft_config.peft_type).value]
        tuner = tuner_cls(model, peft_config, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=on_meta)
        tuners[component] = tuner
        for n, p in model.named_parameters():
            if ADAPTER_NAME in n.split("."):
                if p.dtype != torch.float32 and not on_meta:
                    p.data = p.data.float()
                p.requires_grad_(True)
    network = LoraNetwork(pipe, config, arch, targets, tuners)
    logger.info(
        "Injected %s (%s preset, rank %d, alpha %g) into %d modules: %s trainable parameters",
        config.method, config.preset, config.rank, config.alpha, len(targets), f"{network.num_parameters():,}",
    )
    return network
