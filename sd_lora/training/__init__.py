"""The LoRA trainer: loop, loss, optimizers, checkpoints, samples, events, report.

`train`, `TrainingStopped` and `TrainingOutOfMemory` come from loop.py on first use (PEP 562), so
the torch-free parts (events.py's schema, artifacts, the web UI's event reader) import without torch.
"""

_LAZY = {"train": "loop", "TrainingStopped": "loop", "TrainingOutOfMemory": "loop"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sd_lora.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
