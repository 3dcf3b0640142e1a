"""Captioners that need no model: from the file name, the folder name, or a template.

They never decode an image, so they caption thousands of files in a second. Typical use: a
DreamBooth-style dataset where every image is "sks dog" (`template` with "{trigger}, {folder}"), or
files already named after what they show ("red_circle_03.png" -> "red circle").
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from .base import Captioner, CaptionerError, Option, Source, register_captioner
from .edit import join_tags, split_tags

# "dog_003", "dog (2)", "dog-17": a trailing counter is not part of what the image shows.
_TRAILING_COUNTER = re.compile(r"[\s_\-.]*(\(\d+\)|\d+)$")

TEMPLATE_FIELDS = ("trigger", "folder", "filename", "stem")


def filename_words(path: Path, strip_numbers: bool = True) -> str:
    """A file's stem as words: underscores become spaces, a trailing counter is dropped."""
    stem = path.stem
    if strip_numbers:
        stem = _TRAILING_COUNTER.sub("", stem)
    return " ".join(stem.replace("_", " ").split())


def format_template(template: str, path: Path | None, folder: str = "", trigger: str = "") -> str:
    """Fill {trigger}, {folder}, {filename} (stem as words) and {stem} (the raw stem) into `template`.

    Empty fields leave no stray commas or double spaces: "{trigger}, {folder}" with no trigger is
    just the folder name.
    """
    fields = {
        "trigger": trigger.strip(),
        "folder": folder,
        "filename": filename_words(path) if path else "",
        "stem": path.stem if path else "",
    }
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in fields:
            raise CaptionerError(
                f"unknown placeholder {{{name}}} in caption template {template!r}; use {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}."
            )
    try:
        text = template.format_map(fields)
    except (ValueError, IndexError) as e:
        raise CaptionerError(f"invalid caption template {template!r}: {e}. Write literal braces as {{{{ and }}}}.") from e
    return join_tags(split_tags(" ".join(text.split())))


@register_captioner
class FilenameCaptioner(Captioner):
    name = "filename"
    description = "the image's file name as words ('red_circle_03.png' -> 'red circle')"
    options = {"strip_numbers": Option(True, "drop a trailing counter such as _03 or (2)")}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "no words in the file name"  # 000.png, IMG_0001.jpg with strip_numbers ...
    empty_advice = ("name the files after what they show (red_circle_03.png), or use the 'template' or 'folder' "
                    "captioner (e.g. '{trigger}, {folder}') or a model captioner (wd14, transformers)")

    def caption(self, sources: list[Source]) -> list[str]:
        return [filename_words(s.path, bool(self.config["strip_numbers"])) if s.path else "" for s in sources]


@register_captioner
class FolderCaptioner(Captioner):
    name = "folder"
    description = "the dataset folder's name without kohya's repeats ('10_sks dog' -> 'sks dog')"
    options = {}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "no words in the folder name"
    empty_advice = "put the images in a folder named after what they show (10_sks dog), or use the 'template' captioner"

    def caption(self, sources: list[Source]) -> list[str]:
        return [s.folder for s in sources]


@register_captioner
class TemplateCaptioner(Captioner):
    name = "template"
    description = "a fixed text with placeholders {trigger}, {folder}, {filename}, {stem}"
    options = {"template": Option("{trigger}, {folder}", "the caption text; placeholders: " + ", ".join("{%s}" % f for f in TEMPLATE_FIELDS))}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "the template gave no text"
    empty_advice = "use a template with fixed words, or pass a trigger word for {trigger}"

    def __init__(self, **options):
        super().__init__(**options)
        format_template(self.config["template"], None)  # a bad template fails here, before any file is touched

    def caption(self, sources: list[Source]) -> list[str]:
        return [format_template(self.config["template"], s.path, s.folder, s.trigger) for s in sources]
