"""How adapters are injected into a pipeline and how their modules are named.

Names are re-exported lazily (PEP 562), so `sd_lora.network.config` imports without torch / PEFT.
"""

_EXPORTS = {"NetworkConfig": ".config", "LoraNetwork": ".inject", "inject_network": ".inject"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
