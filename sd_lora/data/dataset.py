"""Scan dataset folders into a list of training items, with a report a person can read.

Layout (kohya's, which most users already have):

    data/
      10_sks dog/          <- 10 repeats; "sks dog" is the caption for images without one
        001.jpg  001.txt
        002.png  002.caption
      3_sks dog sitting/
    reg/
      1_dog/               <- regularization (prior-preservation) images, same layout

A folder of images without `N_name` sub-folders is one folder with `repeats` repeats. Every image is
decoded once here, so broken ones are listed and skipped before any model is loaded.

The report says what will really be trained, loudly where it is not what the folder suggests: images
left out because they sit beside `N_name` folders instead of in one, files a training run wrote
(samples, loss plots: never training data), empty captions. It refuses (`Dataset.check`) a folder
that looks one level too high (no `N_name` folders, but a sub-folder has them) and a folder with no
usable image, naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import artifacts
from ..config import IMAGE_EXTENSIONS, DataConfig
from .buckets import Placement, make_buckets, place
from .captions import caption_extensions, read_caption
from .images import ImageProblem, open_image

logger = logging.getLogger(__name__)

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class Item:
    """One training image (before repeats)."""

    path: Path
    caption: str
    repeats: int
    is_reg: bool
    folder: str
    placement: Placement
    file_hash: str  # sha256 of the file bytes (part of the cache key)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.placement.bucket


@dataclass
class DatasetReport:
    images: int = 0
    reg_images: int = 0
    captions_by_extension: Counter = field(default_factory=Counter)
    fallback_captions: int = 0  # images without a caption file that use a non-empty folder/instance prompt
    empty_captions: int = 0  # images that train on "" (no caption file and no prompt to fall back on)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    folders: dict[str, int] = field(default_factory=dict)  # folder -> repeats
    buckets: Counter = field(default_factory=Counter)  # (w, h) -> images
    warnings: list[str] = field(default_factory=list)  # trained anyway, but probably not what was meant
    problems: list[str] = field(default_factory=list)  # refused: Dataset.check raises with these

    def lines(self) -> list[str]:
        caps = ", ".join(f"{n} from {ext}" for ext, n in self.captions_by_extension.most_common()) or "none"
        fallback = f"{self.fallback_captions} image(s) use the folder/instance prompt"
        if self.empty_captions:
            fallback += f", {self.empty_captions} image(s) have an EMPTY caption"
        out = [
            f"{self.images} training images in {len([f for f in self.folders if not f.startswith('reg:')])} folder(s)"
            + (f", {self.reg_images} regularization images" if self.reg_images else ""),
            f"captions: {caps}; {fallback}",
            "buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items())),
        ]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} image(s):")
            out += [f"  {p}: {why}" for p, why in self.skipped]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"error: {p}" for p in self.problems]
        return out

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "reg_images": self.reg_images,
            "captions_by_extension": dict(self.captions_by_extension),
            "fallback_captions": self.fallback_captions,
            "empty_captions": self.empty_captions,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "folders": self.folders,
            "buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.items()},
            "warnings": list(self.warnings),
            "problems": list(self.problems),
        }


@dataclass
class Dataset:
    items: list[Item]
    report: DatasetReport

    def check(self) -> None:
        """Raise ValueError naming every refused folder (and the fix), or when nothing is left to train on."""
        problems = list(self.report.problems)
        if not problems and not [i for i in self.items if not i.is_reg]:
            problems.append("data.path: no usable training images (see the skipped list above)")
        if problems:
            raise ValueError("the dataset cannot be trained as it is:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def num_repeated(self) -> int:
        """Images x repeats: the number of samples in one epoch."""
        return sum(i.repeats for i in self.items)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The batches of one epoch as lists of item indices: a pure function of (seed, epoch).

        Repeated samples are shuffled within their bucket, cut into batches (a batch never mixes
        buckets), and the batches shuffled. Being a function of the epoch number alone is what makes
        resume exact: a resumed run recomputes the same order and skips what was done.
        """
        import random

        rng = random.Random(f"{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for idx, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([idx] * item.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            idxs = by_bucket[bucket]
            rng.shuffle(idxs)
            batches += [idxs[i : i + batch_size] for i in range(0, len(idxs), batch_size)]
        rng.shuffle(batches)
        return batches


def _folders(root: Path, default_repeats: int) -> list[tuple[Path, int, str]]:
    """(folder, repeats, name) for each image folder under root."""
    subs = sorted(p for p in root.iterdir() if p.is_dir() and _REPEATS_FOLDER.match(p.name))
    if subs:
        out = []
        for p in subs:
            m = _REPEATS_FOLDER.match(p.name)
            out.append((p, max(1, int(m[1])), m[2].replace("_", " ").strip()))
        return out
    return [(root, default_repeats, "")]


def _hidden_or_output(rel: Path) -> bool:
    """A path (relative to the scanned root) under a hidden folder or one a training run wrote."""
    return any(part.startswith(".") or artifacts.is_run_output(part) for part in rel.parts)


def _images_in(folder: Path, outputs: list[Path] | None = None) -> list[Path]:
    """The images under `folder` (recursively), without hidden ones and without what a training run wrote
    (sample images, sample grids, loss curves: collected into `outputs` so the report can say so)."""
    found = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if _hidden_or_output(rel):
            if outputs is not None:
                outputs.append(p)
            continue
        found.append(p)
    return found


def _shown(paths: list[Path], root: Path, n: int = 3) -> str:
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths[:n]]
    return ", ".join(names) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _layout_findings(root: Path, key: str, folders: list[tuple[Path, int, str]], other_roots: list[Path],
                     report: DatasetReport, outputs: list[Path]) -> None:
    """Warnings and refusals about how `root` is laid out (before any image is read); images a training
    run wrote at its top level go to `outputs`."""
    named = [f for f, _, _ in folders if f != root]
    outside = lambda p: not any(p == o or o.is_relative_to(p) or p.is_relative_to(o) for o in other_roots)  # noqa: E731
    children = sorted(p for p in root.iterdir() if not p.name.startswith(".") and outside(p))
    loras = [p for p in children if p.is_file() and p.suffix.lower() == ".safetensors"]
    if loras:
        report.warnings.append(
            f"{key}: {root} holds .safetensors files ({_shown(loras, root)}): is it an output folder? Only images are "
            "training data; keep LoRA files and other outputs out of the dataset folder")
    if named:
        for sub in children:  # images a run wrote here are not trained either way (not in an N_name folder)
            if artifacts.is_run_output(sub):
                found = sorted(sub.rglob("*")) if sub.is_dir() else [sub]
                outputs += [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        # kohya reads only the N_name folders when there are any: say what that leaves out
        loose = [p for p in children if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not artifacts.is_run_output(p)]
        if loose:
            report.warnings.append(
                f"{key}: {len(loose)} image(s) directly in {root} are NOT trained ({_shown(loose, root)}): only `N_name` "
                f"folders are read when there are any; move them into a folder such as {root / ('1_' + root.name)}")
        for sub in children:
            if sub.is_dir() and sub not in named and not artifacts.is_run_output(sub):
                images = _images_in(sub)
                if images:
                    report.warnings.append(
                        f"{key}: {len(images)} image(s) in {sub} are NOT trained: it is not an `N_name` folder (N = repeats) "
                        f"beside {', '.join(f.name for f in named[:3])}; rename it to e.g. 1_{sub.name} to train on them, "
                        "or move it out of the dataset folder")
        return
    # no N_name folders: is it the folder above the dataset (which holds them one level down)?
    for sub in children:
        if sub.is_dir() and not artifacts.is_run_output(sub):
            inner = sorted(p.name for p in sub.iterdir() if p.is_dir() and _REPEATS_FOLDER.match(p.name))
            if inner:
                report.problems.append(
                    f"{key}: {root} has no `N_name` folders, but {sub} has ({', '.join(inner[:3])}): {key} looks one level "
                    f"too high (it would train every image below it at repeats {folders[0][1]}, outputs included); set "
                    f"{key} = \"{sub}\"")
                return


def scan_dataset(cfg: DataConfig) -> Dataset:
    """Read every image folder of `cfg` (training + regularization) into a Dataset."""
    report = DatasetReport()
    items: list[Item] = []
    exts = caption_extensions(cfg.caption_extension)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step)
    roots = [(Path(cfg.path), False, "data.path")] + ([(Path(cfg.reg_path), True, "data.reg_path")] if cfg.reg_path else [])
    for root, is_reg, root_key in roots:
        folders = _folders(root, cfg.repeats)
        outputs: list[Path] = []
        _layout_findings(root, root_key, folders, [r for r, _, _ in roots if r != root], report, outputs)
        for folder, repeats, name in folders:
            key = ("reg:" if is_reg else "") + (folder.name if folder != root else root.name)
            report.folders[key] = repeats
            fallback = (cfg.class_prompt if is_reg else cfg.instance_prompt) or name
            paths = _images_in(folder, outputs)
            usable = 0
            for path in paths:
                try:
                    img = open_image(path, cfg.max_image_pixels)
                    data = path.read_bytes()
                except (ImageProblem, OSError) as e:
                    report.skipped.append((str(path), str(e)))
                    logger.warning("skipping %s: %s", path, e)
                    continue
                caption, ext = read_caption(path, exts)
                if caption is None:
                    caption = fallback or ""
                    if caption:
                        report.fallback_captions += 1
                    else:
                        report.empty_captions += 1
                else:
                    report.captions_by_extension[ext] += 1
                p = place(img.size, cfg.resolution, cfg.bucket_step, buckets, upscale=cfg.upscale, square=not cfg.buckets)
                items.append(Item(path, caption, repeats, is_reg, key, p, hashlib.sha256(data).hexdigest()))
                usable += 1
                report.buckets[p.bucket] += 1
                if is_reg:
                    report.reg_images += 1
                else:
                    report.images += 1
            if not usable:
                why = f"all {len(paths)} skipped (see the list above)" if paths else "it holds no images"
                report.problems.append(f"{root_key}: {folder} has no usable image ({why}); add images to it or remove the folder")
        if outputs:
            report.warnings.append(
                f"{root_key}: {root} holds {len(outputs)} image(s) that a training run wrote ({_shown(outputs, root)}); they are "
                "NOT trained. Keep outputs out of the dataset folder: write output = somewhere else")
    empty = report.empty_captions
    if empty:
        prompt = "data.class_prompt" if not report.images else "data.instance_prompt"
        report.warnings.append(
            f"{empty} image(s) have an EMPTY caption (no caption file, and no prompt or `N_name` folder name to fall back on): "
            f"they train on \"\"; put a .txt caption beside each image, name the folder N_<prompt>, or set {prompt}")
    return Dataset(items, report)
