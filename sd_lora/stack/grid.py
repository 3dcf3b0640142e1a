"""Labelled pictures side by side (weight sweeps, stack comparisons), and the one PNG writer that puts
the generation parameters in the file."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont


def label_grid(images: list[Image.Image], labels: list[str], title: str | None = None, pad: int = 4,
               columns: int | None = None) -> Image.Image:
    """`images` in rows of `columns` (default: one row), `labels` written above each image (and an
    optional title line above all). Every cell has the first image's size."""
    if not images or len(images) != len(labels):
        raise ValueError("label_grid needs as many labels as images (at least one)")
    columns = columns or len(images)
    if columns < 1:
        raise ValueError("label_grid: columns must be at least 1")
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    w, h = images[0].size
    line = _text_height(font) + 2 * pad
    top = line if title else 0
    cell_h = line + h + pad  # a label line, the image, a gap
    grid = Image.new("RGB", (min(columns, len(images)) * (w + pad) + pad, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), _fit(draw, title, font, grid.width - 2 * pad), fill="black", font=font)
    for i, (img, text) in enumerate(zip(images, labels)):
        x = pad + (i % columns) * (w + pad)
        y = top + (i // columns) * cell_h + line  # the image's top edge
        text = _fit(draw, text, font, w)
        tw = draw.textlength(text, font=font)
        draw.text((x + max(0, (w - tw) / 2), y - line + pad), text, fill="black", font=font)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
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
