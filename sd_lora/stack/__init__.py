"""Weighted LoRA stacks fused into diffusers pipelines (exact restore, fast switching) and the
`<lora:NAME:W>` prompt syntax. See docs/stack.md."""

from .cache import LoraCache, default_cache, set_cache_limit
from .fuse import AppliedStack, applied_stack, apply_loras, loras, remove_loras
from .prompt import PromptLora, available_loras, parse_lora_prompt, prompt_to_stack, resolve_lora_name
from .spec import LoraSpec

__all__ = [
    "AppliedStack", "LoraCache", "LoraSpec", "PromptLora", "applied_stack", "apply_loras", "available_loras",
    "default_cache", "loras", "parse_lora_prompt", "prompt_to_stack", "remove_loras", "resolve_lora_name",
    "set_cache_limit",
]
