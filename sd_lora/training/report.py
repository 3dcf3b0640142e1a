"""The run at a glance: a loss-curve PNG and a grid of the sample images, drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .. import artifacts
from ..io import atomic_path


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


VALIDATION_COLOUR = (230, 110, 20)


def draw_loss_curve(steps: list[int], losses: list[float], path: Path, size=(800, 400),
                    validation: list[tuple[int, float]] | None = None) -> Path:
    """Raw loss (light) and a moving average (dark) against the step, with axis labels; `validation`
    ((step, loss) pairs: training/validation.py) as a second line with a dot at each value."""
    W, H = size
    left, right, top, bottom = 70, 20, 20, 40
    validation = list(validation or [])
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    if steps:
        lo, hi = min(losses + [v for _, v in validation]), max(losses + [v for _, v in validation])
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s, v):
            return (left + (s - s0) / (s1 - s0) * (W - left - right), H - bottom - (v - lo) / (hi - lo) * (H - top - bottom))

        for series, colour in ((losses, (170, 190, 230)), (smooth(losses, max(1, len(losses) // 20)), (20, 60, 160))):
            pts = [xy(s, v) for s, v in zip(steps, series)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            else:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        val_pts = [xy(s, v) for s, v in validation]
        if len(val_pts) > 1:
            d.line(val_pts, fill=VALIDATION_COLOUR, width=2)
        for x, y in val_pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VALIDATION_COLOUR)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            y = xy(s0, v)[1]
            d.text((5, y - 6), f"{v:.4g}", fill=(0, 0, 0))
        d.text((left, H - bottom + 8), f"step {s0}", fill=(0, 0, 0))
        d.text((W - right - 80, H - bottom + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    d.text((left + 8, top + 4), "training loss (light: raw, dark: moving average)", fill=(0, 0, 0))
    if validation:
        d.text((left + 8, top + 18), f"validation loss (last {validation[-1][1]:.4g})", fill=VALIDATION_COLOUR)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def draw_sample_grid(paths: list[Path], path: Path, columns: int | None = None, cell: int = 256) -> Path | None:
    """The training samples in a grid: one row per sampling step, one column per prompt (by the
    step and prompt index that artifacts.sample_step reads from each file's name)."""
    placed = sorted((artifacts.sample_step(p), p) for p in paths if artifacts.sample_step(p) is not None)
    if not placed:
        return None
    rows: dict[str, list[Path]] = {}
    for (step, _), p in placed:
        rows.setdefault(f"step {step}", []).append(p)
    columns = columns or max(len(r) for r in rows.values())
    label = 16
    grid = Image.new("RGB", (columns * cell, len(rows) * (cell + label)), "white")
    d = ImageDraw.Draw(grid)
    for r, (name, row) in enumerate(rows.items()):
        y = r * (cell + label)
        d.text((4, y + 2), name, fill=(0, 0, 0))
        for c, p in enumerate(row[:columns]):
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                grid.paste(im, (c * cell + (cell - im.width) // 2, y + label + (cell - im.height) // 2))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
