"""How adapters are injected into a pipeline and how their modules are named.

The names below load on first use (PEP 562), so `sd_lora.network.config` imports without torch/peft.
"""

from .config import NetworkConfig  # noqa: F401  (torch-free)

_LAZY = {"LoraNetwork": ".inject", "inject_network": ".inject"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
