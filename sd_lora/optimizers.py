"""The optimizers a run can use: one table, read by the config (choices, checks) and the trainer.

Every optimizer comes from a kept library, none is re-implemented here. An entry says where the class
is, which package installs it, and how it must be driven:

    adaptive        finds its own step size (D-Adaptation, Prodigy): `lr` multiplies it, so 1.0 is the
                    usual value and an AdamW-sized lr (1e-4) makes it learn nearly nothing
    schedule_free   averages its iterates instead of following a schedule (schedulefree): the LR
                    schedule stays constant, its warm-up is the optimizer's own `warmup_steps`, and the
                    weights to sample and save are the averaged ("eval") ones
    cuda_only       paged optimizer state needs CUDA; elsewhere the entry named by `cpu_fallback` runs
    default_lr      the rate a run uses when the config leaves `lr` unset: our usual LoRA rate 1e-4, and
                    for the adaptive ones the multiplier of their own estimate, 1.0 (their documented
                    default: prodigyopt's and dadaptation's `lr=1.0`, kohya's advice for both)

CAME comes from `pytorch-optimizer` (kozistr), not `came-pytorch`: the former is released every few
weeks and tested against current torch, the latter has had one release (0.1.3, 2023).

Keyword arguments (`optimizer_args`) are checked against the class signature, so the error names what
the installed version accepts. Torch-free until a signature is asked for (the config imports this).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # the config value (kohya's optimizer_type spellings match it loosely: AdamW8bit, Prodigy, ...)
    module: str  # where the class is imported from
    cls: str
    package: str  # what `pip install` needs
    adaptive: bool = False
    schedule_free: bool = False
    cuda_only: bool = False
    cpu_fallback: str | None = None
    default_lr: float = 1e-4

    def load(self):
        """The optimizer class (imports its library)."""
        return getattr(importlib.import_module(self.module), self.cls)

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module.split(".")[0]) is not None


def _bnb(name: str, cls: str, paged_of: str | None = None) -> OptimizerSpec:
    # bitsandbytes 0.50: optimizer state in 8 bits (~75 % less optimizer memory)
    return OptimizerSpec(name, "bitsandbytes.optim", cls, "bitsandbytes", cuda_only=paged_of is not None, cpu_fallback=paged_of)


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("adamw", "torch.optim", "AdamW", "torch"),
    _bnb("adamw8bit", "AdamW8bit"),
    _bnb("lion8bit", "Lion8bit"),
    _bnb("ademamix8bit", "AdEMAMix8bit"),
    _bnb("paged_adamw8bit", "PagedAdamW8bit", "adamw8bit"),
    _bnb("paged_lion8bit", "PagedLion8bit", "lion8bit"),
    _bnb("paged_ademamix8bit", "PagedAdEMAMix8bit", "ademamix8bit"),
    OptimizerSpec("prodigy", "prodigyopt", "Prodigy", "prodigyopt", adaptive=True, default_lr=1.0),
    OptimizerSpec("dadapt_adam", "dadaptation", "DAdaptAdam", "dadaptation", adaptive=True, default_lr=1.0),
    OptimizerSpec("adamw_schedulefree", "schedulefree", "AdamWScheduleFree", "schedulefree", schedule_free=True),
    OptimizerSpec("adafactor", "transformers.optimization", "Adafactor", "transformers"),
    OptimizerSpec("came", "pytorch_optimizer", "CAME", "pytorch-optimizer"),
)}

# kohya warns below this lr for D-Adaptation / Prodigy (library/train_util.py get_optimizer, sd-scripts 48d368f)
ADAPTIVE_LOW_LR = 0.1
# Not keyword arguments a user passes: the trainer gives the parameters and the rate.
_NOT_ARGS = ("self", "params", "lr")


def spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS[name]


def default_lr(name: str) -> float:
    """The rate of a run that sets no `lr` (an unknown name: AdamW's, the config check reports the name)."""
    return OPTIMIZERS[name].default_lr if name in OPTIMIZERS else OPTIMIZERS["adamw"].default_lr


def default_lr_text() -> str:
    """default_lr in words, for the `lr` key's help: '1e-4; 1.0 for prodigy, dadapt_adam'."""
    other = {}
    for s in OPTIMIZERS.values():
        if s.default_lr != OPTIMIZERS["adamw"].default_lr:
            other.setdefault(s.default_lr, []).append(s.name)
    return _rate(OPTIMIZERS["adamw"].default_lr) + "".join(f"; {_rate(lr)} for {', '.join(n)}" for lr, n in other.items())


def _rate(v: float) -> str:
    return f"{v:.0e}".replace("e-0", "e-") if v < 0.01 else repr(v)  # 1e-4, 1.0 (as the docs write them)


@lru_cache(maxsize=None)
def accepted_args(name: str) -> tuple[str, ...]:
    """The keyword arguments the installed class of optimizer `name` takes (from its signature)."""
    sig = inspect.signature(spec(name).load())
    return tuple(p.name for p in sig.parameters.values()
                 if p.name not in _NOT_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def parse_value(text: str):
    """A value as kohya reads `--optimizer_args` (ast.literal_eval: `0.9,0.99` is a tuple, `True` a bool);
    a bare word that is no Python literal stays a string."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_optimizer_args(value) -> dict:
    """optimizer_args as the optimizer gets them, from a TOML table ({betas = [0.9, 0.99]}) or a list of
    kohya-style `key=value` words (["betas=0.9,0.99", "weight_decay=0.01"], the CLI's and kohya TOMLs' form).

    Raises ValueError naming the word that is not `key=value`.
    """
    if not value:
        return {}
    if isinstance(value, dict):
        items = value.items()
    else:
        pairs = []
        for word in value:
            if not isinstance(word, str) or "=" not in word or not word.split("=", 1)[0].strip():
                raise ValueError(f"{word!r} is not key=value; write e.g. \"betas=0.9,0.99\" \"weight_decay=0.01\"")
            k, v = word.split("=", 1)
            pairs.append((k.strip(), parse_value(v)))
        items = pairs
    # TOML has no tuples: betas = [0.9, 0.99] arrives as a list; the optimizers index or unpack it either way,
    # and a tuple is what kohya's literal_eval gives (and what ss_optimizer then shows)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in items}


def problems(name: str, optimizer_args, lr: float, lr_scheduler: str, lr_warmup_steps: float) -> list[str]:
    """What is wrong with this optimizer choice, as 'key: problem; fix' lines ([] when fine).

    Imports the optimizer's library only when there are optimizer_args to check against its signature.
    """
    if name not in OPTIMIZERS:  # the generic choice check reports it
        return []
    s, e = spec(name), []
    if not s.installed:
        return [f"optimizer: {name} needs {s.package} (pip install {s.package}), or use optimizer = \"adamw\""]
    try:
        args = parse_optimizer_args(optimizer_args)
    except ValueError as err:
        return [f"optimizer_args: {err}"]
    if args:
        accepted = accepted_args(name)
        unknown = [k for k in args if k not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], accepted, n=1)
            e.append(f"optimizer_args: {name} ({s.module}.{s.cls}) takes no argument {', '.join(map(repr, unknown))}"
                     + (f" (did you mean {close[0]!r}?)" if close else "") + f"; it accepts {', '.join(accepted)}")
        if "lr" in args:
            e.append("optimizer_args: set the learning rate with lr (and text_encoder_lr), not optimizer_args.lr")
    if s.schedule_free and lr_scheduler != "constant":
        e.append(f"lr_scheduler: {name} is schedule-free (it replaces the schedule by averaging); set lr_scheduler = "
                 "\"constant\" (lr_warmup_steps becomes its own warm-up)")
    if name == "adafactor" and adafactor_relative_step(args) and lr_scheduler != "constant":
        e.append("lr_scheduler: adafactor with relative_step = true sets its own step size (AdafactorSchedule); set "
                 "lr_scheduler = \"constant\", or optimizer_args relative_step=False to follow lr and the schedule")
    if name == "adafactor" and adafactor_relative_step(args):
        if lr_warmup_steps:
            e.append("lr_warmup_steps: adafactor with relative_step = true has no schedule to warm up; use optimizer_args "
                     "warmup_init=True (its own warm-up), or set lr_warmup_steps = 0")
    elif lr_warmup_steps and lr_scheduler == "constant" and not s.schedule_free:
        # diffusers' constant schedule ignored a warm-up without a word (kohya refuses it likewise)
        e.append("lr_warmup_steps: lr_scheduler = \"constant\" has no warm-up; use lr_scheduler = \"constant_with_warmup\" "
                 "(or another schedule), or set lr_warmup_steps = 0")
    return e


def adafactor_relative_step(args: dict) -> bool:
    """Adafactor's relative_step: on unless turned off; warmup_init needs it, so it turns it on (as kohya does)."""
    return bool(args.get("relative_step", True)) or bool(args.get("warmup_init", False))
