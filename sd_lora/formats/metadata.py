"""LoRA file metadata: kohya's `ss_*` keys, the sd-webui-additional-networks hashes, SAI `modelspec.*`.

Everything in a safetensors header must be a string; numbers and booleans are written the way
kohya's sd-scripts writes them (`str(value)`: "16.0", "True"), because A1111, Civitai and the
additional-networks extension parse those strings.

The two hashes follow kohya's library/train_util.py exactly:
  sshs_model_hash   sha256 of everything after the header of the file as it would be saved with
                    only the `ss_*` metadata (= sha256 of the tensor data bytes)
  sshs_legacy_hash  first 8 hex digits of sha256 of the 64 KiB at byte 0x100000 of that same file
and `modelspec.*` follows kohya's library/sai_model_spec.py (SAI model spec 1.0.0).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time

import torch

from .. import methods
from ..models import ARCH_SD1, ARCH_SD2, ARCH_SD2_V, ARCH_SDXL

# kohya's ss_base_model_version / SAI modelspec.architecture per architecture.
BASE_MODEL_VERSION = {ARCH_SD1: "sd_v1", ARCH_SD2: "sd_v2", ARCH_SD2_V: "sd_v2", ARCH_SDXL: "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    ARCH_SD1: "stable-diffusion-v1",
    ARCH_SD2: "stable-diffusion-v2-512",
    ARCH_SD2_V: "stable-diffusion-v2-768-v",
    ARCH_SDXL: "stable-diffusion-xl-v1-base",
}
DEFAULT_RESOLUTION = {ARCH_SD1: 512, ARCH_SD2: 512, ARCH_SD2_V: 768, ARCH_SDXL: 1024}
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

# Plain fields -> ss_ key (value written with str()).
_SS_FIELDS = {
    "output_name": "ss_output_name",
    "learning_rate": "ss_learning_rate",
    "lr": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "steps": "ss_steps",
    "max_train_steps": "ss_max_train_steps",
    "epoch": "ss_epoch",
    "num_epochs": "ss_num_epochs",
    "optimizer": "ss_optimizer",
    "seed": "ss_seed",
    "num_train_images": "ss_num_train_images",
    "num_reg_images": "ss_num_reg_images",
    "num_batches_per_epoch": "ss_num_batches_per_epoch",
    "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "gradient_checkpointing": "ss_gradient_checkpointing",
    "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "mixed_precision": "ss_mixed_precision",
    "clip_skip": "ss_clip_skip",
    "noise_offset": "ss_noise_offset",
    "min_snr_gamma": "ss_min_snr_gamma",
    "zero_terminal_snr": "ss_zero_terminal_snr",
    "max_grad_norm": "ss_max_grad_norm",
    "caption_dropout_rate": "ss_caption_dropout_rate",
    "cache_latents": "ss_cache_latents",
    "training_comment": "ss_training_comment",
    "sd_model_name": "ss_sd_model_name",
    "sd_model_hash": "ss_sd_model_hash",
    "new_sd_model_hash": "ss_new_sd_model_hash",
    "vae_name": "ss_vae_name",
    "session_id": "ss_session_id",
    "training_started_at": "ss_training_started_at",
    "training_finished_at": "ss_training_finished_at",
    "network_dropout": "ss_network_dropout",
}
_MODELSPEC_FIELDS = ("title", "author", "description", "license", "tags", "usage_hint")


def build_training_metadata(
    arch: str,
    method: str = "lora",
    rank: int | None = None,
    alpha: float | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    resolution: int | tuple[int, int] | None = None,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    dataset_dirs: dict[str, dict] | None = None,
    network_args: dict[str, str] | None = None,
    timestamp: float | None = None,
    extra: dict[str, str] | None = None,
    prediction_type: str | None = None,
    **fields,
) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata of a trained LoRA, all values strings.

    arch: "sd1" / "sd2" / "sd2-v" / "sdxl". method: a name in sd_lora.methods (the trained method).
    tag_frequency: {dataset folder: {tag: count}} (trigger words are read back from it).
    dataset_dirs: {folder: {"n_repeats": 10, "img_count": 20}}.
    Other keyword fields (output_name, learning_rate, unet_lr, text_encoder_lr, steps, epoch,
    optimizer, seed, num_train_images, training_comment, sd_model_name, clip_skip, ...) map to their
    kohya `ss_` keys; title / author / description / license / tags / usage_hint go to `modelspec.*`.
    prediction_type: "epsilon" / "v_prediction", what the LoRA was trained to predict (an SD1 or SDXL
    base can be trained into v-prediction); None: the architecture's own (v for sd2-v only).
    `extra` is copied as is (keys and values must be strings).
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(BASE_MODEL_VERSION)}")
    unknown = sorted(set(fields) - set(_SS_FIELDS) - set(_MODELSPEC_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown metadata field(s) {', '.join(unknown)}; known: {', '.join(sorted(set(_SS_FIELDS) | set(_MODELSPEC_FIELDS)))} "
            "(pass anything else through extra={'ss_...': '...'})"
        )
    if prediction_type is None:
        prediction_type = "v_prediction" if arch == ARCH_SD2_V else "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    timestamp = time.time() if timestamp is None else timestamp
    md: dict[str, str] = {}

    # Which network module kohya-compatible loaders should think made this file (the method says).
    module, args = methods.get(method).network_args(alpha, conv_rank, conv_alpha)
    args.update(network_args or {})
    md["ss_network_module"] = module
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = str(float(alpha))
    if args:
        md["ss_network_args"] = json.dumps({k: str(v) for k, v in args.items()})
    md["ss_base_model_version"] = BASE_MODEL_VERSION[arch]
    md["ss_v2"] = str(arch in (ARCH_SD2, ARCH_SD2_V))
    if prediction_type == "v_prediction":  # kohya's --v_parameterization, whatever the base
        md["ss_v_parameterization"] = "True"

    reso = resolution if resolution is not None else DEFAULT_RESOLUTION[arch]
    if isinstance(reso, int):
        reso = (reso, reso)
    reso = tuple(int(r) for r in reso)
    md["ss_resolution"] = str(reso)  # kohya: "(512, 512)"
    if tag_frequency is not None:
        md["ss_tag_frequency"] = json.dumps(tag_frequency)
    if dataset_dirs is not None:
        md["ss_dataset_dirs"] = json.dumps(dataset_dirs)
    for key, value in fields.items():
        if key in _SS_FIELDS and value is not None:
            md[_SS_FIELDS[key]] = str(value)

    md.update(modelspec_metadata(arch, reso, timestamp, **{k: fields.get(k) for k in _MODELSPEC_FIELDS},
                                 clip_skip=fields.get("clip_skip"), output_name=fields.get("output_name"),
                                 prediction_type=prediction_type))
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"extra metadata must map strings to strings (got {k!r}: {type(v).__name__})")
        md[k] = v
    return md


def modelspec_metadata(
    arch: str,
    resolution: tuple[int, int],
    timestamp: float,
    title: str | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    usage_hint: str | None = None,
    clip_skip: int | None = None,
    output_name: str | None = None,
    prediction_type: str | None = None,
) -> dict[str, str]:
    """SAI model spec keys for a LoRA, as kohya's sai_model_spec.build_metadata writes them
    (prediction_type None: the architecture's own)."""
    if prediction_type is None:
        prediction_type = "v_prediction" if arch == ARCH_SD2_V else "epsilon"
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH[arch]}/lora",
        # kohya: SDXL LoRAs use SGM module names, SD1/SD2 LoRAs diffusers names.
        "modelspec.implementation": IMPL_STABILITY_AI if arch == ARCH_SDXL else IMPL_DIFFUSERS,
        "modelspec.title": title or output_name or f"LoRA@{timestamp}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    for key, value in (("author", author), ("description", description), ("license", license), ("tags", tags), ("usage_hint", usage_hint)):
        if value is not None:
            md[f"modelspec.{key}"] = str(value)
    if clip_skip is not None:
        md["modelspec.encoder_layer"] = str(clip_skip)
    return md


def _addnet_hash_safetensors(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


def _addnet_hash_legacy(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]


def compute_sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's precalculate_safetensors_hashes.

    Only the `ss_*` metadata takes part (user metadata edited later must not change the hash), and
    the bytes are those safetensors itself would write, so the legacy hash matches kohya's file.
    """
    import safetensors.torch

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, ss_only or None)
    return _addnet_hash_safetensors(data), _addnet_hash_legacy(data)


def data_sha256(path) -> str:
    """sha256 of a safetensors file's tensor bytes (after the header): equals a correct sshs_model_hash."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A tag is a trigger word candidate only when it is short: whole caption sentences ("a photo of sks
# dog on the grass") are never typed as triggers, and a captioner's sentences would bury the real ones.
MAX_TRIGGER_WORDS = 4
_REPEATS_PREFIX = re.compile(r"^\d+_(.+)$")  # kohya's `N_name` image folders (N = repeats)


def trigger_words(metadata: dict[str, str], limit: int = 10) -> list[str]:
    """The words to type to call a LoRA up, from its `ss_tag_frequency` ({folder: {tag: count}}, as
    kohya and our trainer write it); the one place that decides them.

    First the words a person set in `modelspec.trigger_phrase`; then the instance tokens: the `name` of each `N_name` training folder, where the captions
    contain it (a folder's name is only trained as the caption of images without one, which kohya
    and sd_lora.data both do; elsewhere it is just a folder name). Then the most frequent short tags
    (comma-separated caption parts of at most MAX_TRIGGER_WORDS words), ties by name. Repeats are
    dropped without regard to case. Regularization folders (`ss_reg_dataset_dirs`) are left out:
    kohya counts their tags too (library/train_util.py, `set_tag_frequency` for every subset).
    """
    freq, reg = _json_dict(metadata.get("ss_tag_frequency")), _json_dict(metadata.get("ss_reg_dataset_dirs"))
    counts: dict[str, int] = {}
    instance: list[str] = []
    for folder, tags in freq.items():
        if folder in reg or not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            if isinstance(tag, str) and tag.strip() and isinstance(n, (int, float)) and math.isfinite(n):
                tag = " ".join(tag.split())
                counts[tag] = counts.get(tag, 0) + int(n)
        m = _REPEATS_PREFIX.match(str(folder))
        name = " ".join(m[1].replace("_", " ").split()) if m else ""
        word = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        if name and any(isinstance(t, str) and word.search(t) for t in tags):
            instance.append(name)
    short = sorted((t for t in counts if len(t.split()) <= MAX_TRIGGER_WORDS), key=lambda t: (-counts[t], t))
    # words a person set (SAI modelspec.trigger_phrase, comma-separated: `sd-lora edit-metadata --trigger`) come first
    phrase = metadata.get("modelspec.trigger_phrase")
    chosen = [" ".join(w.split()) for w in phrase.split(",") if w.strip()] if isinstance(phrase, str) else []
    out: list[str] = []
    for word in chosen + instance + short:
        if word.lower() not in {w.lower() for w in out}:
            out.append(word)
    return out[:limit]


def _json_dict(raw) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, TypeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
