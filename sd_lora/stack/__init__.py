"""Weighted LoRA stacks fused into diffusers pipelines (exact restore, fast switching), the
`<lora:NAME:W>` prompt syntax and LoRA Block Weight's `lbw=` block weights. See docs/stack.md.

Names are re-exported lazily (PEP 562): importing the package does not import torch.
"""

_EXPORTS = {
    "LoraCache": ".cache", "default_cache": ".cache", "set_cache_limit": ".cache",
    "AppliedStack": ".fuse", "applied_stack": ".fuse", "apply_loras": ".fuse", "loras": ".fuse", "remove_loras": ".fuse",
    "PromptLora": ".prompt", "available_loras": ".prompt", "parse_lora_prompt": ".prompt", "prompt_to_stack": ".prompt",
    "resolve_lora_name": ".prompt",
    "LoraSpec": ".spec",
    "BLOCK_PRESETS": ".block_weights", "block_multipliers": ".block_weights", "normalize_block_weights": ".block_weights",
    "parse_block_weights": ".block_weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
