"""Training configuration: typed dataclasses, TOML loading, and validation that reports every error at once.

One place holds every training setting (the anti-example is a trainer whose behaviour is spread over
hundreds of argparse defaults). The same keys work in three places:

    TOML file            CLI flag               Python
    lr = 1e-4            --lr 1e-4              TrainConfig(lr=1e-4)
    [data] path = "x"    --data x               TrainConfig(data=DataConfig(path="x"))
    [network] rank = 16  --rank 16              TrainConfig(network=NetworkConfig(rank=16))

`TrainConfig.validate()` checks everything that can be checked without loading a model (paths,
ranges, option conflicts, optional packages) and returns all problems, each naming the key and the
fix, so a mistake never surfaces after an hour of latent caching.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit")
MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LATENT_CACHE = ("ram", "disk", "none")


class ConfigError(ValueError):
    """A training config with problems. `errors` lists them all; str() shows one per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in the training config:\n" + "\n".join(f"  - {e}" for e in self.errors)
        )


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class DataConfig:
    """Where the images are and how they become training batches."""

    path: str = field(default="", metadata=_help("dataset folder: kohya `N_name` sub-folders (N = repeats) or a folder of images", flag="--data"))
    reg_path: str | None = field(default=None, metadata=_help("regularization (class) images folder, same layout; enables prior preservation"))
    prior_loss_weight: float = field(default=1.0, metadata=_help("loss weight of regularization images"))
    caption_extension: str = field(default=".txt", metadata=_help("caption side-file extension tried first (.txt and .caption are also read)"))
    instance_prompt: str | None = field(default=None, metadata=_help("caption for images without a caption file (default: the folder name after `N_`)"))
    class_prompt: str | None = field(default=None, metadata=_help("caption for regularization images without a caption file"))
    repeats: int = field(default=1, metadata=_help("repeats for folders not named `N_name`"))
    resolution: int = field(default=512, metadata=_help("training resolution: bucket area <= resolution^2"))
    buckets: bool = field(default=True, metadata=_help("aspect-ratio buckets (false: center-crop everything to a square)"))
    bucket_step: int = field(default=64, metadata=_help("bucket sides are multiples of this"))
    upscale: bool = field(default=False, metadata=_help("upscale small images to the full bucket area"))
    shuffle_captions: bool = field(default=False, metadata=_help("shuffle comma-separated caption tags each step"))
    keep_tokens: int = field(default=0, metadata=_help("with shuffle_captions: number of leading tags kept in place"))
    caption_dropout: float = field(default=0.0, metadata=_help("probability of training an image with an empty caption"))
    flip: bool = field(default=False, metadata=_help("random horizontal flip"))
    cache_latents: str = field(default="ram", metadata=_help("latent cache: ram | disk | none (none: VAE-encode every step)"))
    cache_dir: str | None = field(default=None, metadata=_help("disk cache folder (default: <data>/.sd-lora-cache)"))
    cache_text: bool = field(default=True, metadata=_help("cache text-encoder outputs when the text encoder is frozen"))
    max_image_pixels: int = field(default=64_000_000, metadata=_help("images with more pixels are skipped (decompression-bomb guard)"))


@dataclass
class TrainConfig:
    """Everything `sd_lora.train` needs. Only `model`, `data.path` and `output` have no usable default."""

    model: str = field(default="", metadata=_help("base model: diffusers folder or .safetensors file"))
    output: str = field(default="", metadata=_help("output LoRA file (.safetensors)"))
    data: DataConfig = field(default_factory=DataConfig)
    network: Any = None  # sd_lora.network.config.NetworkConfig; filled in __post_init__

    steps: int | None = field(default=None, metadata=_help("optimizer steps to train (or use epochs)"))
    epochs: int | None = field(default=None, metadata=_help("epochs to train (or use steps)"))
    batch_size: int = field(default=1, metadata=_help("images per batch per process"))
    gradient_accumulation: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=1e-4, metadata=_help("UNet LoRA learning rate"))
    text_encoder_lr: float | None = field(default=None, metadata=_help("text-encoder LoRA learning rate (default: lr)"))
    optimizer: str = field(default="adamw", metadata=_help("adamw | adamw8bit | lion8bit | paged_adamw8bit | paged_lion8bit"))
    weight_decay: float = field(default=1e-2, metadata=_help("optimizer weight decay"))
    lr_scheduler: str = field(default="constant", metadata=_help("diffusers get_scheduler name: " + " | ".join(SCHEDULERS)))
    lr_warmup_steps: int = field(default=0, metadata=_help("learning-rate warm-up steps"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: off)"))
    mixed_precision: str = field(default="no", metadata=_help("no | fp16 | bf16"))
    base_precision: str | None = field(default=None, metadata=_help(
        "storage of the frozen UNet/text-encoder weights: fp32 | fp16 | bf16 | fp8 | nf4 | int8 (nf4/int8: CUDA + "
        "bitsandbytes); upcast per layer to the mixed-precision dtype. Default: the mixed-precision dtype"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("trade compute for memory"))
    min_snr_gamma: float | None = field(default=None, metadata=_help("min-SNR loss weighting gamma (5 is usual)"))
    noise_offset: float = field(default=0.0, metadata=_help("noise offset (0.05-0.1 helps very dark/bright images)"))
    prediction_type: str | None = field(default=None, metadata=_help("override the model's prediction type: epsilon | v_prediction"))
    zero_terminal_snr: bool = field(default=False, metadata=_help(
        "rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2024; kohya --zero_terminal_snr): the "
        "model learns to start from pure noise. Needs a v-prediction model (or prediction_type = \"v_prediction\")"))
    vae: str | None = field(default=None, metadata=_help(
        "replacement VAE for latent caching and samples: a diffusers VAE folder (or a model folder with vae/) or a "
        "single .safetensors VAE file, e.g. madebyollin's sdxl-vae-fp16-fix for fp16 SDXL. Default: the base model's"))
    seed: int = field(default=42, metadata=_help("random seed (data order, noise, timesteps)"))

    save_every: int | None = field(default=None, metadata=_help("save a LoRA file + resumable checkpoint every N steps"))
    save_every_epochs: int | None = field(default=None, metadata=_help("save every N epochs"))
    keep_checkpoints: int = field(default=3, metadata=_help("resumable checkpoints kept (newest); 0 keeps all"))
    checkpoint_dir: str | None = field(default=None, metadata=_help("checkpoint folder (default: <output stem>-checkpoints next to the output)"))
    resume: str | None = field(default=None, metadata=_help("'latest' (newest checkpoint of this output) or a checkpoint folder"))

    sample_every: int | None = field(default=None, metadata=_help("render sample images every N steps"))
    sample_prompts: list[str] | str | None = field(default=None, metadata=_help("prompt lines, or a file of them; kohya options --n --w --h --s --d --l"))
    sample_steps: int = field(default=20, metadata=_help("default sampler steps for sample prompts"))
    sample_guidance_rescale: float | None = field(default=None, metadata=_help(
        "guidance rescale (0-1) for sample images; keeps high CFG from over-exposing zero-terminal-SNR models. "
        "Default: 0.7 with zero_terminal_snr, else 0"))

    cpu_threads: int | None = field(default=None, metadata=_help("torch CPU threads for this run (default: torch's choice); 1 is much faster for tiny models on a busy machine"))
    log_every: int = field(default=1, metadata=_help("write a step event every N steps"))
    tensorboard: bool = field(default=False, metadata=_help("also log to TensorBoard (needs the tensorboard package)"))
    comment: str = field(default="", metadata=_help("ss_training_comment stored in the file"))

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if self.network is None or isinstance(self.network, dict):
            from .network.config import NetworkConfig

            self.network = NetworkConfig(**(self.network or {}))

    # ---- derived values -------------------------------------------------------------------------
    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def checkpoint_root(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = self.output_path
        return out.parent / f"{out.stem}-checkpoints"

    @property
    def events_path(self) -> Path:
        return self.output_path.parent / f"{self.output_path.stem}.events.jsonl"

    @property
    def stop_file(self) -> Path:
        """Create this file to stop the run with a resumable checkpoint (checked every step)."""
        return self.checkpoint_root / "STOP"

    @property
    def te_lr(self) -> float:
        return self.lr if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def guidance_rescale(self) -> float:
        """The guidance rescale of sample images (0.7 is the paper's value for zero-terminal-SNR models)."""
        if self.sample_guidance_rescale is not None:
            return self.sample_guidance_rescale
        return 0.7 if self.zero_terminal_snr else 0.0

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = {g.name: getattr(v, g.name) for g in fields(v)} if is_dataclass(v) else v
        return out

    # ---- validation -----------------------------------------------------------------------------
    def validate(self, check_paths: bool = True) -> list[str]:
        """Every problem with this config, as 'key: what is wrong; what to do' strings. [] when fine."""
        e: list[str] = []
        d = self.data
        if not self.model:
            e.append("model: missing; pass a diffusers folder or a .safetensors file (--model PATH)")
        elif check_paths and not Path(self.model).exists():
            e.append(f"model: {self.model} does not exist; pass a diffusers folder or a .safetensors file")
        elif check_paths and Path(self.model).is_dir() and not (Path(self.model) / "model_index.json").is_file():
            e.append(f"model: {self.model} is a folder without model_index.json; pass a diffusers model folder")
        if not self.output:
            e.append("output: missing; pass the LoRA file to write, e.g. --output out/my_lora.safetensors")
        elif Path(self.output).suffix != ".safetensors":
            e.append(f"output: {self.output} must end in .safetensors")
        if not d.path:
            e.append("data.path: missing; pass the dataset folder (--data DIR)")
        elif check_paths:
            e += _check_image_folder("data.path", d.path)
        if d.reg_path and check_paths:
            e += _check_image_folder("data.reg_path", d.reg_path)

        if self.steps is None and self.epochs is None:
            e.append("steps/epochs: set one of them, e.g. steps = 1000 (--steps 1000) or epochs = 10")
        if self.steps is not None and self.epochs is not None:
            e.append("steps/epochs: set only one of them (both are set)")
        for key in ("steps", "epochs", "save_every", "save_every_epochs", "sample_every"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                e.append(f"{key}: must be a whole number >= 1 (got {v!r})")
        for key in ("batch_size", "gradient_accumulation", "sample_steps", "log_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                e.append(f"{key}: must be a whole number >= 1 (got {v!r})")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            e.append(f"cpu_threads: must be a whole number >= 1 (got {self.cpu_threads!r}), or unset")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 0:
            e.append(f"keep_checkpoints: must be >= 0 (0 keeps all), got {self.keep_checkpoints!r}")
        if not _positive(self.lr):
            e.append(f"lr: must be a number > 0 (got {self.lr!r}); 1e-4 is a usual LoRA value")
        if self.text_encoder_lr is not None and not (_number(self.text_encoder_lr) and self.text_encoder_lr >= 0):
            e.append(f"text_encoder_lr: must be a number >= 0 (got {self.text_encoder_lr!r}); 5e-5 is usual")
        if self.optimizer not in OPTIMIZERS:
            e.append(f"optimizer: unknown {self.optimizer!r}{_suggest(self.optimizer, OPTIMIZERS)}; choose one of {', '.join(OPTIMIZERS)}")
        elif "8bit" in self.optimizer and importlib.util.find_spec("bitsandbytes") is None:
            e.append(f"optimizer: {self.optimizer} needs bitsandbytes (pip install bitsandbytes), or use optimizer = \"adamw\"")
        if self.lr_scheduler not in SCHEDULERS:
            e.append(f"lr_scheduler: unknown {self.lr_scheduler!r}{_suggest(self.lr_scheduler, SCHEDULERS)}; choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            e.append(f"lr_warmup_steps: must be >= 0 (got {self.lr_warmup_steps!r})")
        if self.mixed_precision not in MIXED_PRECISION:
            e.append(f"mixed_precision: unknown {self.mixed_precision!r}; choose no, fp16 or bf16")
        elif self.mixed_precision == "fp16" and not _cuda_available():
            e.append("mixed_precision: fp16 needs a CUDA GPU; on the CPU use bf16 or no")
        if self.base_precision is not None:
            from .training.base_precision import precision_problems

            e += precision_problems(self.base_precision, cuda=_cuda_available())
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            e.append(f"prediction_type: must be epsilon or v_prediction (got {self.prediction_type!r}); leave it unset to use the model's")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            e.append("zero_terminal_snr: needs v-prediction (at zero SNR an epsilon model's image estimate divides by zero), but "
                     "prediction_type = \"epsilon\"; set prediction_type = \"v_prediction\" or leave it unset with a "
                     "v-prediction model, or set zero_terminal_snr = false")
        if self.vae and check_paths:
            e += _check_vae_path(self.vae)
        if self.min_snr_gamma is not None and not _positive(self.min_snr_gamma):
            e.append(f"min_snr_gamma: must be > 0 (got {self.min_snr_gamma!r}); 5 is usual, or leave it unset")
        if not (_number(self.noise_offset) and 0 <= self.noise_offset <= 1):
            e.append(f"noise_offset: must be between 0 and 1 (got {self.noise_offset!r}); 0.05-0.1 is usual")
        if not (_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            e.append(f"max_grad_norm: must be >= 0 (got {self.max_grad_norm!r}); 0 turns clipping off")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            e.append("tensorboard: the tensorboard package is not installed (pip install tensorboard), or set tensorboard = false")
        if self.resume not in (None, "latest") and check_paths and not Path(self.resume).is_dir():
            e.append(f"resume: {self.resume} is not a checkpoint folder; pass one from {self.checkpoint_root} or 'latest'")
        if self.resume == "latest" and check_paths and self.output:
            from .training.checkpoint import latest_checkpoint

            if latest_checkpoint(self.checkpoint_root) is None:
                e.append(f"resume: no checkpoint in {self.checkpoint_root} yet; start without --resume, or pass a checkpoint folder")
        if self.sample_guidance_rescale is not None and not (_number(self.sample_guidance_rescale) and 0 <= self.sample_guidance_rescale <= 1):
            e.append(f"sample_guidance_rescale: must be between 0 and 1 (got {self.sample_guidance_rescale!r}); 0.7 is usual, "
                     "or leave it unset")
        if self.sample_every and not self.sample_prompts:
            e.append("sample_prompts: sample_every is set but there are no prompts; pass prompt lines or a prompts file")
        if isinstance(self.sample_prompts, str) and check_paths and "\n" not in self.sample_prompts and not Path(self.sample_prompts).is_file():
            e.append(f"sample_prompts: file {self.sample_prompts} not found; pass a list of prompts or an existing file")
        elif self.sample_prompts:
            from .training.sampling import load_prompts

            try:
                load_prompts(self.sample_prompts)
            except (ValueError, OSError) as err:
                e.append(f"sample_prompts: {err}")

        # data
        if not isinstance(d.resolution, int) or d.resolution < 64 or d.resolution % 64:
            e.append(f"data.resolution: must be a multiple of 64, >= 64 (got {d.resolution!r}); 512 for SD1, 768 for SD2-v, 1024 for SDXL")
        if not isinstance(d.bucket_step, int) or d.bucket_step < 8 or d.bucket_step % 8:
            e.append(f"data.bucket_step: must be a multiple of 8 (got {d.bucket_step!r}); 64 is usual")
        if not isinstance(d.repeats, int) or d.repeats < 1:
            e.append(f"data.repeats: must be >= 1 (got {d.repeats!r})")
        if not (_number(d.caption_dropout) and 0 <= d.caption_dropout < 1):
            e.append(f"data.caption_dropout: must be in [0, 1) (got {d.caption_dropout!r})")
        if not isinstance(d.keep_tokens, int) or d.keep_tokens < 0:
            e.append(f"data.keep_tokens: must be >= 0 (got {d.keep_tokens!r})")
        if not (_number(d.prior_loss_weight) and d.prior_loss_weight >= 0):
            e.append(f"data.prior_loss_weight: must be >= 0 (got {d.prior_loss_weight!r})")
        if d.cache_latents not in LATENT_CACHE:
            e.append(f"data.cache_latents: must be ram, disk or none (got {d.cache_latents!r})")
        if not d.caption_extension.startswith("."):
            e.append(f"data.caption_extension: must start with a dot, e.g. \".txt\" (got {d.caption_extension!r})")

        # network (its own checks, prefixed with the section name)
        validate = getattr(self.network, "validate", None)
        if validate is not None:
            e += [m if m.startswith("network.") else f"network.{m}" for m in validate()]
        return e

    def check(self) -> None:
        """Raise ConfigError listing every problem, if there are any."""
        errors = self.validate()
        if errors:
            raise ConfigError(errors)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _positive(v) -> bool:
    return _number(v) and v > 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _suggest(value, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


VAE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _check_vae_path(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"vae: {path} does not exist; pass a diffusers VAE folder (config.json + weights) or a .safetensors VAE file"]
    if p.is_file() and p.suffix.lower() not in VAE_FILE_SUFFIXES:
        return [f"vae: {path} is not a weights file; pass a .safetensors VAE file or a diffusers VAE folder"]
    if p.is_dir() and not ((p / "config.json").is_file() or (p / "vae" / "config.json").is_file()):
        return [f"vae: {path} has no config.json (nor vae/config.json); pass a diffusers VAE folder, a model folder "
                "with a vae/ subfolder, or a single .safetensors VAE file"]
    return []


def _check_image_folder(key: str, path: str) -> list[str]:
    p = Path(path)
    if not p.is_dir():
        return [f"{key}: folder {path} does not exist"]
    for _root, _dirs, files in os.walk(p):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return []
    return [
        f"{key}: no images found in {path}; expected images (png/jpg/webp) in it or in `N_name` sub-folders "
        "such as 10_sks_dog/ (N = repeats)"
    ]


# ---- TOML and flat key=value loading ----------------------------------------------------------------

SECTIONS = ("data", "network")


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from nested dict values (as read from TOML). Unknown keys raise ConfigError."""
    from .network.config import NetworkConfig

    errors: list[str] = []
    top = {f.name for f in fields(TrainConfig)} - set(SECTIONS)
    known = {"data": {f.name for f in fields(DataConfig)}, "network": {f.name for f in fields(NetworkConfig)}}
    flat_top, nested = {}, {"data": {}, "network": {}}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                errors.append(f"{key}: must be a [{key}] table")
                continue
            for k, v in value.items():
                if k in known[key]:
                    nested[key][k] = v
                else:
                    errors.append(f"{key}.{k}: unknown key{_suggest(k, known[key])}")
        elif key in top:
            flat_top[key] = value
        else:
            # a section key written at top level is a common slip: say where it belongs
            home = next((s for s in SECTIONS if key in known[s]), None)
            errors.append(f"{key}: unknown key" + (f"; it belongs in the [{home}] table" if home else _suggest(key, top)))
    for section, cls, items in ((None, TrainConfig, flat_top), ("data", DataConfig, nested["data"]), ("network", NetworkConfig, nested["network"])):
        annotations = {f.name: f.type for f in fields(cls)}
        for k, v in items.items():
            problem = _type_problem(annotations.get(k), v)
            if problem:
                errors.append(f"{section + '.' if section else ''}{k}: {problem}")
    if errors:
        raise ConfigError(errors)
    cfg = base or TrainConfig()
    for k, v in flat_top.items():
        setattr(cfg, k, v)
    for k, v in nested["data"].items():
        setattr(cfg.data, k, v)
    for k, v in nested["network"].items():
        setattr(cfg.network, k, v)
    return cfg


_TYPE_NAMES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,), "dict": (dict,), "None": ()}


def _type_problem(annotation, value) -> str | None:
    """'must be ...' when a TOML value has the wrong type for the field's annotation, else None."""
    parts = [p.strip().split("[")[0] for p in str(annotation or "Any").split("|")]
    if any(p not in _TYPE_NAMES for p in parts):
        return None  # Any / types we do not check
    allowed = tuple(t for p in parts for t in _TYPE_NAMES[p])
    if isinstance(value, bool) and bool not in allowed:
        ok = False  # TOML true is not the number 1
    else:
        ok = isinstance(value, allowed)
    if ok and isinstance(value, float) and value != value:
        return "must be a number, not nan"
    if ok and isinstance(value, (list, dict)):  # element types: list[str], dict[str, int] ...
        inner = str(annotation).split("list[" if isinstance(value, list) else "dict[str,", 1)
        inner_type = _TYPE_NAMES.get(inner[1].split("]")[0].strip(), ()) if len(inner) == 2 else ()
        items = value if isinstance(value, list) else list(value.values())
        bad = [x for x in items if inner_type and (not isinstance(x, inner_type) or (isinstance(x, bool) and bool not in inner_type))]
        if bad:
            return f"has an element of the wrong type ({bad[0]!r})"
    if ok:
        return None
    names = " or ".join({"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false",
                         "list": "a list", "dict": "a table"}[p] for p in parts if p != "None")
    return f"must be {names} (got {value!r})"


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a TOML training config. Relative paths inside it are taken relative to the file."""
    import tomllib

    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError([f"config file {path} not found"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML ({e})"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); save it as UTF-8"]) from e
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file ({e.strerror or e})"]) from e
    cfg = config_from_dict(values)
    base = path.parent
    for obj, key in ((cfg, "model"), (cfg, "output"), (cfg, "checkpoint_dir"), (cfg, "vae"), (cfg.data, "path"), (cfg.data, "reg_path"),
                     (cfg.data, "cache_dir")):
        v = getattr(obj, key)
        if isinstance(v, str) and v and not Path(v).is_absolute():
            setattr(obj, key, str(base / v))
    if isinstance(cfg.sample_prompts, str) and "\n" not in cfg.sample_prompts and not Path(cfg.sample_prompts).is_absolute():
        cfg.sample_prompts = str(base / cfg.sample_prompts)
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The config as TOML text (what is stored with each checkpoint)."""
    import tomli_w

    d = cfg.to_dict()
    clean = {k: v for k, v in d.items() if v is not None and k not in SECTIONS}
    for s in SECTIONS:
        clean[s] = {k: v for k, v in d[s].items() if v is not None}
    return tomli_w.dumps(clean)
