"""Class images for prior preservation (issue #19 item 6): render the regularization images a run lacks.

DreamBooth's prior preservation trains on images of the subject's class ("a dog") beside the subject
("sks dog") so the model does not forget what the class looks like. When the regularization folder
holds fewer than `data.num_class_images` images, the missing ones are rendered with the base model
(no LoRA) and the class prompt before the dataset is scanned, as diffusers' DreamBooth script does
(huggingface/diffusers examples/dreambooth/train_dreambooth_lora.py at 58eb52c0, lines 302-308
--num_class_images, 344 --sample_batch_size, 482-489 --prior_generation_precision, 814-856 the
generation: count the folder's files, render num_class_images minus that with class_prompt into it,
in batches of sample_batch_size, fp16 on a GPU unless told). What differs: diffusers counts every
file (a caption counts as an image) and draws unseeded noise, so a stopped run cannot be repeated;
here only images count and each is seeded by its index.

Where they go: into the regularization folder itself (data.reg_path, its one `N_name` folder, or the
one is_reg subset), not into a hidden cache. That is where diffusers and A1111's Dreambooth extension
put them, so users coming from them look there; a person can look at them and delete bad ones (the
next run renders only those again); kohya or any other trainer can use the folder as it is; and the
data report counts what really trains. What a cache key would give is kept by the file names:
`class-<key>-<index>.png`, key = a hash of the class prompt, the base model's hash (and VAE's), the
size and the sampler settings. Images made with other settings are recognised, counted (as every
image in the folder is, the diffusers rule) and reported, never silently re-rendered or mixed.

Resumable and deterministic: image i is seeded with `seed + i` (its PNG says so, in A1111's infotext)
and rendered in the pipeline call of its group (indices i // batch); each image and its caption file
(the class prompt) are written atomically. A stopped run keeps what it finished; the next one renders
the lowest indices missing, re-rendering the group of each, so a resumed generation writes exactly the
files an uninterrupted one writes (same machine, batch size and precision).

Importing this module is torch-free (config checks and `--dry-run` use `class_image_problems` / `plan`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import IMAGE_EXTENSIONS, TrainConfig
from .subsets import Subset, dataset_subsets

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^class-(?P<key>[0-9a-f]{8})-(?P<index>\d{5})\.png$")


def class_image_name(key: str, index: int) -> str:
    return f"class-{key}-{index:05d}.png"


@dataclass
class ClassImagePlan:
    """What rendering would do: which folder, prompt and size; how many images it has and which to render."""

    folder: Path
    prompt: str
    resolution: int
    caption_extension: str
    wanted: int  # data.num_class_images
    existing: int  # images in the folder now (any name: the user's own count too)
    key: str | None = None  # the settings key of the file names (None until `with_key`)
    indices: list[int] = field(default_factory=list)  # the image indices to render (with a key)
    warnings: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return max(0, self.wanted - self.existing)

    def describe(self) -> str:
        if not self.missing:
            return f"class images: {self.existing} in {self.folder} (data.num_class_images = {self.wanted}): none to render"
        return (f"class images: {self.existing} in {self.folder}, data.num_class_images = {self.wanted}: {self.missing} to "
                f"render with \"{self.prompt}\" at {self.resolution}x{self.resolution} before training")


def _reg_target(cfg: TrainConfig) -> tuple[Subset | None, str | None]:
    """(the subset class images go into, None) or (None, why there is none / which to choose)."""
    d = cfg.data
    try:
        regs = [s for s in dataset_subsets(d) if s.is_reg and s.path]
    except (ValueError, OSError) as e:  # an unreadable kohya dataset config: its own check reports it
        return None, f"data.num_class_images: the regularization folder is not known ({str(e).splitlines()[0]})"
    if not regs:
        return None, ("data.num_class_images: class images are rendered into the regularization folder, but there is "
                      "none; set data.reg_path = \"reg\" (created if missing), or set data.num_class_images = 0")
    if len(regs) > 1:
        return None, (f"data.num_class_images: {len(regs)} regularization folders ({', '.join(s.path for s in regs[:3])}): "
                      "which one gets the class images is not clear; keep one (one `N_name` folder in data.reg_path, or one "
                      "is_reg subset), or set data.num_class_images = 0 and fill them yourself")
    return regs[0], None


def _prompt_fix(sub: Subset) -> str:
    if sub.source == "data.reg_path":
        return "set data.class_prompt = \"a photo of a dog\" (the class of your subject), or name the folder 1_<class>"
    if sub.source.startswith("data.subsets"):
        return f"set prompt = \"a photo of a dog\" in {sub.source} (or data.class_prompt)"
    return f"set class_tokens = \"dog\" in {sub.source.split(': ', 1)[-1]} of the kohya dataset config (or data.class_prompt)"


def _images(folder: Path) -> list[Path]:
    """The images the dataset scan reads in `folder` (hidden files left out), in name order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _writable_problem(folder: Path) -> str | None:
    """Why `folder` cannot be created or written (None when it can); checked without writing anything."""
    p = folder
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def class_image_problems(cfg: TrainConfig, check_paths: bool = True) -> list[str]:
    """The config problems of class-image rendering (data.num_class_images), each naming the setting and the fix."""
    d = cfg.data
    if not d.num_class_images:
        return []
    sub, problem = _reg_target(cfg)
    if problem:
        return [problem]
    e = []
    if not (sub.prompt or "").strip():
        e.append(f"data.class_prompt: missing; the class images (data.num_class_images = {d.num_class_images}) are "
                 f"rendered from it: {_prompt_fix(sub)}")
    if check_paths:
        folder = Path(sub.path)
        why = _writable_problem(folder)
        if why and len(_images(folder)) < d.num_class_images:
            e.append(f"{sub.key}: cannot write the class images into {folder} ({why}); point it at a writable folder, or "
                     f"set data.num_class_images = 0")
    return e


def plan(cfg: TrainConfig) -> ClassImagePlan | None:
    """What rendering would do (None when data.num_class_images is off). Raises ValueError with the
    config's class-image problems. Reads the folder only: no model, no hash (for --dry-run)."""
    if not cfg.data.num_class_images:
        return None
    problems = class_image_problems(cfg)
    if problems:
        raise ValueError("class images cannot be rendered:\n" + "\n".join(f"  - {p}" for p in problems))
    sub, _ = _reg_target(cfg)
    folder = Path(sub.path)
    return ClassImagePlan(folder, sub.prompt.strip(), sub.resolution, sub.caption_extension, cfg.data.num_class_images,
                          len(_images(folder)))


def settings_key(cfg: TrainConfig, p: ClassImagePlan) -> str:
    """8 hex digits naming what a class image shows: prompt, base model (+ VAE) hash, size, sampler settings,
    seed, clip skip. Not the batch size or precision: they change only float rounding."""
    from ..infotext import model_hash

    d = cfg.data
    what = {"prompt": p.prompt, "negative_prompt": d.class_image_negative_prompt, "model": model_hash(cfg.model),
            "vae": model_hash(cfg.vae) if cfg.vae else None, "size": p.resolution, "steps": d.class_image_steps,
            "guidance": d.class_image_guidance, "seed": cfg.seed, "clip_skip": cfg.clip_skip}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]


def with_key(cfg: TrainConfig, p: ClassImagePlan) -> ClassImagePlan:
    """The plan with its settings key, the indices to render (the lowest not on disk under this key) and the
    warning about images rendered with other settings."""
    p.key = settings_key(cfg, p)
    ours, other = set(), 0
    for image in _images(p.folder):
        m = _NAME.match(image.name) if image.parent == p.folder else None
        if m and m["key"] == p.key:
            ours.add(int(m["index"]))
        elif m:
            other += 1
    p.indices, i = [], 0
    while len(p.indices) < p.missing:
        if i not in ours:
            p.indices.append(i)
        i += 1
    if other:
        p.warnings.append(f"{p.folder}: {other} class image(s) there were rendered with other settings (another class "
                          "prompt, base model, size or sampler settings); they train as they are. Delete them (class-*.png "
                          f"not named class-{p.key}-*) to render new ones")
    return p


def ensure_class_images(cfg: TrainConfig, on_progress: Callable[[int, int], None] | None = None,
                        show_progress: bool = False, warn: Callable[[str], None] | None = None) -> ClassImagePlan | None:
    """Render the class images the regularization folder lacks (see the module docstring); returns the plan
    (None when data.num_class_images is off). on_progress(done, total) after each written image."""
    p = plan(cfg)
    if p is None:
        return None
    if not p.missing:
        logger.info(p.describe())
        return p
    with_key(cfg, p)
    for message in p.warnings:
        (warn or logger.warning)(message)
    logger.info(p.describe())
    try:
        p.folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"data.reg_path: cannot create {p.folder} for the class images ({e.strerror or e}); point it "
                         "at a writable folder, or set data.num_class_images = 0") from e
    _render(cfg, p, on_progress, show_progress)
    return p


def _render(cfg: TrainConfig, p: ClassImagePlan, on_progress, show_progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    from ..generation import generate, load_pipeline, render_batch
    from ..io import atomic_write

    d = cfg.data
    pipe = load_pipeline(cfg.model, dtype=d.prior_generation_precision, vae=cfg.vae)
    batch = d.class_image_batch_size
    todo = set(p.indices)
    groups = sorted({i // batch for i in todo})
    done = 0
    bar = tqdm(total=len(todo), desc="class images", unit="image", disable=not show_progress)
    try:
        for g in groups:
            indices = range(g * batch, (g + 1) * batch)  # the whole group: its call's arithmetic is always the same
            calls = [(generate(pipe, p.prompt, negative_prompt=d.class_image_negative_prompt, seed=cfg.seed + i,
                               width=p.resolution, height=p.resolution, steps=d.class_image_steps,
                               guidance=d.class_image_guidance, clip_skip=cfg.clip_skip, render=False), 1) for i in indices]
            render_batch(pipe, calls)
            for i, (result, _) in zip(indices, calls):
                if i not in todo:
                    continue
                image = p.folder / class_image_name(p.key, i)
                # the caption first: an image on disk is a finished one (it is what the next run counts)
                with atomic_write(image.with_suffix(p.caption_extension), "w", encoding="utf-8") as f:
                    f.write(p.prompt + "\n")
                result.images[0].save(image)
                done += 1
                bar.update(1)
                if on_progress is not None:
                    on_progress(done, len(todo))
    finally:
        bar.close()
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reg_subset_is_empty(cfg: TrainConfig) -> bool:
    """True when data.reg_path is the class-image folder and holds no image yet (a dry run scans without it)."""
    regs = [s for s in dataset_subsets(cfg.data) if s.is_reg and s.source == "data.reg_path"]
    return bool(regs) and not any(_images(Path(s.path)) for s in regs)
