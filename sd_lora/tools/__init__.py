"""LoRA tools: merge (into a LoRA or a checkpoint), resize (SVD), extract (from two checkpoints),
convert (between formats). Every tool writes atomically, updates the metadata (rank, alpha, sources,
sshs hashes) and reports the error it introduced. See docs/tools.md.

Names are re-exported lazily (PEP 562): importing the package does not import torch.
"""

_EXPORTS = {
    "convert_lora": "..formats.convert", "extract_lora": ".extract", "merge_into_model": ".merge",
    "merge_loras": ".merge", "resize_lora": ".resize", "ModuleReport": ".svd", "ToolReport": ".svd",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
