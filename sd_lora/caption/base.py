"""The captioner interface and the registry of captioners.

A captioner turns a batch of images into a batch of caption strings. That is all it does: which
images are captioned, what happens to existing captions (fill / replace / append), trigger words,
prefix/suffix, tag clean-up and writing the side files are the job of `run.py`, the same for every
captioner. So a new captioner is one small file: subclass `Captioner`, declare its options, implement
`caption()`, decorate it with `@register_captioner`, and add its module to `_BUILTIN_MODULES` below
(or register it from your own code).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image


class CaptionerError(ValueError):
    """A captioner that cannot be set up or run. The message says what to do about it."""


@dataclass(frozen=True)
class Option:
    """One option a captioner accepts: its default and a line of help for `sd-lora caption --list`."""

    default: Any
    help: str


@dataclass
class Source:
    """One image to caption, with what the non-visual captioners need to know about it."""

    path: Path | None  # the image file (None for an image passed from Python without a file)
    image: Image.Image | None = None  # decoded upright RGB; None when the captioner does not need pixels
    folder: str = ""  # the dataset folder's name without kohya's "N_" repeats prefix
    trigger: str = ""  # the run's trigger word, for templates that place it themselves


class Captioner:
    """Base class: `caption(sources) -> captions`, one caption per source, in order.

    Subclasses set `name`, `description`, `options` (name -> Option) and `needs_images`. The
    constructor checks option names and fills in defaults, so a typo is an error listing the valid
    names rather than an option silently ignored.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    needs_images: ClassVar[bool] = True  # False: paths only, images are never decoded (fast)
    default_batch_size: ClassVar[int] = 8
    # Why a caption came out empty, and what to do instead: the run's report says both, because
    # "wrote 0 captions" alone leaves a newcomer guessing.
    empty_reason: ClassVar[str] = "the captioner gave no text"
    empty_advice: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise CaptionerError(
                f"captioner {self.name!r} does not accept option(s) {', '.join(unknown)}; it accepts: {accepted}."
            )
        self.config: dict[str, Any] = {k: o.default for k, o in self.options.items()}
        self.config.update({k: v for k, v in options.items() if v is not None})

    def caption(self, sources: list[Source]) -> list[str]:
        raise NotImplementedError

    def caption_images(self, images: list[Image.Image], trigger: str = "") -> list[str]:
        """Caption PIL images directly (no files involved)."""
        return self.caption([Source(path=None, image=im.convert("RGB"), trigger=trigger) for im in images])

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this captioner's output, for resuming an interrupted run with the same settings."""
        return {"captioner": self.name, **{k: _plain(v) for k, v in sorted(self.config.items())}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


# name -> class. Built-in captioners register themselves when their module is imported.
_REGISTRY: dict[str, type[Captioner]] = {}
_BUILTIN_MODULES = ("simple", "transformers_captioner", "wd14")  # under sd_lora.caption; imports are cheap


def register_captioner(cls: type[Captioner]) -> type[Captioner]:
    """Class decorator: make `cls` available as `get_captioner(cls.name)` and `--captioner NAME`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` to be registered.")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"sd_lora.caption.{module}")


def available_captioners() -> dict[str, type[Captioner]]:
    """All registered captioners, by name."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_captioner(name: str, **options: Any) -> Captioner:
    """Build the captioner called `name` with `options` (unknown options are an error)."""
    registry = available_captioners()
    if name not in registry:
        raise CaptionerError(f"unknown captioner {name!r}; available: {', '.join(registry)}.")
    return registry[name](**options)
