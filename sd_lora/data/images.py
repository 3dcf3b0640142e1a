"""Open user images safely: every odd file is either fixed or reported, never a crash mid-run.

Real datasets hold CMYK JPEGs, 16-bit PNGs, images with alpha, phone photos whose EXIF says
"rotate me", truncated downloads and the occasional 20000x20000 scan. We fix what has one sensible
meaning (rotate by EXIF, convert modes, composite alpha on white) and skip the rest with a reason.
Pillow and NumPy only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageProblem(ValueError):
    """An image that cannot be used. The message is the reason shown in the skipped-images report."""


def open_image(path: str | Path, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image, or raise ImageProblem saying why it cannot be used."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit; we apply ours before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageProblem(f"too large ({w}x{h} = {w * h / 1e6:.0f} MP > {max_pixels / 1e6:.0f} MP limit; downscale it)")
            if w < 8 or h < 8:
                raise ImageProblem(f"too small ({w}x{h})")
            img.load()  # decode now: a truncated file fails here, not in the middle of training
            img = ImageOps.exif_transpose(img)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as e:
        raise ImageProblem(f"too large (decompression bomb guard: {e})") from e
    except UnidentifiedImageError as e:
        raise ImageProblem("not an image Pillow can read (corrupt, or an unsupported format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageProblem(f"damaged or truncated file ({e})") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit/float scaled to 0..255."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: scale the real range to 8 bits (a plain convert("L") clips to 255)
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        if mode == "F":
            top = max(float(a.max()), 1e-8)
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV ...


def image_to_tensor(img: Image.Image):
    """HWC uint8 RGB -> CHW float tensor in [-1, 1] (what the VAE expects)."""
    import torch

    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a.transpose(2, 0, 1).copy())
