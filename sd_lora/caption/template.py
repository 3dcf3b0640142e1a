"""Caption templates: "{trigger}, {folder}" filled in for one image. Used by the template captioner
(simple.py) and by fill_missing (edit.py)."""

from __future__ import annotations

import re
import string
from pathlib import Path

from ..data.captions import join_tags, split_tags
from .base import CaptionerError

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
