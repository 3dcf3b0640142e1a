"""caption_folder(): run a captioner over a dataset folder and write the caption side files.

Modes (what happens to an image that already has a caption):
    fill     caption only images the trainer has no caption for (the default; never overwrites)
    replace  overwrite every caption
    append   add the new caption's tags after the existing ones (repeats dropped)

Every caption then gets the same treatment whatever the captioner: blacklisted tags removed,
prefix/suffix added, the trigger word put first, repeated tags dropped. Files are written atomically
one by one, so an interrupted run never leaves a half-written caption.

Resuming: `fill` resumes by itself (captioned images are no longer missing). `replace` and `append`
keep a small journal, `<folder>/.sd-lora-caption-progress.jsonl`: its first line holds the run's
settings, then one line per captioned image. Running the same command again after an interruption
skips the images already listed (so `append` never appends twice); different settings start over.
The journal is deleted when a run finishes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image, ImageOps

from ..data.captions import join_tags, split_tags
from .base import Captioner, Source, get_captioner
from .edit import (
    check_caption_extension,
    compose_caption,
    existing_caption,
    find_images,
    folder_info,
    read_caption,
    write_caption,
)

logger = logging.getLogger(__name__)

MODES = ("fill", "replace", "append")
JOURNAL_NAME = ".sd-lora-caption-progress.jsonl"


@dataclass
class CaptionReport:
    """What a caption run did. `captions` maps each image path to the caption written (or, in a dry run, that would be)."""

    folder: str
    captioner: str
    mode: str
    ext: str
    images: int = 0
    written: int = 0
    unchanged: int = 0  # the new caption equals the existing one: file left as it was
    kept: int = 0  # fill mode: the image already had a caption
    resumed: int = 0  # done by the interrupted run this one resumed
    empty: int = 0  # the captioner returned nothing usable: skipped, no file written
    empty_reason: str = ""  # why, in the captioner's words ("no words in the file name")
    empty_advice: str = ""  # what to do instead
    empty_examples: list[str] = field(default_factory=list)  # the first few skipped images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    captions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would write" if self.dry_run else "wrote"
        out = [
            f"{self.images} image(s) in {self.folder}: {verb} {self.written} caption(s) ({self.ext}) with "
            f"'{self.captioner}' in {self.mode} mode in {self.seconds:.1f} s",
        ]
        extra = [(self.kept, "already captioned (kept)"), (self.resumed, "done by the interrupted run (resumed)"),
                 (self.unchanged, "unchanged")]
        out += [f"  {n} {what}" for n, what in extra if n]
        if self.empty:
            more = " ..." if self.empty > len(self.empty_examples) else ""
            out.append(f"  {self.empty} skipped: {self.empty_reason or 'empty caption'}, no file written "
                       f"({', '.join(self.empty_examples)}{more})" + (f"; {self.empty_advice}" if self.empty_advice else ""))
        if self.failed:
            out.append(f"  {len(self.failed)} image(s) could not be read:")
            out += [f"    {p}: {why}" for p, why in self.failed]
        return out

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["failed"] = [{"path": p, "reason": r} for p, r in self.failed]
        return d


def load_rgb(path: Path) -> Image.Image:
    """Decode an image upright (EXIF rotation) as RGB, transparency composited on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")


class _Journal:
    """Append-only record of the images a replace/append run has captioned (see the module docstring).

    Appending (not an atomic rewrite) keeps it O(1) per image on folders of 100k files; a torn last
    line after a crash only means that one image is captioned again.
    """

    def __init__(self, root: Path, settings: dict[str, Any], enabled: bool) -> None:
        self.path = root / JOURNAL_NAME
        self.settings = settings
        self.enabled = enabled
        self.done: set[str] = set()
        self._f = None
        if enabled and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            try:
                same = bool(lines) and json.loads(lines[0]).get("settings") == settings
            except (json.JSONDecodeError, AttributeError):
                same = False
            if same:
                for line in lines[1:]:
                    try:
                        self.done.add(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # torn last line
            else:
                logger.info("Found a caption journal from a run with different settings: starting over.")

    def start(self) -> None:
        if not self.enabled:
            return
        if not self.done:  # a fresh journal (or one from other settings) starts with this run's header
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n", encoding="utf-8")
        self._f = open(self.path, "a", encoding="utf-8")

    def add(self, rel: list[str]) -> None:
        if self._f and rel:
            self._f.write("".join(json.dumps(r) + "\n" for r in rel))
            self._f.flush()
            os.fsync(self._f.fileno())

    def finish(self, completed: bool) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if completed and self.enabled:
            self.path.unlink(missing_ok=True)


def caption_folder(
    folder: str | os.PathLike,
    captioner: str | Captioner = "template",
    *,
    model: str | os.PathLike | None = None,
    mode: str = "fill",
    trigger: str = "",
    prefix: str = "",
    suffix: str = "",
    ext: str = ".txt",
    batch_size: int | None = None,
    blacklist: Iterable[str] | str = (),
    dedupe: bool = True,
    resume: bool = True,
    dry_run: bool = False,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
    **options: Any,
) -> CaptionReport:
    """Caption every image under `folder` and write `<image stem><ext>` side files.

    `captioner` is a registered name ("filename", "folder", "template", "transformers", "wd14")
    or a Captioner instance (reuse a loaded model across calls). `model` and `**options` are the
    captioner's options (e.g. `threshold=0.35`, `template="{trigger}, {folder}"`). `blacklist` is a
    list or a comma-separated string. `callback(done, total)` is called after each batch.
    Returns a CaptionReport; unreadable images are listed in it, not raised.
    """
    t0 = time.perf_counter()
    root = Path(folder)
    if mode not in MODES:
        raise ValueError(f"unknown caption mode {mode!r}; use one of: {', '.join(MODES)}.")
    check_caption_extension(ext)
    if isinstance(blacklist, str):
        blacklist = split_tags(blacklist)
    blacklist = list(blacklist)
    if isinstance(captioner, str):
        if model is not None:
            options["model"] = model
        captioner = get_captioner(captioner, **options)
    elif model is not None or options:
        raise ValueError("pass options to the Captioner when you build it, not to caption_folder() with an instance.")
    batch_size = batch_size or captioner.default_batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")

    images = find_images(root)
    if not images:
        raise ValueError(f"no images found in {root} (looked for .png/.jpg/.jpeg/.webp/... files, also in sub-folders).")
    report = CaptionReport(str(root), captioner.name, mode, ext, images=len(images), dry_run=dry_run,
                           empty_reason=captioner.empty_reason, empty_advice=captioner.empty_advice)
    settings = {**captioner.fingerprint(), "mode": mode, "ext": ext, "trigger": trigger, "prefix": prefix,
                "suffix": suffix, "blacklist": blacklist, "dedupe": dedupe}
    journal = _Journal(root, settings, enabled=mode != "fill" and resume and not dry_run)

    todo: list[Path] = []
    for img in images:
        if mode == "fill" and existing_caption(img, ext) is not None:
            report.kept += 1
        elif img.relative_to(root).as_posix() in journal.done:
            report.resumed += 1
        else:
            todo.append(img)

    journal.start()
    completed = False
    bar = None
    try:
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"captioning ({captioner.name})", unit="img")
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            sources = []
            for img in batch:
                folder_name, _ = folder_info(img, root)
                src = Source(path=img, folder=folder_name, trigger=trigger)
                if captioner.needs_images:
                    try:
                        src.image = load_rgb(img)
                    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                        report.failed.append((str(img), f"cannot read image: {e}"))
                        continue
                sources.append(src)
            bodies = captioner.caption(sources) if sources else []
            if len(bodies) != len(sources):
                raise RuntimeError(f"captioner {captioner.name!r} returned {len(bodies)} captions for {len(sources)} images.")
            done = []
            for src, body in zip(sources, bodies):
                img = src.path
                body = join_tags(split_tags(" ".join((body or "").split())))
                if not body:
                    report.empty += 1
                    if len(report.empty_examples) < 3:
                        report.empty_examples.append(img.relative_to(root).as_posix())
                    done.append(img.relative_to(root).as_posix())
                    continue
                old = read_caption(img, ext)
                if mode == "append":
                    # Append to the caption the trainer reads now, which may be in .caption when ext is .txt:
                    # the file written here takes its place, so it must carry the old tags too.
                    current = existing_caption(img, ext)
                    if current:
                        body = current + ", " + body
                text = compose_caption(body, trigger=trigger, prefix=prefix, suffix=suffix, blacklist=blacklist, dedupe=dedupe)
                report.captions[str(img)] = text
                if text == old:
                    report.unchanged += 1
                else:
                    if not dry_run:
                        write_caption(img, text, ext)
                    report.written += 1
                done.append(img.relative_to(root).as_posix())
            journal.add(done)
            if bar is not None:
                bar.update(len(batch))
            if callback is not None:
                callback(min(start + batch_size, len(todo)), len(todo))
        completed = True
    finally:
        if bar is not None:
            bar.close()
        journal.finish(completed)
    report.seconds = time.perf_counter() - t0
    return report
