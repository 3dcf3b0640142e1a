"""Draw a grid of samples from the tiny base model and score them with the content measures.

    python datasets/sample_tiny_base.py --model datasets/tiny-base --grid datasets/tiny-base-samples.png

Rows are the shape colours, columns the backgrounds (one shape per column, cycling circle / square /
triangle), so a glance tells whether colour, background and shape follow the prompt. The script also
prints how often sd_lora.examples.measures reads back the prompted shape colour, background and shape.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from sd_lora.examples import measures as sm
from sd_lora.examples.shapes import COLOURS, SHAPES


def grid_prompts() -> list[list[tuple[str, str, str]]]:
    """Rows of (colour, shape, background): every colour on every other colour."""
    rows = []
    for colour in COLOURS:
        backgrounds = [b for b in COLOURS if b != colour]
        rows.append([(colour, SHAPES[j % len(SHAPES)], b) for j, b in enumerate(backgrounds)])
    return rows


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=64, width=64).images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="datasets/tiny-base")
    parser.add_argument("--grid", default="datasets/tiny-base-samples.png", help="where to write the grid PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scale", type=int, default=2, help="enlarge the grid this many times (nearest neighbour)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine, 0: PyTorch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sd_lora.models import load_base

    pipe = load_base(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = grid_prompts()
    images, hits = [], {"colour": 0, "background": 0, "shape": 0}
    start = time.time()
    for r, row in enumerate(rows):
        prompts = [f"a {c} {s} on a {b} background" for c, s, b in row]
        row_images = generate(pipe, prompts, args.seed + r, args.steps, args.guidance)
        images.append(row_images)
        for (c, s, b), im in zip(row, row_images):
            hits["colour"] += sm.dominant_colour(im) == c
            hits["background"] += sm.background_colour(im) == b
            hits["shape"] += sm.shape_of(im) == s
    n = sum(len(row) for row in rows)
    per_image = (time.time() - start) / n
    print(f"{n} images, {per_image:.2f} s each ({args.steps} steps, guidance {args.guidance})")
    for key, value in hits.items():
        print(f"  {key:10s} read back as prompted: {value}/{n}")

    size = images[0][0].width
    pad = 2
    grid = Image.new("RGB", (len(rows[0]) * (size + pad) + pad, len(rows) * (size + pad) + pad), (128, 128, 128))
    for r, row_images in enumerate(images):
        for c, im in enumerate(row_images):
            grid.paste(im, (pad + c * (size + pad), pad + r * (size + pad)))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.Resampling.NEAREST)
    grid.save(args.grid)
    print(f"grid: {args.grid} (rows: {', '.join(COLOURS)}; columns: the other colours as backgrounds)")
    print("  " + "\n  ".join(", ".join(f"{c} {s} on {b}" for c, s, b in row) for row in rows))


if __name__ == "__main__":
    main()
