"""Adapter methods (LoRA, DoRA, LoHa, LoKr, ...): one module per method, found through this registry.

Placeholder created by the restructuring lead; the methods helper replaces it. Contract kept for
the config and web UI: `trainable_method_names()` returns the names a user may train with, and
importing this package does not import torch.
"""


def trainable_method_names() -> tuple[str, ...]:
    return ("lora", "dora", "loha", "lokr", "adalora")
