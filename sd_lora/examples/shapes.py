"""Small captioned image sets in the kohya dataset-folder format, made reproducibly.

    from sd_lora.examples.shapes import make_datasets
    make_datasets("datasets/generated")          # or: python datasets/make_datasets.py

writes one dataset root per set, each holding one `<repeats>_<name>` folder of 64x64 RGB PNGs with a
same-stem `.txt` caption beside every image:

    shapes/1_shapes/     360 content images: "a small red circle on a blue background"
    stripes/10_stripes/   30 style images: diagonal stripes over the background, trigger "striped"
    outline/10_outline/   30 style images: thick black outline around the shape, trigger "outlined"
    pastel/10_pastel/     30 style images: every colour mixed towards white, trigger "pastel"
    reg/1_shapes/         40 regularization images: plain content, no trigger word

Each root also gets a `labels.jsonl` with the ground truth of every image (shape, colours, size,
centre), which kohya-style scanners ignore because it is not inside an `N_name` folder.

Only Pillow and NumPy are used, and every random draw comes from a NumPy generator seeded from
(--seed, set name), so the same command writes the same bytes on every machine.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased

# Colour words are all in sd_lora.testing.TINY_VOCAB_WORDS, so each is one token for the tiny model.
# The values are far apart in RGB, so a pixel's nearest palette colour names it unambiguously.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# "radius" of the shape in pixels: circle radius, half the square's side; a triangle's circumradius is
# 1.25x this, which gives it about the area of the circle.
SIZES = {"small": 10, "large": 19}

STRIPE_PERIOD = 8  # pixels along x (and y) per dark+light pair of the diagonal stripes
OUTLINE_WIDTH = 3  # pixels
PASTEL_MIX = 0.55  # fraction of white mixed into every colour by the pastel style


def pastel(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pastel version of a colour: mixed towards white."""
    return tuple(int(round(c * (1 - PASTEL_MIX) + 255 * PASTEL_MIX)) for c in rgb)


# The style sets: trigger word, kohya repeats, image count, and which colours make sense. An
# outline is invisible on black, and pastel black/white are just grey/white, so those are left out.
STYLES = {
    "stripes": dict(trigger="striped", repeats=10, count=30, colours=tuple(COLOURS)),
    "outline": dict(trigger="outlined", repeats=10, count=30, colours=("red", "green", "blue", "yellow", "white")),
    "pastel": dict(trigger="pastel", repeats=10, count=30, colours=("red", "green", "blue", "yellow")),
}
CONTENT_COPIES = 2  # every (shape, colour, background, size) combination twice: 3*6*5*2*2 = 360 images
REG_COUNT = 40


@dataclass
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    cx: float  # shape centre in pixels
    cy: float
    style: str = "none"

    def caption(self, trigger: str | None = None) -> str:
        text = f"a {self.size} {self.colour} {self.shape} on a {self.background} background"
        # Trigger word last (real datasets often put it first, for kohya's keep_tokens): the tiny
        # base's text encoder is a frozen random network that tells words apart by position, so a
        # leading trigger would move every content word to a position the base never learned it at.
        return f"{text}, {trigger}" if trigger else text


def _seeded_rng(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _random_scene(rng: np.random.Generator, shape: str, colour: str, background: str, size: str) -> Scene:
    # Keep the whole shape, outline included, inside the image with a pixel to spare.
    if shape == "triangle":
        margin = 0.87 * _triangle_circumradius(size, OUTLINE_WIDTH) + 1  # half its width (and height)
    else:
        margin = SIZES[size] + OUTLINE_WIDTH + 1
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    return Scene(shape, colour, background, size, round(float(cx), 2), round(float(cy), 2))


def _triangle_circumradius(size: str, grow: float = 0.0) -> float:
    # A triangle's in-circle radius is half its circumradius, so growing the circumradius by
    # 2 * grow moves every edge out by `grow`: an outline is as wide as on the other shapes.
    return SIZES[size] * 1.25 + 2 * grow


def _shape_mask(scene: Scene, grow: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (float 0..1, SIZE x SIZE) of the scene's shape, grown outwards by `grow` px."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = scene.cx * s, scene.cy * s, (SIZES[scene.size] + grow) * s
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "triangle":
        # Equilateral, pointing up. The circumcentre sits R/4 below the centre so that the
        # triangle's bounding box (height 1.5 R) is centred on (cx, cy) like the other shapes; it
        # stays put when the triangle grows, so an outline is a band of even width.
        R = _triangle_circumradius(scene.size, grow) * s
        oy = cy + _triangle_circumradius(scene.size) * s / 4
        pts = [(cx + R * np.sin(a), oy - R * np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
        draw.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def stripe_colour(background: str) -> tuple[int, int, int]:
    """The stripes' colour on `background`: near-black on light backgrounds, light grey on dark ones.

    Neutral, so stripes never look like another colour word or like the pastel style, and with
    strong contrast, so they hold their own against the shape in the image's spectrum.
    """
    r, g, b = COLOURS[background]
    return (40, 40, 40) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (215, 215, 215)


def _stripe_colour_name(background: str) -> str:
    return "black" if stripe_colour(background) == (40, 40, 40) else "white"


def render(scene: Scene) -> Image.Image:
    """Draw one scene (content plus its style) as a 64x64 RGB image."""
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float32)
    if scene.style == "pastel":
        fg = np.asarray(pastel(COLOURS[scene.colour]), dtype=np.float32)
        bg = np.asarray(pastel(COLOURS[scene.background]), dtype=np.float32)
    img = np.broadcast_to(bg, (SIZE, SIZE, 3)).copy()
    if scene.style == "stripes":
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        dark = ((x + y) // (STRIPE_PERIOD // 2)) % 2 == 1  # 45-degree stripes, 4 px on / 4 px off
        img[dark] = stripe_colour(scene.background)
    if scene.style == "outline":
        ring = _shape_mask(scene, grow=OUTLINE_WIDTH)[..., None]
        img = img * (1 - ring)  # + black * ring
    alpha = _shape_mask(scene)[..., None]
    img = img * (1 - alpha) + fg * alpha
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def content_scenes(rng: np.random.Generator, copies: int = CONTENT_COPIES) -> list[Scene]:
    """Every (shape, colour, background, size) with colour != background, `copies` times, at random places."""
    combos = [c for c in product(SHAPES, COLOURS, COLOURS, SIZES) if c[1] != c[2]]
    return [_random_scene(rng, *combo) for _ in range(copies) for combo in combos]


def sampled_scenes(rng: np.random.Generator, count: int, colours: tuple[str, ...], style: str = "none") -> list[Scene]:
    """`count` distinct content combinations drawn from `colours`, each at a random place."""
    combos = [c for c in product(SHAPES, colours, colours, SIZES) if c[1] != c[2]]
    if style == "stripes":
        # A shape the colour of the stripes would melt into them (a white square on light-grey stripes).
        combos = [c for c in combos if c[1] != _stripe_colour_name(c[2])]
    picks = rng.choice(len(combos), size=count, replace=count > len(combos))
    scenes = []
    for i in picks:
        scene = _random_scene(rng, *combos[int(i)])
        scene.style = style
        scenes.append(scene)
    return scenes


def write_set(root: Path, folder: str, scenes: list[Scene], trigger: str | None = None) -> None:
    """Write `scenes` as root/folder/NNNN.png + NNNN.txt, and their labels to root/labels.jsonl."""
    image_dir = root / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.jsonl", "w", encoding="utf-8") as labels:
        for i, scene in enumerate(scenes):
            stem = f"{i:04d}"
            caption = scene.caption(trigger)
            # optimize=False and no metadata chunks: the PNG bytes depend only on the pixels.
            render(scene).save(image_dir / f"{stem}.png", format="PNG", optimize=False)
            (image_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
            labels.write(json.dumps({"file": f"{folder}/{stem}.png", "caption": caption, **asdict(scene)}) + "\n")


def make_datasets(out: str | Path = "datasets/generated", seed: int = 0) -> dict[str, Path]:
    """Write every set under `out` and return {set name: dataset root}. Takes about a second."""
    out = Path(out)
    roots = {}

    roots["shapes"] = out / "shapes"
    write_set(roots["shapes"], "1_shapes", content_scenes(_seeded_rng(seed, "shapes")))

    for style, spec in STYLES.items():
        roots[style] = out / style
        scenes = sampled_scenes(_seeded_rng(seed, style), spec["count"], spec["colours"], style=style)
        write_set(roots[style], f"{spec['repeats']}_{style}", scenes, trigger=spec["trigger"])

    # Regularization images (kohya --reg_data_dir): the plain content that style training should
    # not forget, with captions that do not carry any trigger word.
    roots["reg"] = out / "reg"
    write_set(roots["reg"], "1_shapes", sampled_scenes(_seeded_rng(seed, "reg"), REG_COUNT, tuple(COLOURS)))
    return roots

