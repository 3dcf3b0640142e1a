"""Optimizers, parameter groups (LoRA+), learning-rate schedules, and schedule-free's averaged weights.

Which optimizers exist and how each is driven is sd_lora/optimizers.py's table; this module builds
them for a run. The schedules are written out here as formulas (lr_factor) rather than taken from
diffusers' get_scheduler: diffusers has no minimum LR for cosine/linear, and its polynomial schedule
scales every group by the first group's LR (lr_end / optimizer.defaults["lr"]), which is wrong for a
text-encoder group with its own rate. With min ratio 0 the curves equal diffusers' (tests/test_optimizers.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch

from ..optimizers import OPTIMIZERS, ADAPTIVE_LOW_LR, OptimizerSpec, adafactor_relative_step, parse_optimizer_args

logger = logging.getLogger(__name__)

# PEFT's name of LoRA's up matrix B (LoRA, DoRA, AdaLoRA): the matrices LoRA+ gives the higher rate
# (Hayou et al. 2024; kohya's networks/lora.py prepare_optimizer_params matches its "lora_up" likewise)
LORA_UP = "lora_B"

def param_groups(unet_params, te_params, lr: float, te_lr: float, up_params=(), unet_ratio: float | None = None,
                 te_ratio: float | None = None, lr_weights: dict | None = None) -> list[dict]:
    """Separate groups so the UNet and text encoder LoRAs get their own learning rates.

    lr_weights (LoraNetwork.lr_weights(): the block LR weights): the UNet group is split per block,
    "unet_IN04" at lr x its weight (sd_lora/network/blocks.py).
    LoRA+: with a ratio, the up matrices among `up_params` move to groups of their own ("unet_plus",
    "text_encoder_plus", "unet_IN04_plus") at lr * ratio, as kohya's prepare_optimizer_params splits them.
    """
    from ..network.blocks import split_by_lr_weight

    up = {id(p) for p in up_params}
    groups = []

    def add(params, rate, name, ratio, lr_weight=1.0):
        params = list(params)
        plain = [p for p in params if ratio is None or id(p) not in up]
        plus = [p for p in params if ratio is not None and id(p) in up]
        extra = {"lr_weight": lr_weight} if lr_weight != 1.0 else {}  # a block's LR weight (for the step events)
        if plain:
            groups.append({"params": plain, "lr": rate, "name": name, **extra})
        if plus:
            groups.append({"params": plus, "lr": rate * ratio, "name": f"{name}_plus", **extra})

    if unet_params:
        for suffix, weight, params in split_by_lr_weight(unet_params, lr_weights):
            add(params, lr * weight, "unet" + suffix, unet_ratio, weight)
    if te_params and te_lr > 0:
        add(te_params, te_lr, "text_encoder", te_ratio)
    return groups


def network_param_groups(network, train_te: bool, cfg) -> list[dict]:
    """param_groups for a LoraNetwork and the config's rates and LoRA+ ratios."""
    unet_ratio = cfg.loraplus_unet_lr_ratio or cfg.loraplus_lr_ratio
    te_ratio = cfg.loraplus_text_encoder_lr_ratio or cfg.loraplus_lr_ratio
    up = [p for n, p in network.named_parameters() if LORA_UP in n.split(".")] if (unet_ratio or te_ratio) else []
    if (unet_ratio or te_ratio) and not up:
        raise ValueError(f"loraplus_lr_ratio: network.method {cfg.network.method!r} has no LoRA up (B) matrices to give the "
                         "higher rate; use method lora or dora, or leave the LoRA+ ratios unset")
    return param_groups(network.unet_parameters(), network.text_encoder_parameters() if train_te else [], cfg.unet_lr, cfg.te_lr,
                        up, unet_ratio, te_ratio, lr_weights=network.lr_weights())


def warmup_steps(value: float, total_steps: int) -> int:
    """lr_warmup_steps as a number of steps: below 1 it is a ratio of the run (kohya's get_scheduler_fix:
    int(ratio * steps)), from 1 on a count."""
    return int(value * total_steps) if 0 < value < 1 else int(value)


@dataclass
class OptimizerChoice:
    """The optimizer a run builds: its table entry, class and the keyword arguments it is given."""

    spec: OptimizerSpec
    cls: type
    kwargs: dict
    lr: float | None  # None: the optimizer sets its own step size (Adafactor's relative_step)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """ss_optimizer as kohya writes it (train_network.py: optimizer_name + "(" + args + ")", with
        train_util.get_optimizer's `module.Class` name and `k=v` joined by commas)."""
        name = f"{self.cls.__module__}.{self.cls.__name__}"
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{name}({args})" if args else name

    def build(self, groups: list[dict]):
        optimizer = self.cls(groups, lr=self.lr, **self.kwargs) if self.lr is not None else self.cls(groups, **self.kwargs)
        if self.spec.schedule_free:
            optimizer.train()  # schedule-free optimizers start in eval mode and refuse to step in it
        return optimizer

    @property
    def own_schedule(self) -> bool:
        """Adafactor with relative_step: its step size comes from its own formula (AdafactorSchedule reports it)."""
        return self.lr is None


def choose_optimizer(cfg, total_steps: int, device_type: str = "cpu") -> OptimizerChoice:
    """The optimizer class and arguments for `cfg` (its `optimizer`, `optimizer_args`, `weight_decay`,
    `lr`, `lr_warmup_steps`) on `device_type`."""
    spec = OPTIMIZERS[cfg.optimizer]
    warnings = []
    if spec.cuda_only and device_type != "cuda":
        warnings.append(f"{spec.name} needs CUDA (paged optimizer state); using {spec.cpu_fallback} on {device_type}")
        spec = OPTIMIZERS[spec.cpu_fallback]
    try:
        cls = spec.load()
    except ImportError as e:
        raise ValueError(f"optimizer {cfg.optimizer} needs {spec.package}: pip install {spec.package} (or use adamw)") from e
    # weight_decay is a key of its own; kohya users give it in optimizer_args, which then wins
    kwargs = {"weight_decay": cfg.weight_decay, **parse_optimizer_args(cfg.optimizer_args)}
    lr = cfg.unet_lr  # the config's lr, or this optimizer's default when unset
    if spec.adaptive and lr <= ADAPTIVE_LOW_LR:
        warnings.append(f"{spec.name} adapts its own step size and lr multiplies it: lr = {lr} is an AdamW-sized rate that "
                        "makes it learn almost nothing; set lr = 1.0 (and text_encoder_lr = 1.0 or unset)")
    if spec.schedule_free and "warmup_steps" not in kwargs:
        kwargs["warmup_steps"] = warmup_steps(cfg.lr_warmup_steps, total_steps)  # its warm-up replaces the schedule's
    if spec.name == "adafactor":
        # written out, as kohya does, so ss_optimizer says which mode ran
        kwargs = {"relative_step": adafactor_relative_step(kwargs), **{k: v for k, v in kwargs.items() if k != "relative_step"}}
        if kwargs["relative_step"]:
            lr = None
            if cfg.lr is not None or cfg.text_encoder_lr is not None:  # unset rates: nothing to say
                warnings.append("adafactor with relative_step: lr and text_encoder_lr are not used (it sets its own step size, "
                                "1e-2 / sqrt(step) at most); optimizer_args relative_step=False follows lr instead")
    return OptimizerChoice(spec, cls, kwargs, lr, warnings)


# ---- schedules ----------------------------------------------------------------------------------

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def lr_factor(name: str, step: int, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              min_ratio: float = 0.0) -> float:
    """The learning rate of `step` as a fraction of the set rate.

    Warm-up rises linearly from 0 over `warmup` steps (not for `constant`). After it, with
    p = (step - warmup) / (total - warmup) clamped to [0, 1] and m = min_ratio, the rate is
    m + (1 - m) * f(p), where f is 1 (constant), 1 - p (linear), (1 + cos(pi p)) / 2 (cosine),
    (1 + cos(pi ((cycles p) mod 1))) / 2 with f(1) = 0 (cosine_with_restarts: `cycles` full decays,
    each restarting at the top), (1 - p)^power (polynomial).
    """
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if name == "linear":
        f = 1.0 - p
    elif name == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif name == "cosine_with_restarts":
        f = 0.0 if p >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0)))
    elif name == "polynomial":
        f = (1.0 - p) ** power
    else:
        raise ValueError(f"lr_scheduler: unknown {name!r}; choose one of {', '.join(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * f


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0,
                   min_ratio: float = 0.0, adafactor_lr: float | None = None):
    """A LambdaLR following lr_factor (stepped once per optimizer step). `adafactor_lr`: the optimizer is
    Adafactor with relative_step, whose own AdafactorSchedule (transformers) reports the rate it uses."""
    if adafactor_lr is not None:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, adafactor_lr)
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler: unknown {name!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        return lr_factor(name, step, warmup_steps, total_steps, num_cycles, power, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_scheduler(cfg, optimizer, choice: OptimizerChoice, total_steps: int):
    """make_scheduler with the config's schedule keys."""
    warmup = 0 if choice.spec.schedule_free else warmup_steps(cfg.lr_warmup_steps, total_steps)
    return make_scheduler(cfg.lr_scheduler, optimizer, warmup, total_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
                          cfg.lr_scheduler_min_lr_ratio or 0.0, adafactor_lr=cfg.unet_lr if choice.own_schedule else None)


def applied_lr(optimizer, scheduler) -> float:
    """The first group's rate as the optimizer applies it, for the step events: Prodigy and D-Adaptation
    multiply lr by their estimate `d` (kept in the param group), so lr alone (1.0) says nothing. A block
    group's LR weight is divided out, so the event shows the run's rate, not one block's."""
    lr = scheduler.get_last_lr()[0]
    first = optimizer.param_groups[0]
    if first.get("lr_weight", 1.0) != 1.0:  # a block group (block LR weights): the rate before its weight
        lr = lr / first["lr_weight"]
    d = first.get("d")
    return lr * float(d) if d is not None else lr


def applied_lrs(optimizer, scheduler) -> dict[str, float]:
    """Each parameter group's rate as the optimizer applies it ({"unet": .., "text_encoder": ..}, LoRA+'s
    "_plus" and block groups by their names), x the adaptive estimate `d` where there is one, for the
    step events' `lrs`. Unlike applied_lr a block group keeps its LR weight: this is the rate it gets."""
    out = {}
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, scheduler.get_last_lr())):
        d = group.get("d")
        out[group.get("name", f"group{i}")] = lr * float(d) if d is not None else lr
    return out


@contextlib.contextmanager
def averaged_weights(optimizer, spec: OptimizerSpec, params: list[torch.nn.Parameter]):
    """Inside: the weights to sample and save. For a schedule-free optimizer these are the averaged x
    (optimizer.eval(); the training point y is an interpolation that is not the model to use: the
    schedulefree README, and kohya's train_network.py calling optimizer_eval_fn() before sampling and
    saving). After: the training weights restored bit for bit (a copy, since eval() then train() is
    not exact in floating point), so sampling or saving never changes the run. Other optimizers: a no-op.
    """
    if not spec.schedule_free:
        yield
        return
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
