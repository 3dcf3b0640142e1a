"""Adapter methods (LoRA, DoRA, AdaLoRA, LoHa, LoKr, full, OFT): one module per method, found here.

Each module defines `METHOD`, a sd_lora.methods.base.Method that owns everything about its method:
file key suffixes and when a module is complete, rank and scale, the delta W and its shape, the PEFT
config it injects and the export / import of PEFT layers, `ss_network_module` / `ss_network_args`,
its size estimate, and whether it merges / resizes exactly. Readers, the stack loader, the tools,
the trainer and metadata ask this registry; no other module branches on a method's name.

Training looks a method up by name (`get("dora")`); reading by the keys a file's module holds
(`for_keys({"hada_w1_a", ...})`). Importing this package does not import torch: a method module is
imported the first time it is asked for. To add a method: write its module, add its line below.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import import_module

# name       module      trainable   (reading tries the methods in this order)
_TABLE = (
    ("lora",    "lora",     True),   # LoRA; LoCon on convs; CP-LoCon (lora_mid) when read
    ("dora",    "dora",     True),   # LoRA + weight decomposition (files: LoRA + dora_scale)
    ("loha",    "loha",     True),   # LyCORIS Hadamard product
    ("lokr",    "lokr",     True),   # LyCORIS Kronecker product
    ("adalora", "adalora",  True),   # LoRA with PEFT's rank allocation (files: plain LoRA)
    ("full",    "full",     False),  # LyCORIS full / diff: read and apply
    ("oft",     "oft",      False),  # kohya / LyCORIS OFT: read and apply
)


def trainable_method_names() -> tuple[str, ...]:
    """The `network.method` values a user may train with (torch-free)."""
    return tuple(name for name, _, trainable in _TABLE if trainable)


def method_names() -> tuple[str, ...]:
    return tuple(name for name, _, _ in _TABLE)


@cache
def get(name: str):
    """The Method registered as `name`; a ValueError lists the choices for any other name."""
    for entry, module, _ in _TABLE:
        if entry == name:
            method = import_module(f"{__name__}.{module}").METHOD
            if method.name != name:
                raise RuntimeError(f"sd_lora/methods/{module}.py defines method {method.name!r}, its registry line says {name!r}")
            return method
    raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(method_names())}.")


@cache
def readers() -> tuple:
    """The methods whose own keys identify a file module (DoRA / AdaLoRA files are LoRA files)."""
    return tuple(m for m in map(get, method_names()) if m.kind == m.name)


@cache
def file_suffixes() -> tuple[str, ...]:
    """Every key suffix a kohya / LyCORIS module may have, the shared ones (alpha, dora_scale) included."""
    from .base import SHARED_SUFFIXES

    return tuple(s for m in readers() for s in m.suffixes) + SHARED_SUFFIXES


@cache
def peft_keys() -> tuple[tuple[re.Pattern, str | None], ...]:
    """(regex on a PEFT / diffusers key's end, our suffix or None for group 1) of every method, then alpha."""
    return tuple(p for m in map(get, method_names()) for p in m.peft_keys) + ((re.compile(r"\.alpha$"), "alpha"),)


def for_keys(suffixes):
    """The reader of a file module with these key suffixes (the first reader, LoRA, when none is
    recognised: such a module is then reported as incomplete)."""
    present = set(suffixes)
    for m in readers():
        if present & set(m.suffixes):
            return m
    return readers()[0]


def network_module_of(kinds) -> str:
    """ss_network_module for a file whose modules are of these kinds (kohya's only if all are)."""
    from .base import LYCORIS_NETWORK

    modules = {get(k).network_module for k in kinds}
    return modules.pop() if len(modules) == 1 else LYCORIS_NETWORK


@cache
def name_prefixes() -> dict[str, str]:
    """Module-name prefixes some writers use instead of kohya's -> the kohya prefix (e.g. oft_unet_)."""
    return {old: new for m in readers() for old, new in m.name_prefixes.items()}
