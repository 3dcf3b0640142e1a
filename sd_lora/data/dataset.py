"""Scan dataset folders into a list of training items, with a report a person can read.

Layout (kohya's, which most users already have):

    data/
      10_sks dog/          <- 10 repeats; "sks dog" is the caption for images without one
        001.jpg  001.txt
        002.png  002.caption
      3_sks dog sitting/
    reg/
      1_dog/               <- regularization (prior-preservation) images, same layout

A folder of images without `N_name` sub-folders is one folder with `repeats` repeats. The folders can
also be listed as [[data.subsets]] tables or in a kohya dataset config, each with its own repeats,
caption options, flip and resolution (sd_lora/data/subsets.py turns all three into `Subset`s). Every
image is decoded once here, so broken ones are listed and skipped before any model is loaded.

The report says what will really be trained, loudly where it is not what the folder suggests: images
left out because they sit beside `N_name` folders instead of in one, files a training run wrote
(samples, loss plots: never training data), empty captions, and the samples of each subset per epoch.
It refuses (`Dataset.check`) a folder that looks one level too high (no `N_name` folders, but a
sub-folder has them) and a subset with no usable image, naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import artifacts
from ..config import IMAGE_EXTENSIONS, DataConfig
from .buckets import Placement, make_buckets, place
from .captions import caption_extensions, fixed_caption, read_caption
from .images import ImageProblem, open_image
from .masks import Mask, has_alpha, mask_for
from .subsets import REPEATS_FOLDER, Subset, dataset_subsets, validation_subsets

logger = logging.getLogger(__name__)


@dataclass
class Item:
    """One training image (before repeats)."""

    path: Path
    caption: str
    repeats: int
    is_reg: bool
    folder: str  # the subset's name
    placement: Placement
    file_hash: str  # sha256 of the file bytes (part of the cache key)
    subset: Subset | None = None  # its options: caption shuffling and dropout, flip, resolution
    mask: Mask | None = None  # its loss mask (masked loss), when its subset has a mask source

    @property
    def bucket(self) -> tuple[int, int]:
        return self.placement.bucket

    @property
    def flip(self) -> bool:
        return bool(self.subset.flip) if self.subset is not None else False


@dataclass
class DatasetReport:
    images: int = 0
    reg_images: int = 0
    captions_by_extension: Counter = field(default_factory=Counter)
    fallback_captions: int = 0  # images without a caption file that use a non-empty folder/instance prompt
    empty_captions: int = 0  # images that train on "" (no caption file and no prompt to fall back on)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    folders: dict[str, int] = field(default_factory=dict)  # subset name -> repeats
    buckets: Counter = field(default_factory=Counter)  # (w, h) -> images
    buckets_by_resolution: dict[int, Counter] = field(default_factory=dict)  # resolution -> (w, h) -> images
    subsets: list[dict] = field(default_factory=list)  # per subset: name, path, images, repeats, samples, ...
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
        ]
        total = sum(s["samples"] for s in self.subsets) or 1
        for s in self.subsets:  # the step arithmetic of each subset: its share of an epoch
            if s.get("validation") and not s["images"]:  # a validation folder (or a subset held out whole)
                out.append(f"  {s['name']}: {s['validation']} validation image(s), {s['resolution']} px, never trained on")
                continue
            out.append(f"  {s['name']}: {s['images']} image(s) x {s['repeats']} repeats = {s['samples']} samples per epoch "
                       f"({100 * s['samples'] / total:.0f}%), {s['resolution']} px" + (", regularization" if s["is_reg"] else "")
                       + (", flipped" if s["flip"] else "") + (", shuffled captions" if s["shuffle_captions"] else "")
                       + "".join(f", {name}" for name in s.get("augment", ()))
                       + (f", masked loss ({s['masks']})" if s.get("masks") else "")
                       + (f"; {s['validation']} more held out for the validation loss" if s.get("validation") else ""))
        held = sum(s.get("validation") or 0 for s in self.subsets)
        if held:
            out.append(f"validation: {held} image(s) held out (never trained on, not in the steps below)")
        out.append(f"captions: {caps}; {fallback}")
        if len(self.buckets_by_resolution) > 1:
            for res, counts in sorted(self.buckets_by_resolution.items()):
                out.append(f"buckets at {res} px: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items())))
        else:
            out.append("buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items())))
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
            "subsets": [dict(s) for s in self.subsets],
            "warnings": list(self.warnings),
            "problems": list(self.problems),
        }


@dataclass
class Dataset:
    items: list[Item]  # what is trained on
    report: DatasetReport
    validation: list[Item] = field(default_factory=list)  # held out for the validation loss (training/validation.py)

    def check(self) -> None:
        """Raise ValueError naming every refused folder (and the fix), or when nothing is left to train on."""
        problems = list(self.report.problems)
        if not problems and not [i for i in self.items if not i.is_reg] and self.validation:
            problems.append(f"no training images: all {len(self.validation)} are held out for the validation loss; lower "
                            "validation_split, or give the validation images a folder of their own (data.validation_path)")
        elif not problems and not [i for i in self.items if not i.is_reg]:
            problems.append("no training images: every usable image is a regularization image (reg_path / is_reg); add "
                            "training images" if self.report.reg_images else
                            "data.path: no usable training images (see the skipped list above)")
        if problems:
            raise ValueError("the dataset cannot be trained as it is:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def num_repeated(self) -> int:
        """Images x repeats: the number of samples in one epoch."""
        return sum(i.repeats for i in self.items)

    def cacheable_captions(self) -> list[str] | None:
        """Every caption a step can train on, when they are known before training (for the text-encoder
        cache); None when some subset shuffles its captions (then they differ from step to step)."""
        out = []
        for item in self.items:
            text = fixed_caption(item.caption, item.subset) if item.subset is not None else item.caption
            if text is None:
                return None
            out.append(text)
            if item.subset is not None and (item.subset.caption_dropout or item.subset.caption_dropout_every_n_epochs):
                out.append("")
        return list(dict.fromkeys(out))

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


def _run_output(rel: Path) -> bool:
    """A path (relative to the scanned folder) that a training run wrote, or inside one such folder."""
    return any(artifacts.is_run_output(part) for part in rel.parts)


def _images_in(folder: Path, outputs: list[Path] | None = None, recursive: bool = True) -> list[Path]:
    """The images in `folder` (and its sub-folders when `recursive`), without hidden ones and without what a
    training run wrote (sample images, sample grids, loss curves: collected into `outputs` for the report)."""
    found = []
    for p in sorted(folder.rglob("*") if recursive else folder.glob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if _run_output(rel):
            if outputs is not None:
                outputs.append(p)
            continue
        found.append(p)
    return found


def _shown(paths: list[Path], root: Path, n: int = 3) -> str:
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths[:n]]
    return ", ".join(names) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _layout_findings(root: Path, key: str, subsets: list[Subset], other_roots: list[Path], report: DatasetReport,
                     outputs: list[Path]) -> None:
    """Warnings and refusals about how a kohya-layout folder is laid out (before any image is read); images a
    training run wrote at its top level go to `outputs`."""
    named = [Path(s.path) for s in subsets if Path(s.path) != root]
    # the other root (a reg folder kept inside the data folder) is not a stray folder of this one
    outside = lambda p: not any(p == o or o.is_relative_to(p) for o in other_roots)  # noqa: E731
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
            inner = sorted(p.name for p in sub.iterdir() if p.is_dir() and REPEATS_FOLDER.match(p.name))
            if inner:
                report.problems.append(
                    f"{key}: {root} has no `N_name` folders, but {sub} has ({', '.join(inner[:3])}): {key} looks one level "
                    f"too high (it would train every image below it at repeats {subsets[0].repeats}, outputs included); set "
                    f"{key} = \"{sub}\"")
                return


def _empty_caption_fix(sub: Subset) -> str:
    if sub.source in ("data.path", "data.reg_path"):
        named = REPEATS_FOLDER.match(Path(sub.path).name)
        if named:
            return f"name the folder {named[1]}_<prompt>"
        return "set data.class_prompt" if sub.is_reg else "set data.instance_prompt"
    if sub.source.startswith("data.subsets"):
        return f"set prompt = \"...\" in {sub.source}"
    return f"set class_tokens = \"...\" in {sub.source.split(': ', 1)[-1]} of the kohya dataset config"


def held_out_count(images: int, split: float) -> int:
    """How many of a subset's images validation_split holds out: as many as kohya's split_train_val leaves for
    validation when it trains ceil(images x (1 - split)) of them (library/train_util.py, kohya-ss/sd-scripts
    48d368fa); below 1 at least one image is left to train on."""
    if split >= 1:
        return images
    return min(images - 1, math.floor(images * split + 1e-9)) if images else 0


def scan_dataset(cfg: DataConfig, seed: int | None = None) -> Dataset:
    """Read every subset of `cfg` (training + regularization + validation) into a Dataset.

    seed: the training seed, which chooses the validation_split images when validation_seed is unset (as kohya's
    --seed does); the choice is a function of it and the subset's name alone, so it is the same every run."""
    from .kohya_config import read_metadata

    report = DatasetReport()
    items: list[Item] = []
    validation: list[Item] = []
    subsets = dataset_subsets(cfg) + validation_subsets(cfg)
    listed = bool(cfg.dataset_config_path or cfg.subsets)
    outputs_by_key: dict[str, tuple[Path, list[Path]]] = {}
    if not listed:  # a kohya-layout folder (and reg folder): what its layout leaves out or gets wrong
        roots = [(Path(cfg.path), "data.path")] + ([(Path(cfg.reg_path), "data.reg_path")] if cfg.reg_path else [])
        for root, key in roots:
            outputs_by_key[key] = (root, [])
            others = [r for r, _ in roots if r != root] + ([Path(cfg.validation_path)] if cfg.validation_path else [])
            _layout_findings(root, key, [s for s in subsets if s.source == key], others, report, outputs_by_key[key][1])
    bucket_lists: dict[tuple, list[tuple[int, int]]] = {}
    for sub in subsets:
        exts = caption_extensions(sub.caption_extension)
        shape = (sub.resolution, sub.bucket_step, sub.min_bucket_side, sub.max_bucket_side)
        buckets = bucket_lists.setdefault(shape, make_buckets(sub.resolution, sub.bucket_step, min_side=sub.min_bucket_side,
                                                              max_side=sub.max_bucket_side))
        folder = Path(sub.path) if sub.path else None
        root, outputs = outputs_by_key.setdefault(sub.key, (folder or Path("."), []))
        captions: dict[Path, str] = {}
        if sub.metadata_path:
            pairs, missing = read_metadata(sub.metadata_path, folder, lines=bool(sub.wildcards))
            paths = [p for p, _ in pairs]
            captions = dict(pairs)
            for name in missing:
                report.skipped.append((name, f"listed in {sub.metadata_path} but no such image"))
        else:
            paths = _images_in(folder, outputs, recursive=sub.recursive) if folder.is_dir() else []
        if cfg.validation_path and sub.source != "data.validation_path":  # a validation folder inside a training one
            val_root = Path(cfg.validation_path).resolve()
            paths = [p for p in paths if not Path(p).resolve().is_relative_to(val_root)]
        split = 0.0 if sub.is_reg else (sub.validation_split or 0.0)  # regularization images are never held out
        if split < 1:  # a subset held out whole is not a dataset dir of the trained file
            report.folders[sub.name] = sub.repeats
        found: list[Item] = []
        usable = empty = no_alpha = 0
        # masked loss (#19): kohya applies alpha masks whenever alpha_mask is set, mask images only with masked_loss
        mask_dir = Path(sub.mask_path) if sub.mask_path and cfg.masked_loss else None
        if mask_dir is not None and not mask_dir.is_dir():
            report.problems.append(f"{sub.source}: mask_path {mask_dir} is not a folder; set it to the folder of the mask images")
            mask_dir = None
        mask_problems: list[str] = []
        for path in paths:
            try:
                img = open_image(path, cfg.max_image_pixels)
                data = path.read_bytes()
            except (ImageProblem, OSError) as e:
                report.skipped.append((str(path), str(e)))
                logger.warning("skipping %s: %s", path, e)
                continue
            if path in captions:
                caption, ext = captions[path] or None, "metadata"
            else:
                caption, ext = read_caption(path, exts, lines=bool(sub.wildcards))
            if caption is None:
                caption = sub.prompt or ""
                if caption:
                    report.fallback_captions += 1
                else:
                    empty += 1
            else:
                report.captions_by_extension[ext] += 1
            try:
                mask = mask_for(path, img.size, folder, bool(sub.alpha_mask), mask_dir)
            except ImageProblem as e:
                mask_problems.append(str(e))
                mask = None
            if mask is not None and mask.alpha and not has_alpha(path):
                no_alpha += 1
            p = place(img.size, sub.resolution, sub.bucket_step, buckets, upscale=sub.upscale, square=not sub.buckets)
            found.append(Item(path, caption, sub.repeats, sub.is_reg, sub.name, p, hashlib.sha256(data).hexdigest(), sub, mask))
            usable += 1
        # validation loss (#18): the held-out images, chosen by (validation seed, subset name) among the usable ones
        held = held_out_count(len(found), split)
        if split and not held:
            report.warnings.append(f"{sub.source}: validation_split {split:g} of {len(found)} image(s) holds out none; "
                                   "raise it, or set data.validation_path to a folder of validation images")
        chooser = sub.validation_seed if sub.validation_seed is not None else seed if seed is not None else 0
        picked = set(random.Random(f"validation:{chooser}:{sub.name}").sample(range(len(found)), held))
        validation += [it for i, it in enumerate(found) if i in picked]
        for it in (it for i, it in enumerate(found) if i not in picked):
            items.append(it)
            report.buckets[it.bucket] += 1
            report.buckets_by_resolution.setdefault(sub.resolution, Counter())[it.bucket] += 1
            if sub.is_reg:
                report.reg_images += 1
            else:
                report.images += 1
        trained = len(found) - held
        report.empty_captions += empty
        report.subsets.append({"name": sub.name, "path": sub.path, "images": trained, "repeats": sub.repeats,
                               "samples": trained * sub.repeats, "is_reg": sub.is_reg, "resolution": sub.resolution,
                               "flip": bool(sub.flip), "shuffle_captions": bool(sub.shuffle_captions), "source": sub.source,
                               "masks": "mask images" if mask_dir is not None else "alpha" if sub.alpha_mask else None,
                               "augment": [name for name, on in (("random crop", sub.random_crop), ("colour aug", sub.color_aug),
                                           (f"tag dropout {sub.caption_tag_dropout:g}", sub.caption_tag_dropout),
                                           ("wildcards", sub.wildcards)) if on],
                               "validation": held})
        if mask_problems:
            report.problems.append(f"{sub.source}: {len(mask_problems)} image(s) without a usable mask: "
                                   + "; ".join(mask_problems[:3]) + (f"; and {len(mask_problems) - 3} more" if len(mask_problems) > 3 else ""))
        if no_alpha:
            report.warnings.append(f"{sub.source}: {no_alpha} image(s) in {folder} have no alpha channel: with alpha_mask they "
                                   "train everywhere (mask of ones); save them as PNG with transparency to mask them")
        unused = f"{sub.source}: mask_path {sub.mask_path} is NOT used: set data.masked_loss = true to weight the loss by its masks"
        if sub.mask_path and not cfg.masked_loss and unused not in report.warnings:
            report.warnings.append(unused)
        where = folder if folder is not None else sub.metadata_path
        if not usable:
            why = f"all {len(paths)} skipped (see the list above)" if paths else "it holds no images"
            report.problems.append(f"{sub.key}: {where} has no usable image ({why}); add images to it or remove "
                                   + ("the folder" if sub.source in ("data.path", "data.reg_path") else "the subset"))
        if empty:
            report.warnings.append(
                f"{sub.source}: {empty} image(s) in {where} have an EMPTY caption (no caption file, and no prompt to fall back "
                f"on): they train on \"\"; put a caption file ({sub.caption_extension}) beside each image, or {_empty_caption_fix(sub)}")
    if cfg.masked_loss and not any(s.alpha_mask or s.mask_path for s in subsets):
        report.problems.append("data.masked_loss = true but no mask source: set data.mask_path = \"<folder of masks named "
                               "as the images>\" or data.alpha_mask = true (per subset: mask_path / alpha_mask)")
    for key, (root, outputs) in outputs_by_key.items():
        if outputs:
            report.warnings.append(
                f"{key}: {root} holds {len(outputs)} image(s) that a training run wrote ({_shown(outputs, root)}); they are "
                "NOT trained. Keep outputs out of the dataset folder: write output = somewhere else")
    return Dataset(items, report, validation)
