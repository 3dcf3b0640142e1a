"""Reading and writing LoRA files: kohya (default), LyCORIS, diffusers and PEFT formats.

Names are re-exported lazily (PEP 562): importing the package does not import torch.
"""

_EXPORTS = {
    "save_lora": ".kohya", "LoraFile": ".lora_file", "LoraModule": ".lora_file",
    "build_training_metadata": ".metadata", "compute_sshs_hashes": ".metadata",
    "LoraFormatError": ".read", "load_lora": ".read", "match_lora": ".read",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
