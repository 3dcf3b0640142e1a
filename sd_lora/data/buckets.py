"""Aspect-ratio buckets: train on non-square images without cropping away half of them.

Each image goes to the bucket (width, height) whose aspect ratio is closest to its own, with area
<= resolution^2 and both sides multiples of `step` (64 by default: the UNet downsamples by 8 and the
latent by another 8 in its deepest block). Small images are not upscaled by default: they get their
own smaller bucket that fits inside them. Images are resized to cover the bucket and center-cropped,
and the crop offset is kept (SDXL conditions on it); with random_crop each step draws its own offset
(data/augment.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """All (w, h) with w*h <= resolution^2, sides multiples of `step`, aspect within 1/max_ratio..max_ratio.

    For each width the tallest height that fits is used, as kohya does, so buckets use the full area;
    every bucket also exists turned sideways. With `min_side` or `max_side` (kohya's min_bucket_reso /
    max_bucket_reso) the buckets are kohya's instead: every width from min_side to max_side with the
    tallest height <= max_side that fits the area, whatever the aspect (library/model_util.py
    make_bucket_resolutions, kohya-ss/sd-scripts 48d368fa).
    """
    area = resolution * resolution
    if min_side is not None or max_side is not None:
        low = min_side if min_side is not None else max(step, resolution // 2 // step * step)
        high = max_side if max_side is not None else 2 * resolution
        side = int(math.sqrt(area) // step) * step
        kohya = {(side, side)}
        for w in range(low, high + 1, step):
            h = min(high, int(area // w) // step * step)
            if h >= low:
                kohya.update({(w, h), (h, w)})
        return sorted(kohya)
    min_side = max(step, resolution // 2 // step * step)  # kohya: 256 for 512
    buckets = set()
    w = min_side
    while w <= resolution * max_ratio:
        h = min(int(area // w) // step * step, int(w * max_ratio) // step * step)
        if h >= min_side and w / h <= max_ratio and h / w <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))  # and the same bucket turned sideways
        w += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: the bucket and how it is resized + cropped into it."""

    bucket: tuple[int, int]  # (width, height) of the training image
    resized: tuple[int, int]  # (width, height) after resizing, before the crop
    crop: tuple[int, int]  # (top, left) of the crop in the resized image
    original: tuple[int, int]  # (width, height) of the source image


def place(size: tuple[int, int], resolution: int, step: int = 64, buckets: list[tuple[int, int]] | None = None,
          upscale: bool = False, square: bool = False) -> Placement:
    """Choose the bucket for an image of `size` = (w, h) and the resize/crop that fills it."""
    w, h = size
    if square:
        bw = bh = resolution
        if not upscale and min(w, h) < resolution:
            bw = bh = max(step, min(w, h) // step * step)
    else:
        buckets = buckets or make_buckets(resolution, step)
        ratio = math.log(w / h)
        bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
        if not upscale and (w < bw or h < bh):
            # The largest step-multiple rectangle inside the image instead of blowing it up.
            bw, bh = max(step, min(bw, w // step * step)), max(step, min(bh, h // step * step))
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    top, left = (rh - bh) // 2, (rw - bw) // 2
    return Placement(bucket=(bw, bh), resized=(rw, rh), crop=(top, left), original=(w, h))


def apply_placement(img: Image.Image, p: Placement) -> Image.Image:
    """Resize (Lanczos) and center-crop `img` into its bucket."""
    if img.size != p.resized:
        img = img.resize(p.resized, Image.Resampling.LANCZOS)
    top, left = p.crop
    return img.crop((left, top, left + p.bucket[0], top + p.bucket[1]))
