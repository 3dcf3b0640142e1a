"""Inject trainable adapters into a diffusers pipeline through PEFT, and read them out in kohya form.

PEFT does the layer work (LoRA / DoRA / LoHa / LoKr / AdaLoRA layers, merging, dtype handling);
this module decides *which* layers (presets.py), gives PEFT exact module paths plus rank/alpha
patterns, adds the two kohya regularisers PEFT's LoRA lacks (rank dropout, module dropout) as
forward hooks, and converts between PEFT's parameters and kohya's file keys:

  PEFT LoRA   lora_A.<adapter>.weight  ->  <kohya name>.lora_down.weight
              lora_B.<adapter>.weight  ->  <kohya name>.lora_up.weight
              scaling * r              ->  <kohya name>.alpha
              lora_magnitude_vector    ->  <kohya name>.dora_scale      (DoRA)
  PEFT LoHa   hada_w1_a ... hada_t2    ->  same names (PEFT follows LyCORIS)
  PEFT LoKr   lokr_w1 ... lokr_t2      ->  same names
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn as nn

from ..models import architecture_of
from .config import NetworkConfig
from .presets import Target, select_targets

logger = logging.getLogger(__name__)

ADAPTER_NAME = "sd_lora"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _peft_config(config: NetworkConfig, targets: list[Target], is_unet: bool):
    """The PEFT config for one component: exact target paths, ranks/alphas as PEFT patterns."""
    import re

    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig

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
    if config.method in ("lora", "dora"):
        return LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_dora=config.method == "dora",
            init_lora_weights=True, **common,
        )
    if config.method == "loha":
        return LoHaConfig(
            r=config.rank, alpha=config.alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
            init_weights=True, **common,
        )
    if config.method == "lokr":
        return LoKrConfig(
            r=config.rank, alpha=config.alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
            init_weights=True, **common,
        )
    if config.method == "adalora":
        total = config.adalora_total_steps or 1000
        target_r = config.adalora_target_rank or max(1, config.rank // 2)
        # PEFT's schedule: warm up at init_r for tinit steps, prune to target_r until total - tfinal.
        tinit, tfinal = max(1, total // 10), max(1, total // 5)
        if total - tinit - tfinal <= 0:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(
            init_r=config.rank, target_r=target_r, lora_alpha=config.alpha, lora_dropout=config.dropout,
            total_step=total, tinit=tinit, tfinal=tfinal, deltaT=1, target_modules=paths,
        )
    raise ValueError(f"unknown network method {config.method!r}")


class LoraNetwork:
    """The adapters injected into one pipeline: parameters for the optimizer, kohya state dict, removal."""

    def __init__(self, pipe, config: NetworkConfig, arch: str, targets: list[Target], tuners: dict):
        self.pipe = pipe
        self.config = config
        self.arch = arch
        self.targets = targets
        self._tuners = tuners  # component -> PEFT tuner (BaseTuner) kept for AdaLoRA's allocator
        self._hooks: list = []
        self._install_dropout_hooks()

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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- kohya rank / module dropout as hooks (PEFT's LoRA has only input dropout) --------------
    def _install_dropout_hooks(self) -> None:
        cfg = self.config
        if cfg.method not in ("lora", "dora") or (cfg.rank_dropout <= 0 and cfg.module_dropout <= 0):
            return  # LoHa/LoKr take both from their PEFT config; AdaLoRA rejects them in validate()
        for target in self.targets:
            layer = self._layer(target)
            if cfg.rank_dropout > 0:
                self._hooks.append(layer.lora_A[ADAPTER_NAME].register_forward_hook(_rank_dropout_hook(cfg.rank_dropout)))
            if cfg.module_dropout > 0:
                self._hooks.append(layer.lora_B[ADAPTER_NAME].register_forward_hook(_module_dropout_hook(cfg.module_dropout)))

    # -- AdaLoRA ---------------------------------------------------------------------------------
    def update_ranks(self, global_step: int) -> None:
        """AdaLoRA only: re-allocate ranks; call after backward() and before optimizer.zero_grad()."""
        if self.config.method == "adalora":
            for tuner in self._tuners.values():
                tuner.update_and_allocate(global_step)

    def regularization_loss(self) -> torch.Tensor | float:
        """AdaLoRA's orthogonality penalty (add it to the loss); 0 for the other methods."""
        if self.config.method != "adalora":
            return 0.0
        total, n = 0.0, 0
        for p_name, p in self._named_adapter_params():
            if "lora_A" in p_name or "lora_B" in p_name:
                para_cov = p @ p.T if "lora_A" in p_name else p.T @ p
                eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
                total = total + torch.norm(para_cov - eye, p="fro")
                n += 1
        return total / max(n, 1) * 0.1  # PEFT's default orth_reg_weight

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
            layer = self._layer(target)
            sd.update(_export_module(target, layer, self.config.method))
        return sd

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
            _import_module(target, self._layer(target), self.config.method, sd)

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


def _rank_dropout_hook(p: float):
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
    # kohya: skip the adapter of this module for the whole step with probability p.
    def hook(module, inputs, output):
        if module.training and torch.rand(1).item() < p:
            return output * 0.0
        return output

    return hook


def _kohya_dora_scale(magnitude: torch.Tensor, out_features: int, base_dim: int) -> torch.Tensor:
    # PEFT keeps (out,) for Linear and (1, out, 1, 1) for conv; LyCORIS/kohya store (out, 1[, 1, 1]).
    return magnitude.reshape(out_features, *[1] * (base_dim - 1))


def _export_module(target: Target, layer, method: str) -> dict[str, torch.Tensor]:
    name = target.kohya_name
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        # Meta tensors (full-size shape checks without weights) stay on meta; the rest go to CPU.
        out[f"{name}.{key}"] = t.float() if t.device.type == "meta" else t.to(device="cpu", dtype=torch.float32).clone()

    if method in ("lora", "dora"):
        put("lora_down.weight", layer.lora_A[ADAPTER_NAME].weight)
        put("lora_up.weight", layer.lora_B[ADAPTER_NAME].weight)
        put("alpha", torch.tensor(layer.scaling[ADAPTER_NAME] * layer.r[ADAPTER_NAME]))
        if method == "dora":
            base = layer.get_base_layer().weight
            put("dora_scale", _kohya_dora_scale(layer.lora_magnitude_vector[ADAPTER_NAME].weight, base.shape[0], base.dim()))
    elif method == "loha":
        for key in LOHA_KEYS:
            params = getattr(layer, key)
            if ADAPTER_NAME in params:
                put(key, params[ADAPTER_NAME])
        put("alpha", torch.tensor(float(layer.alpha[ADAPTER_NAME])))
    elif method == "lokr":
        for key in LOKR_KEYS:
            params = getattr(layer, key)
            if ADAPTER_NAME in params:
                put(key, params[ADAPTER_NAME])
        if f"{name}.lokr_w1_b" not in out and f"{name}.lokr_w2_b" not in out:
            # Both Kronecker factors full: LyCORIS/ComfyUI apply no alpha/rank scale, PEFT does.
            out[f"{name}.lokr_w2"] = out[f"{name}.lokr_w2"] * float(layer.scaling[ADAPTER_NAME])
        put("alpha", torch.tensor(float(layer.alpha[ADAPTER_NAME])))
    elif method == "adalora":
        # delta = B @ (A * E) * alpha / (r + 1e-5): keep the ranks the allocator left non-zero and
        # write a plain LoRA whose alpha / rank reproduces the same scale.
        a = layer.lora_A[ADAPTER_NAME].detach().float()
        e = layer.lora_E[ADAPTER_NAME].detach().float()
        b = layer.lora_B[ADAPTER_NAME].detach().float()
        keep = (e.flatten() != 0).nonzero().flatten()
        if keep.numel() == 0:
            # Untrained (PEFT starts E at zero) or every rank pruned: the delta is zero. Keep one
            # zero rank so every module stays in the file and the key set is stable.
            keep = torch.zeros(1, dtype=torch.long)
        scale = float(layer.scaling[ADAPTER_NAME]) / (float(layer.ranknum[ADAPTER_NAME].detach()) + 1e-5)
        put("lora_down.weight", (a * e)[keep])
        put("lora_up.weight", b[:, keep])
        put("alpha", torch.tensor(scale * keep.numel()))
    return out


def _import_module(target: Target, layer, method: str, sd: dict[str, torch.Tensor]) -> None:
    name = target.kohya_name

    def copy(param: torch.Tensor, key: str, factor: float = 1.0) -> None:
        with torch.no_grad():
            param.copy_((sd[f"{name}.{key}"].float() * factor).reshape(param.shape).to(param.dtype))

    if method in ("lora", "dora"):
        copy(layer.lora_A[ADAPTER_NAME].weight, "lora_down.weight")
        copy(layer.lora_B[ADAPTER_NAME].weight, "lora_up.weight")
        if method == "dora":
            copy(layer.lora_magnitude_vector[ADAPTER_NAME].weight, "dora_scale")
    elif method in ("loha", "lokr"):
        keys = LOHA_KEYS if method == "loha" else LOKR_KEYS
        full_lokr = method == "lokr" and ADAPTER_NAME not in layer.lokr_w1_b and ADAPTER_NAME not in layer.lokr_w2_b
        for key in keys:
            params = getattr(layer, key)
            if ADAPTER_NAME in params:
                factor = 1.0 / float(layer.scaling[ADAPTER_NAME]) if full_lokr and key == "lokr_w2" else 1.0
                copy(params[ADAPTER_NAME], key, factor)
    else:
        raise ValueError(f"loading kohya weights into a {method!r} network is not supported; use method 'lora'.")


def inject_network(pipe, config: NetworkConfig | None = None) -> LoraNetwork:
    """Add trainable adapters to `pipe.unet` and its text encoder(s), in place.

    Base weights are frozen; adapter parameters are fp32 and trainable (whatever the base dtype).
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
    if config.method == "adalora":
        # PEFT's AdaLoRA has no conv layer: SD1's 1x1 proj_in/proj_out and LoCon convs are left out.
        skipped = [t.kohya_name for t in targets if isinstance(t.module, nn.Conv2d)]
        if skipped:
            logger.warning("AdaLoRA adapts Linear layers only; %d conv modules are not trained (e.g. %s)", len(skipped), skipped[0])
        targets = [t for t in targets if isinstance(t.module, nn.Linear)]
    if not targets:
        raise ValueError(f"preset {config.preset!r} found no modules to adapt in this {arch} pipeline.")

    grouped: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        grouped[t.component].append(t)
    tuners = {}
    for component, comp_targets in grouped.items():
        model = getattr(pipe, component)
        model.requires_grad_(False)
        peft_config = _peft_config(config, comp_targets, is_unet=component == "unet")
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
