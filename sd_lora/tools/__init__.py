"""LoRA tools: merge (into a LoRA or a checkpoint), resize (SVD), extract (from two checkpoints),
convert (between formats). Every tool writes atomically, updates the metadata (rank, alpha, sources,
sshs hashes) and reports the error it introduced. See docs/tools.md."""

from ..formats.convert import convert_lora
from .extract import extract_lora
from .merge import merge_into_model, merge_loras
from .resize import resize_lora
from .svd import ModuleReport, ToolReport

__all__ = ["ModuleReport", "ToolReport", "convert_lora", "extract_lora", "merge_into_model", "merge_loras", "resize_lora"]
