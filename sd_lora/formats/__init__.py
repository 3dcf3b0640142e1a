"""Reading and writing LoRA files: kohya (default), LyCORIS, diffusers and PEFT formats."""

from .kohya import save_lora  # noqa: F401
from .lora_file import LoraFile, LoraModule  # noqa: F401
from .metadata import build_training_metadata, compute_sshs_hashes  # noqa: F401
from .read import LoraFormatError, load_lora, match_lora  # noqa: F401
