"""Captions: read side files the way users keep them, and the per-step caption augmentations.

A caption is the text file next to the image with the same stem. Tools disagree on the extension
(kohya: `.caption` by default in old versions, `.txt` in most guides), and a caption silently
ignored because of the extension is a classic way to waste a run, so we read the configured
extension first, then `.txt` and `.caption`, and report which ones were used.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".caption")


def caption_extensions(preferred: str = ".txt") -> tuple[str, ...]:
    return (preferred,) + tuple(e for e in DEFAULT_EXTENSIONS if e != preferred)


def read_caption(image: Path, extensions: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(caption text, extension used) for `image`, or (None, None) when it has no non-empty caption file."""
    for ext in extensions:
        side = image.with_suffix(ext)
        if side.is_file():
            try:
                text = side.read_text(encoding="utf-8-sig", errors="replace")
            except OSError:
                continue
            text = " ".join(text.split())  # one line: newlines and runs of spaces collapse
            if text:
                return text, ext
    return None, None


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags; a sentence caption ("a photo of a dog") is one tag."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags) -> str:
    return ", ".join(t for t in tags if t)


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first `keep_tokens` (e.g. the trigger word) in place."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return join_tags(head + tail)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} as kohya writes to ss_tag_frequency (tools read trigger words from it)."""
    return {folder: dict(Counter(t for c in caps for t in split_tags(c))) for folder, caps in captions_by_folder.items()}
