"""Labelled pictures side by side (weight sweeps, stack comparisons), and the one PNG writer that puts
the generation parameters in the file."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont


def label_grid(images: list[Image.Image], labels: list[str], title: str | None = None, pad: int = 4,
               columns: int | None = None) -> Image.Image:
    """`images` in rows of `columns` (default: one row), `labels` written above each image (and an
    optional title above all). Every cell has the first image's size. A label or title wider than its
    room is wrapped at spaces onto more lines (a word wider than the room alone is split), never cut:
    the demo's row titles lost their ends ("a large red circle on a bl…") in two-cell rows."""
    if not images or len(images) != len(labels):
        raise ValueError("label_grid needs as many labels as images (at least one)")
    columns = columns or len(images)
    if columns < 1:
        raise ValueError("label_grid: columns must be at least 1")
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    w, h = images[0].size
    width = min(columns, len(images)) * (w + pad) + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    title_lines = _wrap(title, lambda t: measure(t, font=font), width - 2 * pad) if title else []
    cell_lines = [_wrap(text, lambda t: measure(t, font=font), w) for text in labels]
    line_h = _text_height(font)
    band = max(len(x) for x in cell_lines) * line_h + 2 * pad  # every cell's label band: the tallest label
    top = len(title_lines) * line_h + 2 * pad if title_lines else 0
    cell_h = band + h + pad  # the label lines, the image, a gap
    grid = Image.new("RGB", (width, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((pad, pad + k * line_h), text, fill="black", font=font)
    for i, (img, lines) in enumerate(zip(images, cell_lines)):
        x = pad + (i % columns) * (w + pad)
        y = top + (i // columns) * cell_h + band  # the image's top edge
        for k, text in enumerate(lines):
            tw = draw.textlength(text, font=font)
            draw.text((x + max(0, (w - tw) / 2), y - band + pad + k * line_h), text, fill="black", font=font)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
    return grid


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def _wrap(text: str, length, width: float) -> list[str]:
    """`text` in lines no wider than `width` (as `length` measures): words kept whole where they fit
    on a line alone, longer words split between characters. At least one line."""
    lines: list[str] = []
    for word in text.split():
        while length(word) > width and len(word) > 1:  # too wide alone: as much as fits, then the rest
            cut = max((n for n in range(1, len(word)) if length(word[:n]) <= width), default=1)
            lines.append(word[:cut])
            word = word[cut:]
        if lines and length(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> None:
    """Save a PNG atomically; `parameters` goes in the text chunk A1111 and Civitai read."""
    from PIL import PngImagePlugin

    from ..io import atomic_path

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
