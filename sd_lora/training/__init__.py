"""The LoRA trainer: loop, loss, optimizers, checkpoints, samples, events, report."""

from .loop import TrainingOutOfMemory, TrainingStopped, train  # noqa: F401
