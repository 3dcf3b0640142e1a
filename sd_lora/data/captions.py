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

from .augment import drop_tags, expand_wildcards, has_wildcards

DEFAULT_EXTENSIONS = (".txt", ".caption")


def caption_extensions(preferred: str = ".txt") -> tuple[str, ...]:
    return (preferred,) + tuple(e for e in DEFAULT_EXTENSIONS if e != preferred)


def read_caption(image: Path, extensions: tuple[str, ...], lines: bool = False) -> tuple[str | None, str | None]:
    """(caption text, extension used) for `image`, or (None, None) when it has no non-empty caption file.
    lines (wildcards on): the file's non-empty lines are kept, one per line, for one to be picked per use."""
    for ext in extensions:
        side = image.with_suffix(ext)
        if side.is_file():
            try:
                text = side.read_text(encoding="utf-8-sig", errors="replace")
            except OSError:
                continue
            if lines:
                text = "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
            else:
                text = " ".join(text.split())  # one line: newlines and runs of spaces collapse
            if text:
                return text, ext
    return None, None


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Comma-separated tags (or split at `separator`); a sentence caption ("a photo of a dog") is one tag."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


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
    return {folder: dict(Counter(t for c in caps for line in c.split("\n") for t in split_tags(line)))
            for folder, caps in captions_by_folder.items()}


# ---- a subset's caption options, as kohya applies them (library/train_util.py BaseDataset.process_caption,
# kohya-ss/sd-scripts 48d368fa): prefix/suffix, whole-caption dropout, keep_tokens / keep_tokens_separator,
# shuffling, tag dropout, wildcards (data/augment.py), the caption and secondary separators. One difference: when
# nothing is shuffled or dropped kohya trains the keep_tokens_separator characters ("|||") as written; here the
# separator never reaches the text encoder.


def _with_affixes(caption: str, options) -> str:
    text = caption
    if options.caption_prefix:
        text = f"{options.caption_prefix} {text}"
    if options.caption_suffix:
        text = f"{text} {options.caption_suffix}"
    return " ".join(text.split())


def _parts(caption: str, options) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, shuffled, kept at the end) tags: split at keep_tokens_separator when the caption has it,
    else the first keep_tokens tags are kept."""
    sep, tag_sep = options.keep_tokens_separator, options.caption_separator or ","
    if sep and sep in caption:
        front, rest = caption.split(sep, 1)
        rest, back = rest.split(sep, 1) if sep in rest else (rest, "")
        return split_tags(front, tag_sep), split_tags(rest, tag_sep), split_tags(back, tag_sep)
    tags = split_tags(caption, tag_sep)
    keep = options.keep_tokens or 0
    return tags[:keep], tags[keep:], []


def _finish(tags: list[str], options) -> str:
    text = join_tags(tags)  # kohya joins with ", " whatever the caption separator
    if options.secondary_separator:
        text = text.replace(options.secondary_separator, options.caption_separator or ",")  # kohya's rule
    return text


def fixed_caption(caption: str, options) -> str | None:
    """The caption a subset trains on when it is the same every step (no shuffling, tag dropout or wildcard
    choice), else None. Dropout aside: a dropped caption is ""."""
    if options.shuffle_captions or options.caption_tag_dropout or (options.wildcards and has_wildcards(caption)):
        return None
    if options.wildcards:
        caption = expand_wildcards(caption, random.Random(0))  # nothing to choose: only `{{` / `}}` become braces
    return _as_written(caption, options)


def _as_written(caption: str, options) -> str:
    text = _with_affixes(caption, options)
    if options.keep_tokens_separator and options.keep_tokens_separator in text:
        head, middle, tail = _parts(text, options)
        return _finish(head + middle + tail, options)
    # as written otherwise (kohya too leaves an unshuffled caption alone but for the secondary separator)
    return text.replace(options.secondary_separator, options.caption_separator or ",") if options.secondary_separator else text


def step_caption(caption: str, options, rng: random.Random, epoch: int) -> str:
    """The caption of one image at one step: its wildcards chosen, shuffled and dropped by its subset's options with
    `rng` (seeded per step, so a resumed run draws the same); `epoch` counts from 0 (kohya's every-N-epochs dropout
    counts from 1). A draw is made only for what is on, so turning one option on leaves the others' draws alone."""
    if options.wildcards:  # a line, then the {a|b} choices, before the affixes (data/augment.py's docstring says why)
        caption = expand_wildcards(caption, rng)  # no draw when there is nothing to choose
    if options.shuffle_captions or options.caption_tag_dropout:
        text = _with_affixes(caption, options)
        head, middle, tail = _parts(text, options)
        if options.shuffle_captions:
            rng.shuffle(middle)
        text = _finish(head + drop_tags(middle, options.caption_tag_dropout, rng) + tail, options)
    else:
        text = _as_written(caption, options)
    if options.caption_dropout and rng.random() < options.caption_dropout:
        return ""
    every = options.caption_dropout_every_n_epochs
    if every and (epoch + 1) % every == 0:
        return ""
    return text
