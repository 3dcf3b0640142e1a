"""Loss masks (masked loss): which pixels of an image train, as weights in [0, 1] at latent size.

A mask comes from the image's own alpha channel (`alpha_mask`: opaque = 1) or from a mask image of the same
name in `mask_path` (white = 1, black = 0, grey in between; the red channel is read). It takes the image's
geometry: the same EXIF rotation, the same bucket resize and crop, the same flip. It is then downsampled to
the latent's size by area averaging, and the per-pixel loss is multiplied by it before the mean
(training/loss.py diffusion_loss). The mean is over all pixels, not over the masked ones: a half-masked image
weighs half, as in kohya.

As kohya sd-scripts does it (commit 48d368fa557731ad0488c07304dfeba8c07910eb): library/custom_train_functions.py
apply_masked_loss (L487-503: R channel of the conditioning image or the alpha mask, F.interpolate(mode="area")
to the loss's size, multiplied, then train_network.py L471-473 takes the plain mean); library/train_util.py
load_images_and_masks_for_caching (L2997-3035: alpha / 255, ones for an image without alpha) and the
conditioning images of ControlNetDataset (L2525-2577: found by file name in conditioning_data_dir, refused when
not the image's size, resized and cropped with it, flipped with it). kohya keeps the mask at image size and
downsamples it at each step; we downsample once when caching, which gives the same numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..config import IMAGE_EXTENSIONS
from .buckets import Placement, apply_placement
from .images import ImageProblem

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Mask:
    """Where one image's mask comes from: a mask image, or (alpha) the image file itself."""

    path: Path
    alpha: bool
    digest: str  # part of the latent cache key: "alpha" (the image hash covers the alpha), or the mask file's sha256


def find_mask_file(image: Path, subset_folder: Path | None, mask_dir: Path) -> Path | None:
    """The mask image for `image`: the same relative path under `mask_dir` (also under mask_dir/<subset folder
    name>, for one mask folder mirroring a kohya `N_name` layout), the same file name first, else the same name
    with another image extension (a .png mask of a .jpg image)."""
    rel = image.relative_to(subset_folder) if subset_folder is not None and image.is_relative_to(subset_folder) else Path(image.name)
    places = [mask_dir / rel] + ([mask_dir / subset_folder.name / rel] if subset_folder is not None else [])
    for place in places:
        if place.is_file():
            return place
        if place.parent.is_dir():
            for ext in IMAGE_EXTENSIONS:
                for cand in (place.with_suffix(ext), place.with_suffix(ext.upper())):
                    if cand.is_file():
                        return cand
    return None


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return ImageOps.exif_transpose(img)  # the image is rotated by its EXIF: its mask must be too
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageProblem(f"mask {path}: not an image Pillow can read ({e})") from e


def mask_for(image: Path, image_size: tuple[int, int], subset_folder: Path | None, alpha: bool,
             mask_dir: Path | None) -> Mask | None:
    """The Mask of one image (None: no mask source), or ImageProblem saying what is wrong with it: a mask image
    that is missing, unreadable, or not the image's size (refused, as kohya does: a mask resized to fit would
    no longer cover what it was drawn on)."""
    if mask_dir is not None:
        found = find_mask_file(image, subset_folder, mask_dir)
        if found is None:
            raise ImageProblem(f"no mask for {image} in {mask_dir} (expected {mask_dir / image.name} or the same name "
                               "with another image extension); add it, or remove mask_path to train it unmasked")
        size = _open(found).size
        if size != image_size:
            raise ImageProblem(f"mask {found} is {size[0]}x{size[1]} but its image {image} is {image_size[0]}x{image_size[1]}: "
                               "a mask must be the size of its image (draw or export it at that size)")
        return Mask(found, False, hashlib.sha256(found.read_bytes()).hexdigest())
    if alpha:
        return Mask(image, True, "alpha")
    return None


def mask_image(mask: Mask) -> Image.Image:
    """The mask as an 8-bit greyscale image at the (EXIF-upright) image's size: alpha, or the red channel."""
    img = _open(mask.path)
    if mask.alpha:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode not in ALPHA_MODES:
            return Image.new("L", img.size, 255)  # no alpha: every pixel trains (kohya: ones)
        return img.convert("RGBA").getchannel("A")
    return img.convert("RGB").getchannel("R")


def has_alpha(path: Path) -> bool:
    img = Image.open(path)
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def pixel_mask(mask: Mask, placement: Placement, flipped: bool) -> torch.Tensor:
    """(H, W) weights in [0, 1] at bucket size: resized, cropped and flipped as the image is (data/cache.py
    item_pixels)."""
    img = apply_placement(mask_image(mask), placement)
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def latent_mask(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) pixel weights -> (1, h, w) at the latent's size, each the mean of the pixels it covers (kohya's
    F.interpolate mode="area")."""
    return F.interpolate(pixels[None, None].float(), size=tuple(size), mode="area")[0]
