"""`sd-lora demo`: proof on a CPU, in a few minutes, that LoRAs learn a style and stack.

Trains two style LoRAs (stripes, outline) with the real trainer on the tiny pretrained base in
`datasets/tiny-base`, then renders a picture grid: for a few prompts, the base and each LoRA at
weights 0, 0.25, 0.5, 0.75, 1, and both LoRAs stacked; and measures each picture's style with
`sd_lora.examples.measures`, so the effect is a number as well as a picture.

The style sets are drawn by `sd_lora.examples.shapes`; the tiny base model is the repository's
`datasets/tiny-base` unless another is passed. It downloads nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "datasets" / "tiny-base"  # in the repository checkout

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PROMPTS = (
    "a large red circle on a blue background",
    "a large yellow square on a green background",
    "a large white triangle on a black background",
    "a large green triangle on a red background",
    "a large blue square on a white background",
    "a large yellow circle on a black background",
)
# The styles draw black, grey or white lines over the picture by design; the shape's colour, when
# it is none of these, is read from the other pixels.
ACHROMATIC = ("black", "gray", "white")
# style name -> (trigger word in the set's captions, measure function name in style_measures)
STYLES = {"stripes": ("striped", "stripe_energy"), "outline": ("outlined", "outline_score")}


@dataclass
class DemoResult:
    grid: Path
    loras: dict[str, Path]
    # measures[style][column label] = mean measure over the prompts
    measures: dict[str, dict[str, float]] = field(default_factory=dict)
    # content[column label] = share of prompts whose prompted shape colour is the dominant colour
    # (of a chromatic shape: among the pixels that are not black, grey or white)
    content: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train_style_loras(out_dir: Path, base: Path, steps: int, styles=tuple(STYLES), seed: int = 0, on_event=None) -> dict[str, Path]:
    """Make the example sets and train one LoRA per style with `sd_lora.train`."""
    from .config import DataConfig, TrainConfig
    from .examples.shapes import make_datasets
    from .training.loop import train

    roots = make_datasets(out_dir / "data", seed=seed)
    loras = {}
    for style in styles:
        config = TrainConfig(
            model=str(base),
            output=str(out_dir / "loras" / f"{style}.safetensors"),
            data=DataConfig(path=str(roots[style]), resolution=64, cache_latents="ram"),
            steps=steps,
            batch_size=4,
            lr=1e-3,  # tiny model, few steps: a high rate is what makes a style show in ~2 minutes
            optimizer="adamw",
            seed=seed,
            cpu_threads=1,  # far faster for a tiny model than torch's default thread count
            log_every=10,
            network={"preset": "kohya", "rank": 8, "alpha": 8, "train_text_encoder": False},
            comment=f"sd-lora demo: {style} style on the tiny base",
        )
        loras[style] = train(config, on_event=on_event)
    return loras


def render_grid(base: Path, loras: dict[str, Path], out: Path, steps: int = 12, seed: int = 0) -> DemoResult:
    """Rows = prompts x (each LoRA's weight sweep, then the stack); measure every picture."""
    from .tools.svd import single_thread

    # A 64 px model is many tiny ops: one thread is as fast on an idle machine and several times
    # faster on a busy one (as for training, see cpu_threads above).
    with single_thread():
        return _render_grid(base, loras, out, steps, seed)


def _render_grid(base: Path, loras: dict[str, Path], out: Path, steps: int, seed: int) -> DemoResult:
    from PIL import Image

    from .examples import measures as sm
    from .generation import generate
    from .models import load_base
    from .stack.grid import label_grid, save_png

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompt: str, stack=()) -> Image.Image:
        # guidance 7.5 (diffusers' default, which the measured figures were made with); the stack stays
        # fused between draws, so the next draw rewrites only what differs
        return generate(pipe, prompt, list(stack), steps=steps, width=64, height=64, seed=seed, guidance=7.5,
                        keep_loras=True).images[0].image

    result = DemoResult(grid=out, loras=dict(loras))
    scores: dict[str, dict[str, list[float]]] = {s: {} for s in loras}
    content: dict[str, list[float]] = {}
    rows = []

    def record(label: str, prompt: str, image: Image.Image) -> None:
        for s in loras:
            scores[s].setdefault(label, []).append(getattr(sm, STYLES[s][1])(image))
        colour = prompt.split()[2]
        ignore = () if colour in ACHROMATIC else ACHROMATIC
        content.setdefault(label, []).append(float(sm.dominant_colour(image, ignore=ignore) == colour))

    for prompt in PROMPTS:
        for style, path in loras.items():
            trigger = STYLES[style][0]
            styled_prompt = f"{prompt}, {trigger}"  # trigger last, as in the style sets' captions
            images, labels = [], []
            base_image = draw(styled_prompt)
            record(f"{style} base", prompt, base_image)  # the base on this row's own prompt
            images.append(base_image)
            labels.append("base")
            for w in WEIGHTS:
                image = draw(styled_prompt, [(path, w)])
                record(f"{style} {w:g}", prompt, image)
                images.append(image)
                labels.append(f"{style} {w:g}")
            rows.append(label_grid(images, labels, title=styled_prompt))
        # Both styles at once: the stack, prompted with both trigger words.
        stacked_prompt = prompt + ", " + ", ".join(STYLES[s][0] for s in loras)
        image = draw(stacked_prompt, [(p, 1.0) for p in loras.values()])
        record("stack", prompt, image)
        base_image = draw(stacked_prompt)
        rows.append(label_grid([base_image, image], ["base", " + ".join(loras)], title=stacked_prompt))

    result.measures = {s: {k: sum(v) / len(v) for k, v in d.items()} for s, d in scores.items()}
    result.content = {k: sum(v) / len(v) for k, v in content.items()}
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    save_png(sheet, out)
    return result


def run_demo(out_dir: str | Path = "out/demo", base: str | Path = DEFAULT_BASE, steps: int = 300, seed: int = 0, on_event=None) -> DemoResult:
    """Train the style LoRAs, render the grid and write `measures.json`; returns what was made."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    base = Path(base)
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"{base}: the tiny base model is missing (expected a diffusers folder with model_index.json). "
                                "It ships in datasets/tiny-base of the sd-lora repository: pass --base with its path.")
    loras = train_style_loras(out_dir, base, steps, seed=seed, on_event=on_event)
    result = render_grid(base, loras, out_dir / "grid.png", seed=seed)
    result.seconds = time.perf_counter() - start
    report = {"grid": str(result.grid), "loras": {k: str(v) for k, v in loras.items()},
              "measures": result.measures, "content": result.content, "seconds": round(result.seconds, 1)}
    (out_dir / "measures.json").write_text(json.dumps(report, indent=2))
    return result
