"""Reading and writing LoRA files: kohya (default), LyCORIS, diffusers and PEFT formats."""

from .lora_file import LoraFile, LoraModule  # noqa: F401
