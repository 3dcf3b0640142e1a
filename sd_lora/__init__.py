"""sd-lora: train, share and apply LoRA adapters for Stable Diffusion, offline.

Public API (import from here): load_base, load_vae, use_zero_terminal_snr, architecture_of, and the names added by each part
(train/TrainConfig, load_lora/save_lora, apply_loras/remove_loras/loras).
"""

__version__ = "0.1.0"

from .models import ArchInfo, architecture_of, detect_architecture, load_base, load_vae, use_zero_terminal_snr  # noqa: F401
from .convert_single_file import save_single_file  # noqa: F401,E402
from .stack import LoraSpec, apply_loras, loras, parse_lora_prompt, remove_loras  # noqa: F401
from .generation import GeneratedImage, GenerationResult, generate, parameters_text  # noqa: F401,E402
from .formats import LoraFile, load_lora, save_lora  # noqa: F401,E402
from .network import NetworkConfig, inject_network  # noqa: F401,E402
from .caption import caption_folder  # noqa: F401,E402
from .config import ConfigError, DataConfig, TrainConfig, load_config  # noqa: F401,E402
from .training.loop import TrainingStopped, train  # noqa: F401,E402
from .tools import extract_lora, merge_into_model, merge_loras, resize_lora  # noqa: F401,E402
