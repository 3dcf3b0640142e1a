"""Caption side files: find a dataset's images, read and write their captions, edit many at once.

Plain functions on paths and strings, used by `sd-lora caption`, `caption_folder()` and the web
UI's Dataset tab. A caption is the text file next to the image with the same stem and the
extension the trainer reads (`.txt` by default). Every write is atomic, and nothing here ever opens
an image file for writing: the caption extension is checked so a slip such as `--ext .png` cannot
overwrite pictures.

Tag-style captions are comma-separated ("sks, 1girl, red hair"); the tag helpers treat a sentence
caption ("a photo of a dog") as one tag, so they are safe to run on either style.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..config import IMAGE_EXTENSIONS  # the image files the trainer reads
from ..data.captions import caption_extensions  # the trainer's order: the configured extension, then .txt, .caption
from ..data.captions import join_tags, split_tags  # the trainer's tag syntax (comma-separated)
from ..io import atomic_write
from .template import format_template

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_SAFE_EXT = re.compile(r"^\.[A-Za-z0-9_-]{1,16}$")


# ---------------------------------------------------------------------------------------------
# Files


def check_caption_extension(ext: str) -> str:
    """Return `ext` if it is a safe caption extension (".txt", ".caption", ...), else raise ValueError."""
    if not _SAFE_EXT.match(ext or ""):
        raise ValueError(f"caption extension {ext!r} is not valid; use something like '.txt' or '.caption'.")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"caption extension {ext!r} is an image extension: captions would overwrite images.")
    return ext


def caption_path(image: str | Path, ext: str = ".txt") -> Path:
    """The side file of `image`: same folder, same stem, extension `ext` (kohya's rule)."""
    return Path(image).with_suffix(check_caption_extension(ext))


def read_caption(image: str | Path, ext: str = ".txt") -> str | None:
    """The caption in `image`'s `ext` side file (stripped), or None when there is no such file."""
    path = caption_path(image, ext)
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace").strip()
    except FileNotFoundError:
        return None


def existing_caption(image: str | Path, ext: str = ".txt") -> str | None:
    """The non-empty caption the trainer would read for `image` (`ext` first, then .txt, .caption), or None.

    "Fill missing" uses this, so an image captioned in `.caption` is not given a second, competing
    `.txt` caption.
    """
    for e in caption_extensions(ext):
        text = read_caption(image, e)
        if text:
            return text
    return None


def write_caption(image: str | Path, text: str, ext: str = ".txt") -> Path:
    """Write `text` as `image`'s caption atomically (UTF-8, one trailing newline). Returns the file written."""
    path = caption_path(image, ext)
    if path.suffix.lower() in IMAGE_EXTENSIONS or path == Path(image):
        raise ValueError(f"refusing to write a caption over {path}.")
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text.strip() + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Dataset listing


@dataclass
class DatasetImage:
    """One image of a dataset folder and its caption."""

    path: Path
    folder: str  # kohya folder name without the "N_" prefix (or the image's folder name)
    repeats: int | None  # from a "N_name" folder, else None
    caption: str | None  # text of the `ext` side file, None when missing
    caption_path: Path


def folder_info(image: Path, root: Path) -> tuple[str, int | None]:
    """(name, repeats) of the kohya "N_name" folder holding `image` under `root`, else (parent name, None)."""
    for d in [image.parent, *image.parent.parents]:
        m = _REPEATS_FOLDER.match(d.name)
        if m:
            return m[2].replace("_", " ").strip(), int(m[1])
        if d == root:
            break
    return image.parent.name.replace("_", " ").strip(), None


def find_images(root: str | Path) -> list[Path]:
    """All images under `root` (recursively, sorted), skipping hidden files and folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def list_dataset(root: str | Path, ext: str = ".txt") -> list[DatasetImage]:
    """Every image of a dataset folder (kohya layout `<root>/<N>_<name>/...` or a plain folder) with its caption."""
    root = Path(root)
    check_caption_extension(ext)
    out = []
    for img in find_images(root):
        folder, repeats = folder_info(img, root)
        out.append(DatasetImage(img, folder, repeats, read_caption(img, ext), caption_path(img, ext)))
    return out


# ---------------------------------------------------------------------------------------------
# Tags


def tag_key(tag: str) -> str:
    """How tags are compared: case, underscores and runs of spaces do not matter ("Red_Hair" == "red hair")."""
    return " ".join(tag.replace("_", " ").lower().split())


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    """Drop repeated tags, keeping the first occurrence (its position and spelling)."""
    seen, out = set(), []
    for t in tags:
        k = tag_key(t)
        if k and k not in seen:
            seen.add(k)
            out.append(t)
    return out


def remove_tags(tags: Iterable[str], blacklist: Iterable[str]) -> list[str]:
    """Drop tags matching any blacklist entry (compared like tag_key; `*` and `?` are wildcards)."""
    patterns = [tag_key(b) for b in blacklist if b.strip()]
    return [t for t in tags if not any(fnmatch.fnmatchcase(tag_key(t), p) for p in patterns)]


def insert_trigger(tags: list[str], trigger: str) -> list[str]:
    """Put `trigger` first (moving it there if it is already elsewhere): kohya's keep_tokens counts from the start."""
    trigger = trigger.strip()
    if not trigger:
        return list(tags)
    return [trigger] + [t for t in tags if tag_key(t) != tag_key(trigger)]


def compose_caption(body: str, *, trigger: str = "", prefix: str = "", suffix: str = "",
                    blacklist: Iterable[str] = (), dedupe: bool = True) -> str:
    """prefix, body, suffix joined with ", "; blacklisted tags removed; trigger first; repeats dropped.

    The blacklist applies to the body only, so a prefix/suffix/trigger the user typed is never removed.
    """
    tags = remove_tags(split_tags(body), blacklist)
    tags = split_tags(prefix) + tags + split_tags(suffix)
    tags = insert_trigger(tags, trigger)
    return join_tags(dedupe_tags(tags) if dedupe else tags)


# ---------------------------------------------------------------------------------------------
# Bulk editing (web UI Dataset tab). Each takes a dataset folder or a list of image paths, edits the
# `ext` caption files, and returns how many files changed. Images without a caption file are left
# alone (their trainer fallback is the folder name), except by fill_missing.


def _images(target: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(target, (str, Path)):
        return find_images(target)
    return [Path(p) for p in target]


def edit_captions(target, fn: Callable[[str], str], ext: str = ".txt") -> int:
    """Apply `fn(old caption) -> new caption` to every existing caption of `target`; write the changed ones."""
    changed = 0
    for img in _images(target):
        old = read_caption(img, ext)
        if old is None:
            continue
        new = fn(old).strip()
        if new != old:
            write_caption(img, new, ext)
            changed += 1
    return changed


def add_trigger(target, trigger: str, ext: str = ".txt") -> int:
    """Make `trigger` the first tag of every caption."""
    return edit_captions(target, lambda c: join_tags(insert_trigger(split_tags(c), trigger)), ext)


def add_prefix_suffix(target, prefix: str = "", suffix: str = "", ext: str = ".txt") -> int:
    """Add `prefix` at the start and `suffix` at the end of every caption (joined with ", "), unless already there."""
    def fn(c: str) -> str:
        tags = split_tags(c)
        pre, suf = split_tags(prefix), split_tags(suffix)
        if pre and [tag_key(t) for t in tags[: len(pre)]] != [tag_key(t) for t in pre]:
            tags = pre + tags
        if suf and [tag_key(t) for t in tags[len(tags) - len(suf):]] != [tag_key(t) for t in suf]:
            tags = tags + suf
        return join_tags(tags)

    return edit_captions(target, fn, ext)


def find_replace(target, find: str, replace: str, ext: str = ".txt", regex: bool = False) -> int:
    """Replace text in every caption (plain substring, or a Python regular expression with `regex=True`)."""
    if not find:
        raise ValueError("find_replace needs a non-empty text to find.")
    if regex:
        try:
            pattern = re.compile(find)
        except re.error as e:
            raise ValueError(f"invalid regular expression {find!r}: {e}") from e
        return edit_captions(target, lambda c: pattern.sub(replace, c), ext)
    return edit_captions(target, lambda c: c.replace(find, replace), ext)


def remove_tags_from(target, blacklist: Iterable[str], ext: str = ".txt") -> int:
    """Remove the listed tags (wildcards allowed) from every caption."""
    blacklist = list(blacklist)
    return edit_captions(target, lambda c: join_tags(remove_tags(split_tags(c), blacklist)), ext)


def dedupe_captions(target, ext: str = ".txt") -> int:
    """Remove repeated tags from every caption."""
    return edit_captions(target, lambda c: join_tags(dedupe_tags(split_tags(c))), ext)


def fill_missing(target, template: str, trigger: str = "", ext: str = ".txt") -> int:
    """Write `template` (e.g. "{trigger}, {folder}") as the caption of every image the trainer has no caption for.

    Placeholders: {trigger}, {folder} (kohya folder name), {filename} (file stem, `_` as spaces), {stem}.
    """
    root = Path(target) if isinstance(target, (str, Path)) else None
    written = 0
    for img in _images(target):
        if existing_caption(img, ext) is not None:
            continue
        folder, _ = folder_info(img, root or img.parent)
        text = format_template(template, img, folder=folder, trigger=trigger)
        if text:
            write_caption(img, text, ext)
            written += 1
    return written
