"""Per-step augmentations with kohya sd-scripts' names and rules: random crop, colour augmentation, caption tag
dropout and wildcard captions (flip, caption shuffling and dropout are in data/captions.py and the loop).

Every draw comes from the `random.Random` the loop seeds for one step (a function of seed, step, micro batch and
process), never from a global stream, so a resumed run draws exactly what the uninterrupted one drew.

As kohya does it (kohya-ss/sd-scripts 48d368fa, library/train_util.py):
- random_crop (trim_and_resize_if_required, L2965-2994): after the resize that covers the bucket, the overhang
  is cut at `randint(0, overhang)` (both ends included) instead of `overhang // 2`, width first, then height.
  kohya leaves SDXL's crop time ids at the centred values there ("I have no idea how to reflect the cropped
  value", L2990); here the offset really used is the crop time id, which is what SDXL's crop conditioning means
  (and what the centre crop already gets). The loss mask is cropped with the image.
- color_aug (AugHelper.color_aug, L381-406): with probability 0.33, either (one half) a hue shift drawn from
  uniform(-8, 8) in OpenCV's hue units (2 degrees each, so up to 16 degrees), or (the other half) a gamma drawn
  from uniform(0.95, 1.05). Two differences, both deliberate: kohya passes RGB pixels to OpenCV's BGR2HSV, so its
  shift of +h turns hues by -2h degrees; we turn by -2h too (the same result for the same draw), in floating point
  rather than through OpenCV's 8-bit HSV (hues in 2-degree steps), so values can differ by a rounding step. And
  kohya's gamma raises the 0-255 values themselves (255 ** 1.05 = 335 clips every pixel above 196 to white,
  255 ** 0.95 = 193 darkens the image by a quarter), which is not the "weak color augmentation" its --color_aug
  help promises nor albumentations' RandomGamma((95, 105)) that its code replaced (the commented-out lines above
  it); we apply the gamma to values in [0, 1], as RandomGamma does.
- caption_tag_dropout_rate (BaseDataset.process_caption, L866-914): after shuffling, each tag that is neither kept
  by keep_tokens nor outside keep_tokens_separator is dropped when `random() < rate`.
- enable_wildcard (process_caption L839-862, and the caption reading L1965-1966 / L2322-2330): a caption file's
  non-empty lines are kept; each use picks one line, then each `{a|b|c}` one of its choices; `{{` and `}}` are
  literal braces. Then keep_tokens_separator, shuffling and dropout apply to the picked text. kohya adds
  caption_prefix / caption_suffix before picking the line (so only the first line gets the prefix and only the
  last the suffix); we pick first, so every line gets both, as kohya's documented example (a prefix ending in
  `|||` with wildcards on) needs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the caption functions (imported by the caption tools) need neither NumPy nor Pillow
    import numpy as np
    from PIL import Image

    from .buckets import Placement

COLOR_AUG_PROBABILITY = 0.33  # kohya: `if random.random() <= 0.33`
HUE_SHIFT_LIMIT = 8  # OpenCV hue units (half degrees of the 0-180 range): 16 degrees
GAMMA_RANGE = (0.95, 1.05)
_WILDCARD = re.compile(r"\{([^}]+)\}")


# ---- pixels -------------------------------------------------------------------------------------------------

def random_crop(p: Placement, rng: random.Random) -> Placement:
    """The placement with its crop offset drawn uniformly over the overhang (kohya's rule); unchanged when the
    resized image is the bucket's size."""
    (rw, rh), (bw, bh) = p.resized, p.bucket
    left = rng.randint(0, rw - bw) if rw > bw else p.crop[1]
    top = rng.randint(0, rh - bh) if rh > bh else p.crop[0]
    return replace(p, crop=(top, left))


@dataclass(frozen=True)
class ColorShift:
    """One draw of kohya's colour augmentation: a hue shift (OpenCV hue units, as kohya draws it) or a gamma."""

    kind: str  # "hue" or "gamma"
    amount: float


def draw_color(rng: random.Random) -> ColorShift | None:
    """kohya's draws, in kohya's order: apply at all (1/3), then hue (`random() > 0.5`) or gamma."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return None
    if rng.random() > 0.5:
        return ColorShift("hue", rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return ColorShift("gamma", rng.uniform(*GAMMA_RANGE))


def _rgb_to_hsv(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float RGB in [0, 255] -> hue in degrees [0, 360), saturation in [0, 1], value in [0, 255]."""
    import numpy as np

    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    v = a.max(axis=-1)
    c = v - a.min(axis=-1)
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, (g - b) / safe % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    h = np.where(c > 0, h, 0.0)
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    return h, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    import numpy as np

    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(int) % 6
    r = np.choose(sector, [c, x, zero, zero, x, c])
    g = np.choose(sector, [x, c, c, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, c, c, x])
    m = v - c
    return np.stack([r + m, g + m, b + m], axis=-1)


def apply_color(img: Image.Image, shift: ColorShift) -> Image.Image:
    """An RGB image with one colour draw applied (see the module docstring for how it matches kohya)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    if shift.kind == "hue":
        h, s, v = _rgb_to_hsv(a)
        # kohya's +h on RGB data read as BGR is -2h degrees of the RGB hue (R and B swapped mirror the hue circle)
        out = _hsv_to_rgb((h - 2.0 * shift.amount) % 360.0, s, v)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    table = (np.arange(256) / 255.0) ** shift.amount * 255.0  # RandomGamma's lookup table, truncated as kohya's astype
    return Image.fromarray(table.astype(np.uint8)[np.asarray(img)], "RGB")


@dataclass(frozen=True)
class View:
    """What one step trains of one image: its crop, whether it is mirrored, its colour draw."""

    placement: Placement
    flipped: bool = False
    color: ColorShift | None = None

    @property
    def conditioned(self) -> Placement:
        """The placement SDXL's time ids describe: a mirrored image's crop starts from the other side."""
        p = self.placement
        if not self.flipped:
            return p
        return replace(p, crop=(p.crop[0], p.resized[0] - p.crop[1] - p.bucket[0]))


def draw_view(placement: Placement, options, flipped: bool, rng: random.Random) -> View:
    """The View of one image at one step: the subset's random_crop and color_aug drawn from `rng` (options: a
    Subset, or None for no augmentation)."""
    if options is not None and options.random_crop:
        placement = random_crop(placement, rng)
    color = draw_color(rng) if options is not None and options.color_aug else None
    return View(placement, flipped, color)


# ---- captions -----------------------------------------------------------------------------------------------

def _braces(text: str) -> tuple[str, str]:
    """Stand-ins for `{{` and `}}` that the text does not contain (kohya's escape)."""
    left, right = "⦅", "⦆"
    while left in text or right in text:
        left, right = left + "⦅", right + "⦆"
    return left, right


def has_wildcards(caption: str) -> bool:
    """Whether a caption differs from use to use with wildcards on (several lines, or a `{a|b}`)."""
    if "\n" in caption:
        return True
    left, right = _braces(caption)
    return bool(_WILDCARD.search(caption.replace("{{", left).replace("}}", right)))


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """One line of a several-line caption, then one choice of each `{a|b|c}` (`{{` / `}}`: literal braces)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    left, right = _braces(caption)
    caption = caption.replace("{{", left).replace("}}", right)
    caption = _WILDCARD.sub(lambda m: rng.choice(m[1].split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")


def drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    """Each tag kept when `random() >= rate` (kohya's dropout_tags); no draw at all when rate is 0."""
    if rate <= 0:
        return list(tags)
    return [t for t in tags if rng.random() >= rate]
