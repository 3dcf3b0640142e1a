"""Start a network from an existing LoRA file (`network.init_lora`; kohya's --network_weights).

The file is read by sd_lora.formats.read (kohya, LyCORIS, diffusers, PEFT), its modules are matched to
the network's targets by layer, and each module's tensors go into the PEFT layer through the method's
import (`Method.load`). Nothing is adapted silently: kohya's train_network.py loads with
load_state_dict(strict=False) and "assumes that the alpha is not changed" (its FIXME at L711-714,
48d368f); here the architecture, the method, the module set and every module's shapes and alpha must
fit, and the first misfit is named with the setting to change. A 0-step continuation therefore saves
the file it started from (tests/test_blocks.py).
"""

from __future__ import annotations

import logging
import math

from .. import methods
from ..models import unread_text_encoder_layers
from .inject import ADAPTER_NAME
from .naming import module_index
from .presets import _TE_LAYER

logger = logging.getLogger(__name__)


class InitLoraError(ValueError):
    """init_lora does not fit the network; the message names the first module and what to change."""


def _what_sets_rank(target, network, rank: int) -> str:
    """'network.rank to 8' and where else the module's rank comes from."""
    cfg = network.config
    if target.component != "unet":
        return f"network.rank to {rank} (text-encoder modules)"
    from .blocks import block_label

    block = block_label(target.block_index, network.arch) if target.block_index is not None else None
    entry = f" (or block {block}'s entry of {{}})" if block else ""
    if target.conv3x3:
        return f"network.conv_rank to {rank}" + entry.format("conv_block_dims")
    if cfg.block_dims is not None or cfg.block_ranks:
        return f"block {block}'s rank in network.block_dims / block_ranks to {rank}"
    return f"network.rank to {rank}" + entry.format("block_dims")


def _what_sets_alpha(target, network) -> str:
    if target.component == "unet" and target.conv3x3:
        return "network.conv_alpha (or conv_block_alphas)"
    return "network.alpha" + (" (or block_alphas)" if target.component == "unet" else "")


def _method_hint(kind: str, has_dora: bool) -> str:
    if has_dora:
        return "dora"
    return {"lora": "lora"}.get(kind, kind)


def load_init_lora(network, path) -> int:
    """Copy the LoRA file at `path` into `network`'s adapters; the number of modules loaded.

    Raises InitLoraError when the file was made for another architecture, with another method, or for
    other modules / ranks / alphas than the network has.
    """
    from ..formats.read import LoraFormatError, check_arch, load_lora

    what = f"network.init_lora: {path}"
    try:
        lora = load_lora(path)
        check_arch(lora, network.arch)
    except FileNotFoundError:
        raise InitLoraError(f"{what} does not exist; set it to a LoRA .safetensors file") from None
    except LoraFormatError as e:
        raise InitLoraError(f"network.init_lora: {e}") from None

    method = network.method
    if not method.loads_weights:
        raise InitLoraError(f"{what}: network.method {method.name!r} cannot start from saved weights (its ranks are "
                            "allocated while it trains); use method \"lora\" to continue a LoRA")
    pipe = network.pipe
    index = module_index(pipe, network.arch)
    by_layer = {(t.component, t.path): t for t in network.targets}
    matched: dict[str, object] = {}  # target kohya name -> file module
    for name, module in lora.modules.items():
        entry = index.get(name)
        if entry is None:
            raise InitLoraError(f"{what}: its module {name} has no layer in this {network.arch} model; the file was "
                                "trained on another base model (use that one, or another file)")
        component, layer_path = entry[0], entry[1]
        target = by_layer.get((component, layer_path))
        if target is None:
            te_layer = _TE_LAYER.match(layer_path) if component != "unet" else None
            model = getattr(pipe, component)
            if te_layer and int(te_layer[1]) in unread_text_encoder_layers(network.arch, component, model.config.num_hidden_layers):
                # a layer the UNet's conditioning never reads (SDXL CLIP-L's last, kohya writes it): no effect
                logger.info("init_lora: %s skipped (text-encoder layer the conditioning does not read)", name)
                continue
            raise InitLoraError(
                f"{what}: the file has a module for {name}, which this network does not adapt (preset "
                f"{network.config.preset!r}, train_unet={network.config.train_unet}, train_text_encoder="
                f"{network.config.train_text_encoder}, a block dim or LR weight of 0?); use the settings of the run "
                "that wrote it (its preset: 'full' adapts the ResNet convs, 'attention' only attention)")
        # a module's kind: the file's method (LoRA / LoHa / LoKr ...; DoRA and AdaLoRA files are LoRA files)
        file_method = _method_hint(module.kind, module.has_dora)
        wants_dora = getattr(method, "use_dora", False)
        if module.kind != method.kind or module.has_dora != bool(wants_dora):
            fix = (f"set network.method = \"{file_method}\"" if file_method in methods.trainable_method_names()
                   else f"{file_method} files can be applied but not trained here")
            raise InitLoraError(f"{what}: {name} is a {file_method} module and network.method is {method.name!r}; {fix}")
        matched[target.kohya_name] = module
    missing = [t for t in network.targets if t.kohya_name not in matched]
    if missing:
        raise InitLoraError(
            f"{what}: the file has no module for {missing[0].kohya_name} ({len(missing)} of the network's "
            f"{len(network.targets)} modules are missing); use the preset and train_unet / train_text_encoder of the "
            "run that wrote it (a file without text-encoder modules: train_text_encoder = false)")

    for target in network.targets:
        layer = network._layer(target)
        module = matched[target.kohya_name]
        own = method.export(layer, ADAPTER_NAME)
        file_t = module.tensors
        extra = sorted(set(file_t) - set(own) - {"alpha"})
        if extra:
            raise InitLoraError(f"{what}: {target.kohya_name} has {', '.join(extra)}, which network.method "
                                f"{method.name!r} does not train (e.g. a CP-decomposed LoCon's lora_mid)")
        file_rank, own_rank = module.rank, method.rank(own)
        if file_rank is not None and own_rank is not None and file_rank != own_rank:
            raise InitLoraError(f"{what}: {target.kohya_name} has rank {file_rank} in the file and {own_rank} in this "
                                f"network; set {_what_sets_rank(target, network, file_rank)}")
        for suffix, tensor in own.items():
            if suffix == "alpha":
                continue
            if suffix not in file_t or file_t[suffix].numel() != tensor.numel():
                got = tuple(file_t[suffix].shape) if suffix in file_t else "nothing"
                axis = " (DoRA magnitudes: network.dora_axis \"input\" is (1, in), \"output\" (out, 1))" if suffix == "dora_scale" else ""
                raise InitLoraError(f"{what}: {target.kohya_name}.{suffix} is {got} in the file and {tuple(tensor.shape)} "
                                    f"in this network; use the method, rank and factor settings of the run that wrote it{axis}")
        # no alpha in a file means alpha = rank (scale 1), as kohya and A1111 read it
        file_alpha = module.alpha if module.alpha is not None else float(file_rank or 1)
        own_alpha = float(own["alpha"])
        if not math.isclose(file_alpha, own_alpha, rel_tol=1e-3, abs_tol=1e-6):
            raise InitLoraError(f"{what}: {target.kohya_name} has alpha {file_alpha:g} in the file and {own_alpha:g} in "
                                f"this network; set {_what_sets_alpha(target, network)} to {file_alpha:g}")
    for target in network.targets:
        try:
            method.load(network._layer(target), ADAPTER_NAME, matched[target.kohya_name].tensors)
        except ValueError as e:  # (a method's own misfit, e.g. a DoRA magnitude on the other axis)
            raise InitLoraError(f"{what}: {target.kohya_name}: {e}") from None
    logger.info("init_lora: %d modules loaded from %s", len(network.targets), path)
    return len(network.targets)
