"""sd-lora: train, share and apply LoRA adapters for Stable Diffusion, offline.

    import sd_lora
    pipe = sd_lora.load_base("models/sd15")
    sd_lora.apply_loras(pipe, [("loras/style.safetensors", 0.8)])

The public API is the names in `_PUBLIC` below. They are imported on first use (PEP 562), so
`import sd_lora` and `sd-lora --help` do not pay for torch, diffusers and transformers until a
function that needs them is called.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it. Adding a name to the API is one line here.
_PUBLIC = {
    # base models (models.py, convert_single_file.py)
    "ArchInfo": "sd_lora.models",
    "architecture_of": "sd_lora.models",
    "detect_architecture": "sd_lora.models",
    "load_base": "sd_lora.models",
    "load_vae": "sd_lora.models",
    "use_zero_terminal_snr": "sd_lora.models",
    "save_single_file": "sd_lora.convert_single_file",
    # applying LoRAs (stack/)
    "LoraSpec": "sd_lora.stack",
    "apply_loras": "sd_lora.stack",
    "loras": "sd_lora.stack",
    "parse_lora_prompt": "sd_lora.stack",
    "remove_loras": "sd_lora.stack",
    # generating images (generation.py)
    "generate": "sd_lora.generation",
    "GenerationResult": "sd_lora.generation",
    "GeneratedImage": "sd_lora.generation",
    "parameters_text": "sd_lora.generation",
    "settings_from_infotext": "sd_lora.generation",
    "SAMPLERS": "sd_lora.samplers",
    # LoRA files (formats/)
    "LoraFile": "sd_lora.formats",
    "edit_metadata": "sd_lora.formats.edit",
    "load_lora": "sd_lora.formats",
    "save_lora": "sd_lora.formats",
    # adapters (network/)
    "NetworkConfig": "sd_lora.network",
    "inject_network": "sd_lora.network",
    # captioning (caption/)
    "caption_folder": "sd_lora.caption",
    # training (config.py, data/, training/)
    "scan_dataset": "sd_lora.data.dataset",
    "ConfigError": "sd_lora.config",
    "DataConfig": "sd_lora.config",
    "TrainConfig": "sd_lora.config",
    "load_config": "sd_lora.config",
    "TrainingStopped": "sd_lora.training.loop",
    "train": "sd_lora.training.loop",
    # tools/
    "convert_lora": "sd_lora.tools",
    "extract_lora": "sd_lora.tools",
    "merge_into_model": "sd_lora.tools",
    "merge_loras": "sd_lora.tools",
    "resize_lora": "sd_lora.tools",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sd_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

