"""Load Stable Diffusion base models offline and tell which architecture they are.

`load_base` accepts a diffusers folder or a single-file checkpoint (.safetensors, or .ckpt read with
`torch.load(weights_only=True)`). Single files are assembled with diffusers' `from_single_file`
against the configs shipped in `sd_lora/configs/` (or a `config_from` diffusers folder), with
`local_files_only=True`, so nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .io import load_pickle_checkpoint, read_safetensors_header

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ARCH_SD1 = "sd1"
ARCH_SD2 = "sd2"  # SD 2.x, epsilon prediction (512-base)
ARCH_SD2_V = "sd2-v"  # SD 2.x, v-prediction (768-v)
ARCH_SDXL = "sdxl"
ARCHITECTURES = (ARCH_SD1, ARCH_SD2, ARCH_SD2_V, ARCH_SDXL)

ARCH_DESCRIPTIONS = {
    ARCH_SD1: "Stable Diffusion 1.x (CLIP ViT-L text encoder, epsilon prediction)",
    ARCH_SD2: "Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, epsilon prediction)",
    ARCH_SD2_V: "Stable Diffusion 2.x v-prediction (OpenCLIP ViT-H text encoder)",
    ARCH_SDXL: "Stable Diffusion XL (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)",
}

_CONFIG_ROOT = Path(__file__).parent / "configs"


class ModelLoadError(ValueError):
    """A base model that cannot be loaded. The message says what is missing and how to supply it."""


def shipped_config_dir(arch: str) -> str:
    """The diffusers-format config folder (no weights) we ship for `arch`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return str(_CONFIG_ROOT / arch)


def shipped_tokenizer(pad_token: str | None = None):
    """The real CLIP BPE tokenizer (49,408 tokens), from files shipped in the package."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(_CONFIG_ROOT / "clip_tokenizer"), model_max_length=77, **kwargs)


@dataclass
class ArchInfo:
    arch: str
    prediction_type: str  # "epsilon" or "v_prediction"

    @property
    def is_sdxl(self) -> bool:
        return self.arch == ARCH_SDXL

    @property
    def description(self) -> str:
        return ARCH_DESCRIPTIONS[self.arch]


# Which text-encoder states the UNet is conditioned on, as diffusers' pipelines encode prompts (and
# sd_lora.prompts does): SD1/SD2 the last layer's (after the final layer norm); SDXL the
# penultimate hidden states of both encoders, plus text_encoder_2's pooled embedding, which passes
# through every layer. `clip_skip` N (A1111's "Clip skip", kohya's --clip_skip) moves SD1/SD2 N-1
# layers back, still through the final layer norm; SDXL ignores it, as A1111 and kohya do
# (sd_lora/prompts.py cites both). The layers left unadapted follow from the same index.
def conditioning_hidden_state(arch: str, clip_skip: int | None = None) -> int:
    """Index into a text encoder's `hidden_states` (embeddings, then one per layer) whose tokens
    condition the UNet: -1 the last layer, -2 the penultimate one (SDXL, or SD1/SD2 with clip skip 2)."""
    if arch == ARCH_SDXL:
        return -2
    return -max(1, int(clip_skip or 1))


def conditioning_final_layer_norm(arch: str) -> bool:
    """Whether the encoder's final layer norm is applied to that hidden state (SD1/SD2: yes, also with
    clip skip; SDXL reads its penultimate states as they are)."""
    return arch != ARCH_SDXL


def unread_text_encoder_layers(arch: str, component: str, num_layers: int, clip_skip: int | None = None) -> range:
    """Layers of a text encoder whose output never reaches the UNet (SDXL text_encoder: its last
    one; SD1/SD2 with clip skip N: the last N-1). Adapters there would get no gradient (PEFT
    AdaLoRA's update_ipt crashes on it) and would be saved as all-zero modules, so none are injected."""
    if arch == ARCH_SDXL and component == "text_encoder_2":
        return range(0)  # its pooled projection reads the last layer
    after = num_layers + 1 + conditioning_hidden_state(arch, clip_skip)  # hidden_states[k]: after k layers
    return range(max(0, after), num_layers)


# Below this a UNet on the CPU runs on one thread, in training and generation alike: its many small
# ops give OpenMP threads nothing to share, and on a busy machine they wait on each other (tiny-base
# on a loaded 2-core box: training 19.5 s/step with torch's 2 threads, 0.6 s/step with one; 25
# sampler steps 12-86 s against 2-4 s). Every real SD UNet has several hundred million parameters.
SMALL_UNET_PARAMS = 100_000_000


def default_cpu_threads(unet, device) -> int | None:
    """The CPU thread count for running `unet` on `device` when the user set none: 1 for a UNet under
    SMALL_UNET_PARAMS on the CPU, None (torch's own count) otherwise."""
    if str(device).startswith("cpu") and sum(p.numel() for p in unet.parameters()) < SMALL_UNET_PARAMS:
        return 1
    return None


def detect_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """Tell SD1 / SD2 / SD2-v / SDXL from a checkpoint's tensor names and shapes (no tensor data needed).

    Works on original (CompVis/SAI, `model.diffusion_model.*`) single files and on diffusers UNet
    state dicts. SD2 is reported as "sd2-v" only when the file carries the `v_pred` marker key that
    A1111 and kohya write; otherwise "sd2" (pass prediction_type to `load_base` to override).
    """
    keys = shapes.keys()

    def starts(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    # Original single-file layout.
    if starts("conditioner.embedders.1.") or "model.diffusion_model.label_emb.0.0.weight" in shapes:
        return ARCH_SDXL
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if to_k in shapes or starts("cond_stage_model.") or starts("model.diffusion_model."):
        ctx = shapes[to_k][-1] if shapes.get(to_k) else None
        if ctx == 1024 or starts("cond_stage_model.model."):
            return ARCH_SD2_V if "v_pred" in shapes else ARCH_SD2
        if ctx in (768, None):
            return ARCH_SD1
        raise ModelLoadError(f"unrecognised UNet cross-attention width {ctx}; expected 768 (SD1) or 1024 (SD2)")
    # diffusers UNet layout.
    if "add_embedding.linear_1.weight" in shapes:
        return ARCH_SDXL
    for k, shape in shapes.items():
        if k.endswith("attn2.to_k.weight") and shape:
            if shape[-1] == 1024:
                return ARCH_SD2
            if shape[-1] == 768:
                return ARCH_SD1
            break
    raise ModelLoadError(
        "could not recognise the model: no Stable Diffusion 1/2/XL UNet keys found "
        f"(first keys: {', '.join(list(keys)[:5])})"
    )


def architecture_of(pipe_or_unet) -> ArchInfo:
    """The architecture of a loaded diffusers pipeline (or UNet), from its config."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cfg = unet.config
    scheduler = getattr(pipe_or_unet, "scheduler", None)
    prediction = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else "epsilon"
    if cfg.get("addition_embed_type") == "text_time":
        arch = ARCH_SDXL
    elif cfg.get("use_linear_projection") or (
        isinstance(cfg.get("attention_head_dim"), (list, tuple)) and len(set(cfg["attention_head_dim"])) > 1
    ):
        arch = ARCH_SD2_V if prediction == "v_prediction" else ARCH_SD2
    else:
        arch = ARCH_SD1
    return ArchInfo(arch=arch, prediction_type=prediction)


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() == ".safetensors":
        header, _ = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}
    import torch

    sd = load_pickle_checkpoint(path)
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _check_diffusers_folder(path: Path, check_tokenizers: bool = True) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path}: not a diffusers model folder ({index.name} is missing). Pass the folder that contains "
            "model_index.json (with unet/, vae/, text_encoder/ ...), or a single .safetensors checkpoint."
        )
    spec = json.loads(index.read_text())
    missing = []
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = path / name
        if name.startswith("tokenizer"):
            if check_tokenizers and not ((sub / "tokenizer.json").is_file() or ((sub / "vocab.json").is_file() and (sub / "merges.txt").is_file())):
                missing.append(f"{name}/tokenizer.json (or vocab.json and merges.txt)")
        elif name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append(f"{name}/scheduler_config.json")
        elif not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
    if missing:
        raise ModelLoadError(
            f"{path}: incomplete diffusers folder, missing {'; '.join(missing)}. Copy them from the model's "
            "original download (a tokenizer can also be taken from any SD model of the same family)."
        )


def load_base(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
    config_from: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
):
    """Load a Stable Diffusion base model offline and return a diffusers pipeline.

    Args:
        path: a diffusers folder (with model_index.json) or a single .safetensors / .ckpt file.
        dtype, device: where the weights go (dtype default: torch.float32).
        prediction_type: "epsilon" or "v_prediction" to override what was detected (SD2 single
            files do not always say which they are).
        config_from: a diffusers folder whose configs and tokenizers to use for a single file
            (instead of the configs shipped with sd-lora); needed for non-standard architectures.
        random_weights: build from the folder's configs with seeded random weights (for benchmarks
            on full-size shapes without the real weights).

    The detected architecture is logged and available as `architecture_of(pipe)`.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = torch.float32 if dtype is None else dtype
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder. Pass a diffusers folder or a .safetensors file.")

    if path.is_dir():
        _check_diffusers_folder(path, check_tokenizers=not random_weights)
        if random_weights:
            pipe = _random_pipeline_from_configs(path, seed)
        else:
            from diffusers import DiffusionPipeline

            try:
                pipe = DiffusionPipeline.from_pretrained(
                    str(path), dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
                ) if _is_sd1_or_sd2(path) else DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            except OSError as e:
                raise ModelLoadError(f"{path}: could not load the diffusers folder: {e}") from e
    else:
        shapes = _checkpoint_shapes(path)  # validates the file (truncation, pickle safety) first
        try:
            arch = detect_architecture(shapes)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from e
        if prediction_type == "v_prediction" and arch == ARCH_SD2:
            arch = ARCH_SD2_V
        config_dir = Path(config_from) if config_from else Path(shipped_config_dir(arch))
        if config_from:
            # Tokenizers may be left out (the shipped CLIP tokenizer is used), but one that is there must be whole.
            _check_diffusers_folder(config_dir, check_tokenizers=(config_dir / "tokenizer").is_dir())
        cls = StableDiffusionXLPipeline if arch == ARCH_SDXL else StableDiffusionPipeline
        kwargs = {}
        if not (config_dir / "tokenizer").is_dir():
            kwargs["tokenizer"] = shipped_tokenizer()
            if arch == ARCH_SDXL:
                kwargs["tokenizer_2"] = shipped_tokenizer(pad_token="!")
        if arch != ARCH_SDXL:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = cls.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, dtype=dtype, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - diffusers raises many types (SingleFileComponentError, ...) on a bad file
            raise ModelLoadError(
                f"{path}: could not assemble a {ARCH_DESCRIPTIONS[arch]} pipeline from this file: {e}. "
                "If the file is a fine-tune with a different layout, pass config_from= (CLI: --config-from) "
                "a diffusers folder of the same architecture."
            ) from e

    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    if random_weights:
        pipe.to(device=device, dtype=dtype)
    else:
        pipe.to(device)
    info = architecture_of(pipe)
    logger.info("Loaded %s from %s (%s)", info.description, path, info.prediction_type)
    return pipe


def reload_in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Give `model` (a component from `load_base` on a diffusers folder) its floating-point weights in
    `dtype`, read tensor by tensor from its safetensors files instead of converted from the loaded ones.

    `load_base` memory-maps the fp32 files and leaves the pages untouched until used; converting the
    loaded weights touches every page, so a bf16 or fp8 training run peaked at the full fp32 UNet
    plus its converted copy (see `io.stream_safetensors`). Returns False, changing nothing, when the
    weights cannot be matched one to one (a single-file checkpoint, .bin files, other key names);
    the caller then converts the usual way.
    """
    reader = WeightReader.for_model(model)
    if reader is None:
        return False
    state = model.state_dict(keep_vars=True)
    from .io import stream_safetensors

    for f in reader.files:
        for name, tensor in stream_safetensors(f, dtype):
            target = state[name]
            target.data = tensor if target.is_floating_point() else tensor.to(target.dtype)
    return True


class WeightReader:
    """Reads single weights of a component (from `load_base` on a diffusers folder) straight from its
    safetensors files, by the component's own state-dict names, without touching the loaded,
    memory-mapped ones (see `io.stream_safetensors` for why that matters)."""

    def __init__(self, entries: dict[str, tuple[Path, dict]]):
        self.entries = entries
        self.files = sorted({f for f, _ in entries.values()})

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> WeightReader | None:
        """None when the weights cannot be matched one to one (a single-file checkpoint, .bin files,
        other key names, other shapes)."""
        from .io import read_safetensors_header

        folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files or any(f.with_suffix(".bin").exists() for f in files):
            return None
        entries = {}
        for f in files:
            header, _ = read_safetensors_header(f)
            entries.update({k: (f, v) for k, v in header.items()})
        state = model.state_dict()
        if set(entries) != set(state) or any(list(state[k].shape) != info["shape"] for k, (_, info) in entries.items()):
            return None
        return cls(entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .io import read_safetensors_tensor

        path, info = self.entries[name]
        return read_safetensors_tensor(path, name, info, dtype)


def load_vae(path: str | os.PathLike, base, dtype: torch.dtype | None = None):
    """Load a replacement VAE for the pipeline `base` (from load_base), offline, and check that it fits it.

    `path` is a diffusers VAE folder (config.json + weights), a model folder with a vae/ subfolder,
    or a single VAE file (.safetensors, or .ckpt/.pt read with weights_only) in the original or the
    diffusers key layout, e.g. madebyollin's sdxl-vae-fp16-fix. A single file carries no config: it
    is built from the config we ship for the base's architecture, with the base VAE's shape and
    scaling factor (a drop-in VAE must match them), so nothing is fetched from a hub.
    Put it in place with `pipe.vae = load_vae(path, pipe)`. dtype: default torch.float32.
    """
    import inspect

    import torch
    from diffusers import AutoencoderKL

    from .io import read_state_dict

    dtype = torch.float32 if dtype is None else dtype
    path = Path(path)
    base_vae = base.vae
    if path.is_dir():
        sub = None if (path / "config.json").is_file() else "vae"
        config_file = path / (sub or "") / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"VAE {path}: no config.json (nor vae/config.json); pass a diffusers VAE folder, "
                                 "a model folder with a vae/ subfolder, or a single .safetensors VAE file")
        kind = json.loads(config_file.read_text()).get("_class_name")
        if kind != "AutoencoderKL":
            raise ModelLoadError(f"VAE {config_file}: this is a {kind or 'non-diffusers'} config, not a VAE (AutoencoderKL); "
                                 "pass the VAE's folder")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"VAE {path}: could not load the diffusers VAE folder: {e}") from e
    elif path.is_file():
        state_dict, _ = read_state_dict(path)  # validated; a pickle is read with weights_only
        init_keys = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
        shape = {k: v for k, v in dict(base_vae.config).items() if k in init_keys}
        try:
            vae = AutoencoderKL.from_single_file(state_dict, config=shipped_config_dir(architecture_of(base).arch), subfolder="vae",
                                                 local_files_only=True, dtype=dtype, **shape)
        except Exception as e:  # noqa: BLE001 - diffusers raises many types on keys or shapes that do not fit
            raise ModelLoadError(
                f"VAE {path}: does not fit the base model's VAE (latent_channels {base_vae.config.latent_channels}, "
                f"block_out_channels {list(base_vae.config.block_out_channels)}): {e}. Pass a VAE made for this base."
            ) from e
    else:
        raise ModelLoadError(f"VAE {path}: no such file or folder; pass a diffusers VAE folder or a .safetensors VAE file")
    want = (base_vae.config.latent_channels, len(base_vae.config.block_out_channels))
    got = (vae.config.latent_channels, len(vae.config.block_out_channels))
    if got != want:
        raise ModelLoadError(
            f"VAE {path}: does not fit the base model: it has latent_channels {got[0]} and a {2 ** (got[1] - 1)}x "
            f"downscale, the base's VAE {want[0]} and {2 ** (want[1] - 1)}x. Pass a VAE made for this base "
            "(SD1/SD2/SDXL VAEs have 4 latent channels)."
        )
    vae.requires_grad_(False)
    return vae


def zero_terminal_snr_scheduler(scheduler):
    """`scheduler`'s class set up for a zero-terminal-SNR model (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"): betas rescaled so the last timestep is pure noise, and
    "trailing" timestep spacing so that sampling starts from that last timestep."""
    import inspect

    cls = type(scheduler)
    if scheduler.config.get("prediction_type", "epsilon") != "v_prediction":
        # At zero SNR an epsilon sampler's image estimate divides by sqrt(alphas_cumprod[-1]) = 0.
        raise ValueError(
            f"zero terminal SNR needs a v-prediction model; this pipeline's scheduler predicts "
            f"{scheduler.config.get('prediction_type', 'epsilon')}. Load the model with prediction_type=\"v_prediction\" "
            "if it is a v-prediction model, or sample without zero terminal SNR."
        )
    params = inspect.signature(cls.__init__).parameters
    if "rescale_betas_zero_snr" not in params or "timestep_spacing" not in params:
        raise ValueError(
            f"{cls.__name__} has no rescale_betas_zero_snr option, so it cannot sample a zero-terminal-SNR model. "
            "Switch the pipeline to DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, "
            "DPMSolverMultistepScheduler or UniPCMultistepScheduler first, e.g. "
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def use_zero_terminal_snr(pipe):
    """Swap `pipe.scheduler` for the same class set up for zero terminal SNR; returns the scheduler it
    replaced (put it back with `pipe.scheduler = old`). Pair it with `guidance_rescale=0.7` in the call."""
    old = pipe.scheduler
    pipe.scheduler = zero_terminal_snr_scheduler(old)
    return old


def _is_sd1_or_sd2(path: Path) -> bool:
    spec = json.loads((path / "model_index.json").read_text())
    return spec.get("_class_name", "").startswith("StableDiffusionPipeline") or "safety_checker" in spec


def _random_pipeline_from_configs(path: Path, seed: int):
    """Instantiate every component of a diffusers folder from its config with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = json.loads((path / "model_index.json").read_text())
    torch.manual_seed(seed)
    parts = {}
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if value[0] is None:
            parts[name] = None
            continue
        cls_name = value[1]
        sub = path / name
        if cls_name == "UNet2DConditionModel":
            parts[name] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sub))
        elif cls_name == "AutoencoderKL":
            parts[name] = AutoencoderKL.from_config(AutoencoderKL.load_config(sub))
        elif cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            cls = CLIPTextModel if cls_name == "CLIPTextModel" else CLIPTextModelWithProjection
            parts[name] = cls(CLIPTextConfig.from_pretrained(sub))
        elif cls_name == "CLIPTokenizer":
            parts[name] = (
                CLIPTokenizer.from_pretrained(sub, model_max_length=77)
                if (sub / "vocab.json").is_file() or (sub / "tokenizer.json").is_file()  # transformers 5 saves only tokenizer.json
                else shipped_tokenizer(pad_token="!" if name == "tokenizer_2" else None)
            )
        else:
            sched_cls = getattr(diffusers_schedulers, cls_name)
            parts[name] = sched_cls.from_config(sched_cls.load_config(sub))
    pipe_cls = getattr(__import__("diffusers"), spec["_class_name"])
    extra = {"requires_safety_checker": False} if "safety_checker" in parts else {}
    return pipe_cls(**parts, **extra)
