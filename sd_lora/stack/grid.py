"""Side-by-side pictures of a weight sweep, with each column labelled, so weights can be compared."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont


def label_grid(images: list[Image.Image], labels: list[str], title: str | None = None, pad: int = 4) -> Image.Image:
    """One row of `images` with `labels` written above each (and an optional title line above all)."""
    if not images or len(images) != len(labels):
        raise ValueError("label_grid needs as many labels as images (at least one)")
    font = ImageFont.load_default()
    w, h = images[0].size
    line = _text_height(font) + 2 * pad
    top = line * (2 if title else 1)
    grid = Image.new("RGB", (len(images) * (w + pad) + pad, top + h + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for i, (img, text) in enumerate(zip(images, labels)):
        x = pad + i * (w + pad)
        text = _fit(draw, text, font, w)
        tw = draw.textlength(text, font=font)
        draw.text((x + max(0, (w - tw) / 2), top - line + pad), text, fill="black", font=font)
        grid.paste(img.convert("RGB").resize((w, h)), (x, top))
    return grid


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while len(text) > 4 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if not text.endswith("…") else text[:-2] + "…"
    return text


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> None:
    """Save a PNG atomically; `parameters` goes in the text chunk A1111 and Civitai read."""
    from PIL import PngImagePlugin

    from ..io import atomic_path

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
