"""Training configuration: typed dataclasses, TOML loading, and validation that reports every error at once.

One place holds every training setting (the anti-example is a trainer whose behaviour is spread over
hundreds of argparse defaults). The same keys work in three places:

    TOML file            CLI flag               Python
    lr = 1e-4            --lr 1e-4              TrainConfig(lr=1e-4)
    [data] path = "x"    --data x               TrainConfig(data=DataConfig(path="x"))
    [network] rank = 16  --rank 16              TrainConfig(network=NetworkConfig(rank=16))

Each field is declared with `setting(...)` (sd_lora/fields.py): its help, choices, unit and path
marker live there, and the CLI flags, the web UI form, TOML path resolution and the key table in
docs/training.md are derived from them (`config_keys()`).

`TrainConfig.validate()` checks everything that can be checked without loading a model (types,
choices, paths, ranges, option conflicts, optional packages) and returns all problems, each naming
the key as a TOML file writes it and the fix, so a mistake never surfaces after an hour of latent
caching. Importing this module is torch-free (the CLI's --help and the UI import it).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path

from . import artifacts, optimizers
from .fields import Key, describe, keys_of, problems, setting, settings_metadata, suggest
from .generation import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .network.config import NetworkConfig
from .sample_prompts import load_prompts
from .samplers import check_sampler, sampler_names
from .samplers import resolve as resolve_sampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Choices of the fields below (the fields are where the UI, the CLI and the docs read them)
OPTIMIZERS = tuple(optimizers.OPTIMIZERS)  # sd_lora/optimizers.py: each one's library, arguments and kind
MIXED_PRECISION = ("no", "fp16", "bf16")
BASE_PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "nf4", "int8")  # how training/base_precision.py stores each: its docstring
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LATENT_CACHE = ("ram", "disk", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # training/loss.py implements each
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TRACKERS = ("tensorboard", "wandb", "all")  # log_with; "all" is both, as kohya's
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya's --max_token_length choices (75: one chunk, the encoders' own length)


class ConfigError(ValueError):
    """A training config with problems. `errors` lists them all; str() shows one per line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in the training config:\n" + "\n".join(f"  - {e}" for e in self.errors)
        )


@dataclass
class DataConfig:
    """Where the images are and how they become training batches."""

    path: str = setting("", "dataset folder: kohya `N_name` sub-folders (N = repeats) or a folder of images", path="dir",
                        flag="--data", kohya=("train_data_dir",))
    reg_path: str | None = setting(None, "regularization (class) images folder, same layout; enables prior preservation",
                                   path="dir", flag="--reg-data", kohya=("reg_data_dir",))
    prior_loss_weight: float = setting(1.0, "loss weight of regularization images", minimum=0, ss="ss_prior_loss_weight")
    caption_extension: str = setting(".txt", "caption side-file extension tried first (.txt and .caption are also read)")
    instance_prompt: str | None = setting(None, "caption for images without a caption file",
                                          default_text="the folder name after `N_`")
    class_prompt: str | None = setting(None, "caption for regularization images without a caption file",
                                       default_text="the folder name after `N_`")
    repeats: int = setting(1, "repeats for folders not named `N_name`", minimum=1)
    resolution: int = setting(512, "training resolution: bucket area <= resolution^2; 512 for SD1, 768 for SD2-v, 1024 for SDXL",
                              unit="px")
    buckets: bool = setting(True, "aspect-ratio buckets (off: center-crop everything to a square)", kohya={"enable_bucket": True}, ss="ss_enable_bucket")
    bucket_step: int = setting(64, "bucket sides are multiples of this", unit="px", kohya=("bucket_reso_steps",))
    upscale: bool = setting(False, "upscale small images to the full bucket area", kohya={"bucket_no_upscale": False})
    shuffle_captions: bool = setting(False, "shuffle comma-separated caption tags each step", kohya={"shuffle_caption": True}, ss="ss_shuffle_caption")
    keep_tokens: int = setting(0, "with shuffle_captions: number of leading tags kept in place", minimum=0, ss="ss_keep_tokens")
    caption_dropout: float = setting(0.0, "probability of training an image with an empty caption", kohya=("caption_dropout_rate",), ss="ss_caption_dropout_rate")
    flip: bool = setting(False, "random horizontal flip", kohya={"flip_aug": True}, ss="ss_flip_aug")
    # kohya's --cache_latents caches in RAM, --cache_latents_to_disk on disk (declared in that order: disk wins)
    cache_latents: str = setting("ram", "latent cache (none: VAE-encode every step)", choices=LATENT_CACHE,
                                 kohya={"cache_latents": "ram", "cache_latents_to_disk": "disk"})
    cache_dir: str | None = setting(None, "disk cache folder", path="dir", default_text="<data>/.sd-lora-cache", ss=False)
    cache_text: bool = setting(True, "cache text-encoder outputs when the text encoder is frozen")
    max_image_pixels: int = setting(64_000_000, "images with more pixels are skipped (decompression-bomb guard)", minimum=1, ss=False)

    # ---- data area (issue #19): subsets, kohya dataset configs, kohya's caption and bucket options --------
    subsets: list[SubsetConfig] = setting(
        help="image folders with their own repeats, caption options, flip and resolution: [[data.subsets]] tables with "
        "the keys below; a key a table leaves out takes the [data] value", default_factory=list, items=lambda: SubsetConfig)
    dataset_config_path: str | None = setting(
        None, "kohya sd-scripts dataset config (TOML or JSON with [general], [[datasets]], [[datasets.subsets]]), read as "
        "subsets; replaces path / reg_path / subsets", path="file", flag="--dataset-config", metavar="FILE",
        kohya=("dataset_config",))
    caption_prefix: str = setting("", "text put before every caption (before shuffling, as kohya does)")
    caption_suffix: str = setting("", "text put after every caption")
    keep_tokens_separator: str = setting(
        "", "the caption part before this separator (and after a second one) is never shuffled or dropped, e.g. \"|||\"")
    secondary_separator: str = setting("", "separator inside one tag: shuffled as one tag, trained as a comma, e.g. \";;;\"")
    caption_dropout_every_n_epochs: int = setting(0, "train every N-th epoch on empty captions", minimum=0, zero="never",
                                                  ss="ss_caption_dropout_every_n_epochs")
    min_bucket_side: int | None = setting(
        None, "smallest bucket side; setting it or max_bucket_side makes buckets every shape between the two (kohya's "
        "rule) instead of aspect ratios up to 2", unit="px", kohya=("min_bucket_reso",), default_text="resolution / 2",
        ss="ss_min_bucket_reso")
    max_bucket_side: int | None = setting(None, "largest bucket side (see min_bucket_side)", unit="px", kohya=("max_bucket_reso",),
                                          default_text="2 x resolution", ss="ss_max_bucket_reso")
    cache_text_to_disk: bool = setting(False, "with cache_text: keep the text-encoder outputs in the disk cache folder too, "
                                       "for the next run", kohya={"cache_text_encoder_outputs_to_disk": True}, ss=False)
    # masked loss (#19)
    masked_loss: bool = setting(False, "weight the loss per pixel by a mask (white = train, black = ignore), downsampled to "
                                "latent size; the masks come from alpha_mask or mask_path")
    alpha_mask: bool = setting(False, "use each image's alpha channel as its loss mask (opaque = train; an image without "
                               "alpha trains everywhere); weights the loss even without masked_loss, as in kohya")
    mask_path: str | None = setting(None, "with masked_loss: folder of mask images named as the training images (any image "
                                    "extension), each the size of its image; the red channel is the weight", path="dir",
                                    kohya=("conditioning_data_dir",))
    # augmentation (#19): kohya's names and rules, drawn anew each step (sd_lora/data/augment.py)
    random_crop: bool = setting(False, "crop at a random offset instead of the centre when a resized image overhangs its "
                                "bucket (SDXL: the offset is its crop time id); needs cache_latents = \"none\"",
                                ss="ss_random_crop")
    color_aug: bool = setting(False, "kohya's weak colour augmentation: a third of the steps turn an image's hue by up to "
                              "16 degrees or apply a gamma of 0.95-1.05; needs cache_latents = \"none\"", ss="ss_color_aug")
    caption_tag_dropout: float = setting(0.0, "probability of dropping each caption tag per step (not the keep_tokens ones "
                                         "nor those outside keep_tokens_separator)", kohya=("caption_tag_dropout_rate",),
                                         ss="ss_caption_tag_dropout_rate")
    caption_separator: str = setting(",", "what separates caption tags (shuffling, keep_tokens, tag dropout); the "
                                     "shuffled tags are joined with \", \"")
    wildcards: bool = setting(False, "captions: each {a|b|c} picks one choice per step, and a caption file of several "
                              "lines one line per step", kohya={"enable_wildcard": True})
    # class images (#19): prior preservation's class images, rendered before training (sd_lora/data/class_images.py);
    # diffusers' DreamBooth names (examples/dreambooth/train_dreambooth_lora.py); kohya has no such option
    num_class_images: int = setting(
        0, "prior preservation: when the regularization folder holds fewer images than this, render the missing ones "
        "into it with the base model (no LoRA) and the class prompt before training (diffusers' --num_class_images); "
        "a stopped run keeps the finished ones", minimum=0, zero="off")
    class_image_steps: int = setting(DEFAULT_STEPS, "sampler steps of each class image", minimum=1, unit="steps")
    class_image_guidance: float = setting(DEFAULT_GUIDANCE, "guidance (CFG scale) of the class images", minimum=0)
    class_image_negative_prompt: str = setting("", "negative prompt of the class images")
    class_image_batch_size: int = setting(4, "class images per pipeline call (diffusers' --sample_batch_size)", minimum=1,
                                          ss=False)
    prior_generation_precision: str | None = setting(
        None, "dtype the class images are rendered in (diffusers' --prior_generation_precision)", choices=("fp32", "fp16", "bf16"),
        default_text="fp16 on CUDA, else fp32", ss=False)
    # validation loss (#18): held-out images (data/dataset.py holds them out, training/validation.py scores them);
    # kohya sd-scripts' names (train_network.py / library/config_util.py, kohya-ss/sd-scripts 48d368fa)
    validation_split: float = setting(
        0.0, "fraction of each subset's images held out for the validation loss: chosen by validation_seed, never "
        "trained on, not counted in the steps (regularization images are never held out)", minimum=0, zero="none",
        ss="ss_validation_split")
    validation_seed: int | None = setting(None, "seed that chooses the validation_split images (the same ones every run "
                                          "and on resume)", default_text="seed", ss="ss_validation_seed")
    validation_path: str | None = setting(
        None, "folder of validation images (never trained on; captions as for data.path, `N_name` folders give their "
        "prompt), used with or instead of validation_split", path="dir", flag="--validation-data")

    def __post_init__(self):
        # Python callers may pass the tables as dicts, as TOML gives them
        self.subsets = [SubsetConfig(**t) if isinstance(t, dict) else t for t in self.subsets or []]


def _per_subset(name: str, kohya: tuple = (), help: str | None = None):
    """A [[data.subsets]] key that overrides the [data] key `name` for one subset; described by that field."""
    f = DataConfig.__dataclass_fields__[name]
    # ss=None: a subset's values are recorded within data.subsets, not under the [data] key's kohya name
    meta = dict(f.metadata, default_text=f"[data] {name}", inherits=name, ss=None, **({"help": help} if help else {}))
    if kohya:
        meta["kohya"] = dict.fromkeys(kohya)
    return field(default=None, metadata=meta)


@dataclass
class SubsetConfig:
    """One [[data.subsets]] table: an image folder with options of its own (unset: the [data] value)."""

    path: str = setting("", "image folder of the subset: its images and those of its sub-folders (an `N_name` name is not "
                        "read: set repeats and prompt)", path="dir", kohya=("image_dir",))
    metadata_path: str | None = setting(
        None, "kohya fine-tuning metadata JSON ({image: {caption, tags}}) naming the images (relative to path) and their "
        "captions, instead of caption files", path="file", kohya=("metadata_file",))
    is_reg: bool = setting(False, "regularization (class) images for prior preservation (weight: data.prior_loss_weight)")
    prompt: str | None = setting(None, "caption for images without a caption file", kohya=("class_tokens",),
                                 default_text="[data] instance_prompt (class_prompt for is_reg)")
    repeats: int | None = _per_subset("repeats", kohya=("num_repeats",), help="repeats of the subset's images per epoch")
    caption_extension: str | None = _per_subset("caption_extension")
    caption_prefix: str | None = _per_subset("caption_prefix")
    caption_suffix: str | None = _per_subset("caption_suffix")
    shuffle_captions: bool | None = _per_subset("shuffle_captions")
    keep_tokens: int | None = _per_subset("keep_tokens")
    keep_tokens_separator: str | None = _per_subset("keep_tokens_separator")
    secondary_separator: str | None = _per_subset("secondary_separator")
    caption_dropout: float | None = _per_subset("caption_dropout")
    caption_dropout_every_n_epochs: int | None = _per_subset("caption_dropout_every_n_epochs")
    flip: bool | None = _per_subset("flip")
    resolution: int | None = _per_subset("resolution")
    buckets: bool | None = _per_subset("buckets")
    bucket_step: int | None = _per_subset("bucket_step")
    upscale: bool | None = _per_subset("upscale")
    min_bucket_side: int | None = _per_subset("min_bucket_side")
    max_bucket_side: int | None = _per_subset("max_bucket_side")
    alpha_mask: bool | None = _per_subset("alpha_mask", kohya=("alpha_mask",))
    mask_path: str | None = _per_subset("mask_path", kohya=("conditioning_data_dir",))
    # augmentation (#19)
    random_crop: bool | None = _per_subset("random_crop")
    color_aug: bool | None = _per_subset("color_aug")
    caption_tag_dropout: float | None = _per_subset("caption_tag_dropout")
    caption_separator: str | None = _per_subset("caption_separator")
    wildcards: bool | None = _per_subset("wildcards")
    # validation loss (#18): kohya's dataset-config keys; 1.0 holds out the whole subset (kohya's validation folder)
    validation_split: float | None = _per_subset("validation_split", kohya=("validation_split",))
    validation_seed: int | None = _per_subset("validation_seed", kohya=("validation_seed",))



@dataclass
class TrainConfig:
    """Everything `sd_lora.train` needs. Only `model`, `data.path` and `output` have no usable default."""

    model: str = setting("", "base model: diffusers folder or .safetensors file", path="path",
                         kohya=("pretrained_model_name_or_path",), ss="ss_sd_model_name")
    # kohya's --output_dir + --output_name give this file (sd_lora/commands/train.py joins them)
    output: str = setting("", "output LoRA file (.safetensors); kohya's --output_dir + --output_name work too", path="file", ss=False)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    steps: int | None = setting(None, "optimizer steps to train (or set epochs)", minimum=1, excludes="epochs",
                                kohya=("max_train_steps",))
    epochs: int | None = setting(None, "epochs to train (or set steps)", minimum=1, excludes="steps", kohya=("max_train_epochs",))
    batch_size: int = setting(1, "images per batch per process", minimum=1, kohya=("train_batch_size",), ss="ss_batch_size_per_device")
    gradient_accumulation: int = setting(1, "micro-batches per optimizer step", minimum=1, kohya=("gradient_accumulation_steps",), ss="ss_gradient_accumulation_steps")
    # unset: the optimizer's own default (optimizers.py's table), so `optimizer = "prodigy"` alone runs at 1.0;
    # the rate used (unet_lr) is what ss_learning_rate records (the trainer writes it)
    lr: float | None = setting(None, "UNet LoRA learning rate (unset: the optimizer's default)", metavar="LR",
                               kohya=("learning_rate",), ss="ss_learning_rate", default_text=optimizers.default_lr_text())
    text_encoder_lr: float | None = setting(None, "text-encoder LoRA learning rate", metavar="LR", default_text="lr")
    # optimizers and schedules (#18)
    optimizer: str = setting("adamw", "optimizer (8bit: bitsandbytes; prodigy / dadapt_adam adapt their step size: lr = 1.0, their default; "
                             "adamw_schedulefree needs lr_scheduler = \"constant\"; docs/training.md compares them)",
                             choices=OPTIMIZERS, kohya=("optimizer_type",),
                             ss="ss_optimizer")  # the trainer writes kohya's "module.Class(args)" of what ran
    optimizer_args: dict[str, object] | list[str] | None = setting(
        None, "keyword arguments of the optimizer: a table (betas = [0.9, 0.99]) or kohya's key=value words "
        "(--optimizer-args \"betas=0.9,0.99\" \"d_coef=2\"); values are Python literals", metavar="KEY=VALUE",
        default_text="none")
    weight_decay: float = setting(1e-2, "optimizer weight decay (optimizer_args weight_decay overrides it)", minimum=0)
    loraplus_lr_ratio: float | None = setting(
        None, "LoRA+: the up (B) matrices learn at lr x this (16 is the paper's value; methods lora, dora)", minimum=0,
        default_text="off")
    loraplus_unet_lr_ratio: float | None = setting(None, "LoRA+ ratio of the UNet only", minimum=0,
                                                   default_text="loraplus_lr_ratio")
    loraplus_text_encoder_lr_ratio: float | None = setting(None, "LoRA+ ratio of the text encoder only", minimum=0,
                                                           default_text="loraplus_lr_ratio")
    lr_scheduler: str = setting("constant", "learning-rate schedule (formulas in docs/training.md)", choices=SCHEDULERS,
                                ss="ss_lr_scheduler")
    lr_warmup_steps: float = setting(0, "learning-rate warm-up: steps, or below 1 a ratio of the run (0.05: the first 5 %)",
                                     unit="steps", minimum=0, ss="ss_lr_warmup_steps")
    lr_scheduler_num_cycles: int = setting(1, "cosine_with_restarts: number of cosine decays (each restarts at lr)", minimum=1)
    lr_scheduler_power: float = setting(1.0, "polynomial: the power of the decay (1: linear)", minimum=0)
    lr_scheduler_min_lr_ratio: float | None = setting(
        None, "lowest learning rate of the decaying schedules, as a ratio of lr (0.1: decay to lr / 10)", minimum=0,
        default_text="0")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", minimum=0, zero="off", ss="ss_max_grad_norm")
    mixed_precision: str = setting("no", "compute dtype (fp16: CUDA only)", choices=MIXED_PRECISION, ss="ss_mixed_precision")
    base_precision: str | None = setting(
        None, "storage of the frozen UNet/text-encoder weights (nf4/int8: CUDA + bitsandbytes); upcast per layer to the "
        "mixed-precision dtype", choices=BASE_PRECISIONS, default_text="the mixed-precision dtype")
    gradient_checkpointing: bool = setting(False, "trade compute for memory", ss="ss_gradient_checkpointing")
    min_snr_gamma: float | None = setting(None, "min-SNR loss weighting gamma (5 is usual)", default_text="off", ss="ss_min_snr_gamma")
    noise_offset: float = setting(0.0, "noise offset (0.05-0.1 helps very dark/bright images)", ss="ss_noise_offset")
    prediction_type: str | None = setting(None, "override the model's prediction type", choices=PREDICTION_TYPES,
                                          default_text="the model's", kohya={"v_parameterization": "v_prediction"})
    zero_terminal_snr: bool = setting(
        False, "rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2024): the model learns to start "
        "from pure noise. Needs a v-prediction model (or prediction_type = \"v_prediction\")", ss="ss_zero_terminal_snr")
    vae: str | None = setting(
        None, "replacement VAE for latent caching and samples: a diffusers VAE folder (or a model folder with vae/) or a "
        "single .safetensors VAE file, e.g. madebyollin's sdxl-vae-fp16-fix for fp16 SDXL", path="path",
        default_text="the base model's", ss="ss_vae_name")
    seed: int = setting(42, "random seed (data order, noise, timesteps)", ss="ss_seed")

    # loss options (#18): kohya sd-scripts' names and formulas (sd_lora/training/loss.py; docs/training.md "Loss options")
    loss_type: str = setting("l2", "per-pixel loss: l2 (MSE), l1, huber (pseudo-Huber) or smooth_l1; huber/smooth_l1 pull "
                             "less on large errors (corrupt images, bad captions)", choices=LOSS_TYPES, ss="ss_loss_type")
    huber_c: float = setting(0.1, "huber/smooth_l1 threshold c (with huber_schedule: its value at the last timestep)", ss="ss_huber_c")
    huber_schedule: str = setting("snr", "how the huber threshold varies with the timestep: constant (huber_c x "
                                  "huber_scale), exponential (1 at t=0 down to huber_c), snr (from the noise level)",
                                  choices=HUBER_SCHEDULES, ss="ss_huber_schedule")
    huber_scale: float = setting(1.0, "huber threshold multiplier (constant and exponential schedules)", ss="ss_huber_scale")
    debiased_estimation_loss: bool = setting(False, "weight each timestep by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)): "
                                             "debiased estimation (Yu et al. 2024)", ss="ss_debiased_estimation")
    ip_noise_gamma: float | None = setting(None, "input perturbation: extra noise on the UNet input that the target does "
                                           "not contain (0.1 is usual)", minimum=0, default_text="off", ss="ss_ip_noise_gamma")
    ip_noise_gamma_random_strength: bool = setting(False, "with ip_noise_gamma: a random strength in [0, ip_noise_gamma) per step",
                                                   ss="ss_ip_noise_gamma_random_strength")
    noise_offset_random_strength: bool = setting(False, "with noise_offset: a random strength in [0, noise_offset) per step",
                                                 ss="ss_noise_offset_random_strength")
    adaptive_noise_scale: float | None = setting(None, "with noise_offset: add this x |mean of each latent channel| to the "
                                                 "offset (images far from mid-grey get more)", default_text="off",
                                                 ss="ss_adaptive_noise_scale")
    multires_noise_iterations: int | None = setting(None, "multi-resolution (pyramid) noise levels; 6-10 is usual",
                                                    minimum=0, zero="off", default_text="off", ss="ss_multires_noise_iterations")
    multires_noise_discount: float = setting(0.3, "with multires_noise_iterations: weight of each coarser level "
                                             "(level i: discount^i)", minimum=0, ss="ss_multires_noise_discount")
    min_timestep: int | None = setting(None, "smallest timestep trained (0-999)", minimum=0, default_text="0")
    max_timestep: int | None = setting(None, "train timesteps below this (1-1000)", minimum=1,
                                       default_text="the schedule's length (1000)")

    # text conditioning (#19): sd_lora/prompts.py (A1111's 75-token chunks; clip skip as A1111 and kohya read it)
    max_token_length: int = setting(75, "caption tokens read: 75, 150 or 225, in 75-token chunks each encoded with its own "
                                    "BOS/EOS and concatenated (A1111's long prompts); longer captions are cut, with a warning",
                                    choices=MAX_TOKEN_LENGTHS, unit="tokens", ss="ss_max_token_length")
    clip_skip: int | None = setting(None, "condition on the text encoder's Nth layer from the end (A1111's \"Clip skip\"; 2 "
                                    "for most anime SD1 models), with its final layer norm; the layers after it get no "
                                    "adapters. SDXL ignores it (as A1111 and kohya do)", minimum=1,
                                    default_text="1 (the last layer)", ss="ss_clip_skip")

    save_every: int | None = setting(None, "save a LoRA file + resumable checkpoint every N steps", minimum=0, zero="never",
                                     default_text="never", kohya=("save_every_n_steps",), ss=False)
    save_every_epochs: int | None = setting(None, "save every N epochs", minimum=0, zero="never", default_text="never",
                                            kohya=("save_every_n_epochs",), ss=False)
    keep_checkpoints: int = setting(3, "resumable checkpoints kept (newest)", minimum=0, zero="keep all", ss=False)
    checkpoint_dir: str | None = setting(None, "checkpoint folder", path="dir",
                                         default_text="<output stem>-checkpoints next to the output", ss=False)
    resume: str | None = setting(None, "continue the newest checkpoint of this output (latest, or the flag alone), or the "
                                 "checkpoint folder given", path="dir", keywords=("latest",), metavar="latest|DIR", ss=False)

    sample_every: int | None = setting(None, "render sample images every N steps", minimum=0, zero="never", default_text="never",
                                       kohya=("sample_every_n_steps",))
    sample_prompts: list[str] | str | None = setting(
        None, "prompt lines, or a file of them; kohya options --n --w --h --s --d --l --ss", path="file", lines=True,
        metavar="PROMPT_OR_FILE")
    sample_steps: int = setting(20, "default sampler steps for sample prompts", minimum=1)
    sample_guidance_rescale: float | None = setting(
        None, "guidance rescale (0-1) for sample images; keeps high CFG from over-exposing zero-terminal-SNR models",
        default_text="0.7 with zero_terminal_snr, else 0")

    # EMA (#18): a moving average of the adapter weights, saved as NAME-ema.safetensors beside each LoRA file
    ema_decay: float | None = setting(None, "EMA of the adapter weights with this decay (0.999 is usual; the average "
                                      "covers about 1/(1-decay) updates), saved beside each LoRA as NAME-ema.safetensors",
                                      minimum=0, zero="off", default_text="off")
    ema_update_every: int = setting(1, "with ema_decay: update the EMA every N optimizer steps", minimum=1, unit="steps")
    ema_warmup: bool = setting(False, "with ema_decay: warm the decay up as diffusers' EMAModel does "
                               "(min(ema_decay, 1 - k^-2/3) at the k-th update), so early weights fade faster")
    ema_samples: bool = setting(False, "with ema_decay: render the sample images with the EMA weights")

    # samples (#21): the sampler of the sample images (kohya's --sample_sampler; a prompt line's --ss wins)
    sample_sampler: str | None = setting(
        None, "sampler of the sample images: an A1111 name (Euler a, DPM++ 2M Karras, ...) or kohya's (euler_a, "
        "dpmsolver++, k_dpm_2, ...); a prompt line's --ss wins", choices=sampler_names, kohya=("sample_sampler",), metavar="NAME",
        default_text="the model's own scheduler")

    # validation loss (#18): training/validation.py; kohya sd-scripts' names (train_network.py, 48d368fa)
    validate_every_n_steps: int | None = setting(
        None, "compute the validation loss (data.validation_split / data.validation_path) every N steps", minimum=1,
        default_text="never (per epoch instead)", ss="ss_validate_every_n_steps")
    validate_every_n_epochs: int | None = setting(
        None, "compute the validation loss at the end of every N-th epoch (and always at the last step)", minimum=1,
        default_text="every epoch when validate_every_n_steps is unset", ss="ss_validate_every_n_epochs")
    max_validation_steps: int | None = setting(
        None, "score at most this many validation images each time (the first ones; each image is one batch)", minimum=1,
        default_text="all", ss="ss_max_validation_steps")

    cpu_threads: int | None = setting(None, "torch CPU threads for this run (tiny models on a busy machine are much faster on 1)",
                                      minimum=1, default_text="1 for a UNet under 100M parameters on the CPU, else torch's",
                                      ss=False)
    log_every: int = setting(1, "write a step event every N steps", minimum=1, ss=False)
    tensorboard: bool = setting(False, "also log to TensorBoard (needs the tensorboard package); the same as "
                                "log_with = \"tensorboard\"", ss=False)
    # logging (#18): kohya's --log_with / --log_tracker_name / --wandb_run_name (library/train_util.py)
    log_with: str | None = setting(None, "trackers to log to besides the events file: tensorboard, wandb (Weights & "
                                   "Biases: offline unless you are logged in or set WANDB_MODE) or all (both)",
                                   choices=TRACKERS, default_text="none", ss=False)
    log_tracker_name: str | None = setting(None, "with log_with wandb: the W&B project", default_text="sd-lora", ss=False)
    wandb_run_name: str | None = setting(None, "with log_with wandb: the W&B run name", default_text="the output name", ss=False)
    comment: str = setting("", "ss_training_comment stored in the file", kohya=("training_comment",), ss="ss_training_comment")

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if self.network is None or isinstance(self.network, dict):
            self.network = NetworkConfig(**(self.network or {}))

    # ---- derived values (file names: sd_lora/artifacts.py) ----------------------------------------------
    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def checkpoint_root(self) -> Path:
        return artifacts.checkpoint_root(self.output, self.checkpoint_dir)

    @property
    def events_path(self) -> Path:
        return artifacts.events_file(self.output)

    @property
    def stop_file(self) -> Path:
        """Create this file to stop the run with a resumable checkpoint (checked every step)."""
        return artifacts.stop_file(self.checkpoint_root)

    @property
    def trackers(self) -> set[str]:
        """The trackers a run logs to: "tensorboard", "wandb" (log_with, and tensorboard = true)."""
        chosen = {"tensorboard", "wandb"} if self.log_with == "all" else {self.log_with} if self.log_with else set()
        return chosen | ({"tensorboard"} if self.tensorboard else set())

    @property
    def unet_lr(self) -> float:
        """The UNet rate the run uses: `lr`, or when unset the optimizer's default (sd_lora/optimizers.py)."""
        return self.lr if self.lr is not None else optimizers.default_lr(self.optimizer)

    @property
    def te_lr(self) -> float:
        return self.unet_lr if self.text_encoder_lr is None else self.text_encoder_lr

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
            out[f.name] = {g.name: _plain(getattr(v, g.name)) for g in fields(v)} if is_dataclass(v) else v
        return out

    # ---- validation -----------------------------------------------------------------------------
    def validate(self, check_paths: bool = True) -> list[str]:
        """Every problem with this config, as 'key: what is wrong; what to do' strings. [] when fine.

        Messages name keys as a TOML file writes them (`data.path`, `network.rank`); the CLI adds flags.
        """
        keys = config_keys()
        # types, choices and minimums, from the field declarations; a key with one of those problems
        # gets no further checks (they would only repeat it)
        generic = problems(self, keys, None) + problems(self.data, keys, "data")
        validate_network = getattr(self.network, "validate", None)
        if validate_network is not None:
            generic += [f"network.{m}" for m in validate_network()]
        bad = {m.split(":", 1)[0] for m in generic}
        # the rules below compare values: they run on a copy whose rejected values are the defaults
        checked = copy.copy(self)
        checked.data = copy.copy(self.data)
        for key in keys:
            if key.name in bad and key.section in (None, "data"):
                key.set(checked, key.default)
        errors = generic + [m for m in checked._rules(check_paths) if not (keys_of(m) & bad)]
        order = {k.name: i for i, k in enumerate(keys)}  # in the order of the fields (and of the docs table)
        return sorted(errors, key=lambda m: min((order.get(n, len(order)) for n in keys_of(m)), default=len(order)))

    def _rules(self, check_paths: bool) -> list[str]:
        """The checks that are more than a type, a choice or a minimum."""
        e: list[str] = []
        d = self.data
        if not self.model:
            e.append("model: missing; set it to a diffusers folder or a .safetensors file")
        elif check_paths and not Path(self.model).exists():
            e.append(f"model: {self.model} does not exist; set it to a diffusers folder or a .safetensors file")
        elif check_paths and Path(self.model).is_dir() and not (Path(self.model) / "model_index.json").is_file():
            e.append(f"model: {self.model} is a folder without model_index.json; set it to a diffusers model folder")
        if not self.output:
            e.append("output: missing; set it to the LoRA file to write, e.g. out/my_lora.safetensors")
        elif Path(self.output).suffix != ".safetensors":
            e.append(f"output: {self.output} must end in .safetensors")
        if not d.path and not d.subsets and not d.dataset_config_path:
            e.append("data.path: missing; set it to the dataset folder (or write [[data.subsets]] tables, or set "
                     "data.dataset_config_path to a kohya dataset config)")
        elif d.path and check_paths:
            e += _check_image_folder("data.path", d.path)
        if d.reg_path and check_paths and not d.num_class_images:  # with class images it may start empty
            e += _check_image_folder("data.reg_path", d.reg_path)

        if self.steps is None and self.epochs is None:
            e.append("steps/epochs: set one of them, e.g. steps = 1000 or epochs = 10")
        if self.steps is not None and self.epochs is not None:
            e.append("steps/epochs: set only one of them (both are set)")
        if self.lr is not None and not _positive(self.lr):
            e.append(f"lr: must be a number > 0 (got {self.lr!r}); 1e-4 is a usual LoRA value")
        if self.text_encoder_lr is not None and self.text_encoder_lr < 0:
            e.append(f"text_encoder_lr: must be a number >= 0 (got {self.text_encoder_lr!r}); 5e-5 is usual")
        e += optimizers.problems(self.optimizer, self.optimizer_args, self.unet_lr, self.lr_scheduler, self.lr_warmup_steps)
        e += _schedule_problems(self)
        if self.mixed_precision == "fp16" and not _cuda_available():
            e.append("mixed_precision: fp16 needs a CUDA GPU; on the CPU use bf16 or no")
        if self.base_precision in ("nf4", "int8"):
            e += quantized_base_problems(self.base_precision, _cuda_available())
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            e.append("zero_terminal_snr: needs v-prediction (at zero SNR an epsilon model's image estimate divides by zero), but "
                     "prediction_type = \"epsilon\"; set prediction_type = \"v_prediction\" or leave it unset with a "
                     "v-prediction model, or set zero_terminal_snr = false")
        if self.vae and check_paths:
            e += _check_vae_path(self.vae)
        if self.min_snr_gamma is not None and not _positive(self.min_snr_gamma):
            e.append(f"min_snr_gamma: must be > 0 (got {self.min_snr_gamma!r}); 5 is usual, or leave it unset")
        if not 0 <= self.noise_offset <= 1:
            e.append(f"noise_offset: must be between 0 and 1 (got {self.noise_offset!r}); 0.05-0.1 is usual")
        e += self._loss_rules()
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            e.append("tensorboard: the tensorboard package is not installed (pip install tensorboard), or set tensorboard = false")
        elif "tensorboard" in self.trackers and importlib.util.find_spec("tensorboard") is None:
            e.append(f"log_with: {self.log_with} needs the tensorboard package (pip install tensorboard), or unset log_with")
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            e.append(f"log_with: {self.log_with} needs the wandb package (pip install \"sd-lora[wandb]\" or pip install wandb), "
                     "or set log_with = \"tensorboard\" (or unset it)")
        # blocks: the LoRA file a run continues from (what it must fit is checked when the network is built)
        init_lora = getattr(self.network, "init_lora", None)
        if init_lora and check_paths and not Path(init_lora).is_file():
            e.append(f"network.init_lora: {init_lora} is not a file; set it to the LoRA .safetensors file to continue from")
        if self.resume not in (None, "latest") and check_paths and not Path(self.resume).is_dir():
            e.append(f"resume: {self.resume} is not a checkpoint folder; set it to one from {self.checkpoint_root} or to latest")
        if self.resume == "latest" and check_paths and self.output and not _has_checkpoint(self.checkpoint_root):
            e.append(f"resume: no checkpoint in {self.checkpoint_root} yet; start without resume, or set a checkpoint folder")
        if self.ema_decay is not None and self.ema_decay >= 1:
            e.append(f"ema_decay: must be below 1 (got {self.ema_decay!r}); 0.999 is usual, 0 turns the EMA off")
        if not self.ema_decay:
            used = [k for k, v in (("ema_samples", self.ema_samples), ("ema_warmup", self.ema_warmup),
                                   ("ema_update_every", self.ema_update_every != 1)) if v]
            e += [f"{k}: has no effect without ema_decay; set ema_decay (0.999 is usual) or leave {k} at its default"
                  for k in used]
        if self.sample_guidance_rescale is not None and not 0 <= self.sample_guidance_rescale <= 1:
            e.append(f"sample_guidance_rescale: must be between 0 and 1 (got {self.sample_guidance_rescale!r}); 0.7 is usual, "
                     "or leave it unset")
        if self.sample_every and not self.sample_prompts:
            e.append("sample_prompts: sample_every is set but there are no prompts; set prompt lines or a prompts file")
        if isinstance(self.sample_prompts, str) and check_paths and "\n" not in self.sample_prompts and not Path(self.sample_prompts).is_file():
            e.append(f"sample_prompts: file {self.sample_prompts} not found; set a list of prompts or an existing file")
        elif self.sample_prompts:
            try:
                line_samplers = {sp.sampler for sp in load_prompts(self.sample_prompts)} - {None}
            except (ValueError, OSError) as err:
                e.append(f"sample_prompts: {err}")
            else:  # a sampler whose package is missing is found now, not at the first sample
                e += [f"sample_prompts: --ss {p}" for name in sorted(line_samplers) for p in check_sampler(name)]
        if self.sample_sampler in sampler_names():
            e += [f"sample_sampler: {p}" for p in check_sampler(resolve_sampler(self.sample_sampler))]

        # data
        if d.resolution < 64 or d.resolution % 64:
            e.append(f"data.resolution: must be a multiple of 64, >= 64 (got {d.resolution!r}); 512 for SD1, 768 for SD2-v, 1024 for SDXL")
        if d.bucket_step < 8 or d.bucket_step % 8:
            e.append(f"data.bucket_step: must be a multiple of 8 (got {d.bucket_step!r}); 64 is usual")
        if not 0 <= d.caption_dropout < 1:
            e.append(f"data.caption_dropout: must be in [0, 1) (got {d.caption_dropout!r})")
        if not d.caption_extension.startswith("."):
            e.append(f"data.caption_extension: must start with a dot, e.g. \".txt\" (got {d.caption_extension!r})")
        e += _subset_rules(self, check_paths)
        e += _validation_rules(self, check_paths)
        if d.num_class_images:
            from .data.class_images import class_image_problems  # torch-free; the rules of the folder it fills

            e += class_image_problems(self, check_paths)
        return e

    def _loss_rules(self) -> list[str]:
        """The loss options (#18) that depend on another one."""
        e = []
        if self.huber_c <= 0 or (self.huber_schedule != "constant" and self.huber_c > 1):
            e.append(f"huber_c: must be > 0, and <= 1 with huber_schedule = \"{self.huber_schedule}\" (got {self.huber_c!r}); "
                     "0.1 is usual")
        if self.huber_scale <= 0:
            e.append(f"huber_scale: must be > 0 (got {self.huber_scale!r}); 1.0 is usual")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            e.append("adaptive_noise_scale: needs noise_offset; set noise_offset (e.g. 0.05) or leave adaptive_noise_scale unset")
        if self.noise_offset_random_strength and not self.noise_offset:
            e.append("noise_offset_random_strength: needs noise_offset; set noise_offset (e.g. 0.05) or set "
                     "noise_offset_random_strength = false")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            e.append("ip_noise_gamma_random_strength: needs ip_noise_gamma; set ip_noise_gamma (e.g. 0.1) or set "
                     "ip_noise_gamma_random_strength = false")
        if self.min_timestep is not None and self.min_timestep > 999:
            e.append(f"min_timestep: must be 0-999 (got {self.min_timestep}); leave it unset to start at 0")
        if self.max_timestep is not None and self.max_timestep > 1000:
            e.append(f"max_timestep: must be 1-1000 (got {self.max_timestep}); leave it unset to train every timestep")
        low, high = self.min_timestep or 0, 1000 if self.max_timestep is None else self.max_timestep
        if low > high or (low == high and high >= 1000):
            e.append(f"min_timestep/max_timestep: the range [{low}, {high}) is empty; set min_timestep below max_timestep "
                     "(equal values train that one timestep)")
        return e

    def check(self) -> None:
        """Raise ConfigError listing every problem, if there are any."""
        errors = self.validate()
        if errors:
            raise ConfigError(errors)


SECTIONS = {"data": DataConfig, "network": NetworkConfig}


@lru_cache(maxsize=1)
def config_keys() -> tuple[Key, ...]:
    """Every training config key, described by its field: `model`, ..., `data.path`, ..., `network.rank`, ..."""
    return describe(TrainConfig, SECTIONS)


def config_metadata(cfg: TrainConfig) -> dict[str, str]:
    """The metadata a trained file gets from these settings (each field declares its `ss_` key)."""
    return settings_metadata(cfg, config_keys())


def config_key(name: str) -> Key:
    """The Key named as a TOML file writes it (`lr`, `data.path`, `network.method`)."""
    for key in config_keys():
        if key.name == name:
            return key
    raise KeyError(f"{name}: not a training config key{suggest(name, [k.name for k in config_keys()])}")


def quantized_base_problems(precision: str, cuda: bool) -> list[str]:
    """Why nf4 / int8 base storage cannot be used here ([] when it can)."""
    problems = []
    if not cuda:
        problems.append(f"base_precision: {precision} needs a CUDA GPU (bitsandbytes quantized layers); on this "
                        "machine use base_precision = \"fp8\" (1 byte per weight, works on the CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"base_precision: {precision} needs bitsandbytes (pip install bitsandbytes), or use \"fp8\"")
    return problems


def _plain(value):
    """A list of tables (data.subsets) as dicts of the keys each table sets; any other value as it is."""
    if isinstance(value, list) and value and is_dataclass(value[0]):
        return [{g.name: getattr(t, g.name) for g in fields(t) if getattr(t, g.name) is not None} for t in value]
    return value


def _subset_rules(cfg: TrainConfig, check_paths: bool) -> list[str]:
    """The checks of [[data.subsets]] and of a kohya dataset config (area: data)."""
    d, e = cfg.data, []
    if d.dataset_config_path:
        # what the kohya file decides may not also be set here: one of the two would be ignored
        for name in ("path", "reg_path", "subsets"):
            if getattr(d, name):
                e.append(f"data.{name}: not used with data.dataset_config_path (the kohya file lists the image folders); "
                         "remove one of the two")
        if not Path(d.dataset_config_path).is_file():
            # without check_paths (a TOML being loaded) the file is checked, and read, when the paths are
            return e + ([f"data.dataset_config_path: file {d.dataset_config_path} not found"] if check_paths else [])
        # lazily: the reader is the data layer's (torch-free); its problems are config problems
        from .data.kohya_config import read_dataset_config

        try:
            kohya = read_dataset_config(d.dataset_config_path)
        except ValueError as err:
            return e + list(getattr(err, "errors", [str(err)]))
        if kohya.batch_size is not None and kohya.batch_size != cfg.batch_size:
            e.append(f"batch_size: the kohya dataset config says batch_size = {kohya.batch_size}; set batch_size = "
                     f"{kohya.batch_size} (--train_batch_size {kohya.batch_size}) or remove it from the file")
        tables = [(f"{d.dataset_config_path}: {where}", t) for where, t in kohya.subsets]
    else:
        tables = [(f"data.subsets[{i + 1}]", t) for i, t in enumerate(d.subsets)]
    item_keys = config_key("data.subsets").item_keys()
    for where, t in tables:
        for key in item_keys:
            message = key.problem(getattr(t, key.attr))
            if message:
                e.append(f"{where}.{message.split('[].', 1)[1]}")
        if not t.path and not t.metadata_path:
            e.append(f"{where}.path: missing; set it to the subset's image folder")
        elif t.path and check_paths and not Path(t.path).is_dir():
            e.append(f"{where}.path: folder {t.path} does not exist")
        if t.metadata_path and check_paths and not Path(t.metadata_path).is_file():
            e.append(f"{where}.metadata_path: file {t.metadata_path} not found")
        res, step = t.resolution or d.resolution, t.bucket_step or d.bucket_step
        if t.resolution is not None and (t.resolution < 64 or t.resolution % 64):
            e.append(f"{where}.resolution: must be a multiple of 64, >= 64 (got {t.resolution!r})")
        if t.bucket_step is not None and (t.bucket_step < 8 or t.bucket_step % 8):
            e.append(f"{where}.bucket_step: must be a multiple of 8 (got {t.bucket_step!r}); 64 is usual")
        if t.caption_dropout is not None and not 0 <= t.caption_dropout < 1:
            e.append(f"{where}.caption_dropout: must be in [0, 1) (got {t.caption_dropout!r})")
        if t.caption_extension is not None and not t.caption_extension.startswith("."):
            e.append(f"{where}.caption_extension: must start with a dot, e.g. \".txt\" (got {t.caption_extension!r})")
        for side in ("min_bucket_side", "max_bucket_side"):
            v = getattr(t, side) if getattr(t, side) is not None else getattr(d, side)
            if v is not None and isinstance(v, int) and (v < step or v % step):
                e.append(f"{where}.{side}: must be a multiple of bucket_step ({step}) (got {v!r})")
        low, high = (t.min_bucket_side or d.min_bucket_side), (t.max_bucket_side or d.max_bucket_side)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            e.append(f"{where}.min_bucket_side: {low} is larger than max_bucket_side {high}")
        if isinstance(high, int) and isinstance(res, int) and high < res:
            e.append(f"{where}.max_bucket_side: {high} is smaller than the resolution {res}; the square bucket would not fit")
    if not tables:
        for side in ("min_bucket_side", "max_bucket_side"):
            v = getattr(d, side)
            if isinstance(v, int) and (v < d.bucket_step or v % d.bucket_step):
                e.append(f"data.{side}: must be a multiple of data.bucket_step ({d.bucket_step}) (got {v!r})")
    return e + _augment_rules(cfg, tables)


def _augment_rules(cfg: TrainConfig, tables: list[tuple[str, SubsetConfig]]) -> list[str]:
    """The checks of the augmentation settings (#19), on [data] and on each subset table."""
    d, e = cfg.data, []
    for where, t in [("data", d)] + tables:
        rate, sep = t.caption_tag_dropout, t.caption_separator
        if isinstance(rate, (int, float)) and not 0 <= rate < 1:
            e.append(f"{where}.caption_tag_dropout: must be in [0, 1) (got {rate!r}); 0.1 drops one tag in ten")
        if sep is not None and not sep.strip():
            e.append(f"{where}.caption_separator: must not be empty or blank (got {sep!r}); \",\" is usual")
    # kohya refuses --cache_latents with color_aug / random_crop (train_network.py L581-584, 48d368fa): a cached latent
    # is one crop in one colour, these change every step. Our cache is on by default, so say that it is.
    if d.cache_latents != "none":
        per_step = []
        for name in ("random_crop", "color_aug"):
            if getattr(d, name) and (not tables or any(getattr(t, name) is None for _, t in tables)):
                per_step.append(f"data.{name}")
            per_step += [f"{where}.{name}" for where, t in tables if getattr(t, name)]
        if per_step:
            default = " (the default)" if d.cache_latents == "ram" else ""
            e.append(f"data.cache_latents/random_crop/color_aug: the latent cache (data.cache_latents = \"{d.cache_latents}\""
                     f"{default}) holds one crop of each image in its own colours, but {', '.join(per_step)} "
                     f"{'changes' if len(per_step) == 1 else 'change'} them every step; set data.cache_latents = \"none\" (each step then encodes its images with the VAE: slower), or "
                     "turn random_crop / color_aug off to keep the cache (kohya refuses the two together too)")
    return e


def _validation_rules(cfg: TrainConfig, check_paths: bool) -> list[str]:
    """The validation-loss settings (#18): a split that leaves images to train on, and validation data for the intervals."""
    d, e = cfg.data, []
    if not 0 <= d.validation_split < 1:
        e.append(f"data.validation_split: must be in [0, 1) (got {d.validation_split!r}); 0.1 holds out 10 % of each "
                 "subset (to hold out a whole folder, set data.validation_path to it)")
    for i, t in enumerate(d.subsets):
        if t.validation_split is not None and not 0 <= t.validation_split <= 1:
            e.append(f"data.subsets[{i + 1}].validation_split: must be between 0 and 1 (got {t.validation_split!r}); "
                     "1.0 holds out the whole subset")
    if d.validation_path and check_paths:
        e += _check_image_folder("data.validation_path", d.validation_path)
    # listed subsets (or a kohya dataset config) may hold out images of their own: then the intervals apply
    held = d.validation_split or d.validation_path or d.dataset_config_path or any(t.validation_split for t in d.subsets)
    if not held:
        used = [k for k in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps") if getattr(cfg, k)]
        e += [f"{k}: has no validation images to score; set data.validation_split (e.g. 0.1) or data.validation_path, "
              f"or leave {k} unset" for k in used]
    return e


def _tables(key: Key, values: list, relative_to) -> tuple[list, list[str]]:
    """A list-of-tables value from TOML (data.subsets) as dataclass objects, with the problems of its keys."""
    items, errors = [], []
    item_keys = {k.attr: k for k in key.item_keys()}
    for i, table in enumerate(values):
        where = f"{key.name}[{i + 1}]"
        if not isinstance(table, dict):
            errors.append(f"{where}: must be a table ([[{key.name}]] with keys), got {table!r}")
            continue
        obj = key.items()
        for k, v in table.items():
            sub = item_keys.get(k)
            if sub is None:
                errors.append(f"{where}.{k}: unknown key{suggest(k, list(item_keys))}")
                continue
            problem = sub.type_problem(v)
            if problem:
                errors.append(f"{where}.{k}: {problem}")
                continue
            path = sub.path_value(v)
            if relative_to is not None and path is not None and not Path(path).is_absolute():
                v = str(Path(relative_to) / path)
            setattr(obj, k, v)
        items.append(obj)
    return items, errors


def _schedule_problems(cfg: TrainConfig) -> list[str]:
    # optimizers and schedules (#18)
    e = []
    if cfg.lr_warmup_steps >= 1 and cfg.lr_warmup_steps != int(cfg.lr_warmup_steps):
        e.append(f"lr_warmup_steps: {cfg.lr_warmup_steps!r} is neither a whole number of steps nor a ratio below 1")
    if cfg.lr_scheduler_min_lr_ratio is not None and not cfg.lr_scheduler_min_lr_ratio < 1:
        e.append(f"lr_scheduler_min_lr_ratio: must be below 1 (got {cfg.lr_scheduler_min_lr_ratio!r}); 0.1 decays to lr / 10")
    return e


def _has_checkpoint(root: Path) -> bool:
    # the trainer skips incomplete folders when it resumes; here a step folder is enough to say "there is one"
    return root.is_dir() and any(p.is_dir() and artifacts.checkpoint_step(p) is not None for p in root.iterdir())


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _cuda_available() -> bool:
    import torch  # only for the checks that need to know (fp16, nf4/int8): importing config stays torch-free

    return torch.cuda.is_available()


VAE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _check_vae_path(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"vae: {path} does not exist; set it to a diffusers VAE folder (config.json + weights) or a .safetensors VAE file"]
    if p.is_file() and p.suffix.lower() not in VAE_FILE_SUFFIXES:
        return [f"vae: {path} is not a weights file; set it to a .safetensors VAE file or a diffusers VAE folder"]
    if p.is_dir() and not ((p / "config.json").is_file() or (p / "vae" / "config.json").is_file()):
        return [f"vae: {path} has no config.json (nor vae/config.json); set it to a diffusers VAE folder, a model folder "
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


# ---- TOML loading -----------------------------------------------------------------------------------


def config_from_dict(values: dict, base: TrainConfig | None = None, relative_to: str | os.PathLike | None = None,
                     check_paths: bool = False) -> TrainConfig:
    """Build a TrainConfig from nested dict values (as read from TOML).

    relative_to: the folder relative paths are taken from (every key whose field is a path).
    Unknown keys and wrong types raise ConfigError, together with every other problem of the values
    that are fine (validate(check_paths)), so one mistake never hides the next.
    """
    errors: list[str] = []
    keys = {k.name: k for k in config_keys()}
    top = {k.attr for k in keys.values() if k.section is None}
    given: dict[str, object] = {}
    for name, value in values.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                errors.append(f"{name}: must be a [{name}] table")
                continue
            section_keys = [k.attr for k in keys.values() if k.section == name]
            for k, v in value.items():
                if f"{name}.{k}" in keys:
                    given[f"{name}.{k}"] = v
                else:
                    errors.append(f"{name}.{k}: unknown key{suggest(k, section_keys)}")
        elif name in top:
            given[name] = value
        else:
            # a section key written at top level is a common slip: say where it belongs
            home = next((s for s in SECTIONS if f"{s}.{name}" in keys), None)
            errors.append(f"{name}: unknown key" + (f"; it belongs in the [{home}] table" if home else suggest(name, top)))
    wrong = set()
    for name, value in given.items():
        problem = keys[name].type_problem(value)
        if problem:
            errors.append(f"{name}: {problem}")
            wrong.add(name)
    cfg = base or TrainConfig()
    for name, value in given.items():
        if name in wrong:
            continue
        key = keys[name]
        if key.items is not None:  # [[data.subsets]]: tables of keys of their own
            value, table_errors = _tables(key, value, relative_to)
            errors += table_errors
        path = key.path_value(value)
        if relative_to is not None and path is not None and not Path(path).is_absolute():
            value = str(Path(relative_to) / path)
        key.set(cfg, value)
    if errors:
        # the rest of the config, checked too (keys with a wrong type kept their defaults: skip their messages)
        errors += [m for m in cfg.validate(check_paths=check_paths) if not (keys_of(m) & wrong)]
        raise ConfigError(errors)
    return cfg


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
    return config_from_dict(values, relative_to=path.parent, check_paths=True)


def dump_config(cfg: TrainConfig) -> str:
    """The config as TOML text (what is stored with each checkpoint)."""
    import tomli_w

    d = cfg.to_dict()
    clean = {k: v for k, v in d.items() if v is not None and k not in SECTIONS}
    for s in SECTIONS:
        clean[s] = {k: v for k, v in d[s].items() if v is not None and v != []}
    return tomli_w.dumps(clean)
