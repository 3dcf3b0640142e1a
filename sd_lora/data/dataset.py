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
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
    fallback_captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    folders: dict[str, int] = field(default_factory=dict)  # folder -> repeats
    buckets: Counter = field(default_factory=Counter)  # (w, h) -> images

    def lines(self) -> list[str]:
        caps = ", ".join(f"{n} from {ext}" for ext, n in self.captions_by_extension.most_common()) or "none"
        out = [
            f"{self.images} training images in {len([f for f in self.folders if not f.startswith('reg:')])} folder(s)"
            + (f", {self.reg_images} regularization images" if self.reg_images else ""),
            f"captions: {caps}; {self.fallback_captions} image(s) use the folder/instance prompt",
            "buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items())),
        ]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} image(s):")
            out += [f"  {p}: {why}" for p, why in self.skipped]
        return out

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "reg_images": self.reg_images,
            "captions_by_extension": dict(self.captions_by_extension),
            "fallback_captions": self.fallback_captions,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "folders": self.folders,
            "buckets": {f"{w}x{h}": n for (w, h), n in self.buckets.items()},
        }


@dataclass
class Dataset:
    items: list[Item]
    report: DatasetReport

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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_dataset(cfg: DataConfig) -> Dataset:
    """Read every image folder of `cfg` (training + regularization) into a Dataset."""
    report = DatasetReport()
    items: list[Item] = []
    exts = caption_extensions(cfg.caption_extension)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step)
    roots = [(Path(cfg.path), False)] + ([(Path(cfg.reg_path), True)] if cfg.reg_path else [])
    for root, is_reg in roots:
        for folder, repeats, name in _folders(root, cfg.repeats):
            key = ("reg:" if is_reg else "") + (folder.name if folder != root else root.name)
            report.folders[key] = repeats
            fallback = (cfg.class_prompt if is_reg else cfg.instance_prompt) or name
            for path in _images_in(folder):
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
                    report.fallback_captions += 1
                else:
                    report.captions_by_extension[ext] += 1
                p = place(img.size, cfg.resolution, cfg.bucket_step, buckets, upscale=cfg.upscale, square=not cfg.buckets)
                items.append(Item(path, caption, repeats, is_reg, key, p, hashlib.sha256(data).hexdigest()))
                report.buckets[p.bucket] += 1
                if is_reg:
                    report.reg_images += 1
                else:
                    report.images += 1
    return Dataset(items, report)
