"""The example datasets: generator format and determinism, style measures, the shipped tiny base."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
TINY_BASE = DATASETS / "tiny-base"

from sd_lora.examples import measures as sm
from sd_lora.examples import shapes as make_datasets
from sd_lora.testing import TINY_VOCAB_WORDS

SETS = ("shapes", "stripes", "outline", "pastel", "reg")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    make_datasets.make_datasets(out)
    return out


def _images(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.png"))


def _labels(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines()]


def test_generator_writes_kohya_folders(generated):
    expected = {"shapes": ("1_shapes", 360), "stripes": ("10_stripes", 30), "outline": ("10_outline", 30),
                "pastel": ("10_pastel", 30), "reg": ("1_shapes", 40)}
    assert sorted(p.name for p in generated.iterdir()) == sorted(expected)
    vocab = set(TINY_VOCAB_WORDS)
    for name, (folder, count) in expected.items():
        root = generated / name
        assert [p.name for p in root.iterdir() if p.is_dir()] == [folder]
        assert re.fullmatch(r"\d+_\w+", folder)
        images = _images(root)
        assert len(images) == count
        for png in images:
            caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
            assert set(caption.replace(",", " ").split()) <= vocab, caption
            with Image.open(png) as im:
                assert (im.size, im.mode) == ((64, 64), "RGB")
        # Every style caption ends with the trigger word (see make_datasets.Scene.caption); content
        # captions carry none.
        trigger = make_datasets.STYLES.get(name, {}).get("trigger")
        captions = [lab["caption"] for lab in _labels(root)]
        assert all(c.startswith("a ") for c in captions)
        assert all(c.endswith(f" background, {trigger}") for c in captions) if trigger else all(c.endswith(" background") for c in captions)


def test_the_example_sets_scan_without_a_warning(generated):
    """Our own examples pass our own dataset report: every image trained, every caption read, nothing to warn about."""
    from sd_lora.config import DataConfig
    from sd_lora.data.dataset import scan_dataset

    for name in SETS:
        ds = scan_dataset(DataConfig(path=str(generated / name), resolution=64))
        rep = ds.report
        assert (rep.warnings, rep.problems, rep.skipped, rep.empty_captions, rep.fallback_captions) == ([], [], [], 0, 0), name
        assert rep.images == len(_images(generated / name)) and dict(rep.captions_by_extension) == {".txt": rep.images}


def test_generator_is_deterministic(generated, tmp_path):
    make_datasets.make_datasets(tmp_path)
    first = {p.relative_to(generated): p.read_bytes() for p in generated.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    # A different seed gives different images.
    make_datasets.make_datasets(tmp_path / "other", seed=1)
    assert (tmp_path / "other/shapes/1_shapes/0000.png").read_bytes() != first[Path("shapes/1_shapes/0000.png")]


@pytest.fixture(scope="module")
def measured(generated) -> dict[str, list[dict]]:
    """Every measure on every image of every set (every 4th image of the big content set), once."""
    table = {}
    for name in SETS:
        root = generated / name
        labels = _labels(root)[:: 4 if name == "shapes" else 1]
        rows = []
        for lab in labels:
            im = Image.open(root / lab["file"])
            rows.append(dict(
                lab,
                stripes=sm.stripe_energy(im),
                outline=sm.outline_score(im),
                pastel=sm.pastel_score(im),
                # The outline is black by design; the shape's own colour is what content means.
                dominant=sm.dominant_colour(im, ignore=("black",) if name == "outline" else ()),
                read_background=sm.background_colour(im),
                read_shape=sm.shape_of(im),
            ))
        table[name] = rows
    return table


@pytest.mark.parametrize("style, measure, threshold", [("stripes", "stripes", 0.3), ("outline", "outline", 0.03), ("pastel", "pastel", 0.5)])
def test_style_measure_separates_its_set(measured, style, measure, threshold):
    # Every image of the style's own set is above the threshold; every image of every other set below.
    for name, rows in measured.items():
        values = np.array([row[measure] for row in rows])
        if name == style:
            assert values.min() > threshold, (name, values.min())
        else:
            assert values.max() < threshold, (name, values.max())


def test_content_measures_read_the_labels(measured):
    for rows in measured.values():
        for row in rows:
            assert (row["dominant"], row["read_background"], row["read_shape"]) == (row["colour"], row["background"], row["shape"]), row


def test_measures_take_arrays_and_pil_images():
    scene = make_datasets.Scene("circle", "red", "blue", "large", 32.0, 32.0, style="stripes")
    im = make_datasets.render(scene)
    arr = np.asarray(im)
    assert sm.stripe_energy(im) == sm.stripe_energy(arr) > 0.3
    assert sm.content_scores(im) == sm.content_scores(arr)
    assert sm.dominant_colour(arr) == "red"
    with pytest.raises(ValueError, match="RGB"):
        sm.stripe_energy(arr[..., 0])


def test_tiny_base_is_small_safetensors():
    files = [p for p in TINY_BASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15e6
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


@pytest.fixture(scope="module")
def tiny_base():
    from sd_lora.models import load_base

    pipe = load_base(TINY_BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _red_circles(pipe):
    import torch

    return pipe(
        ["a red circle on a blue background"] * 4, num_inference_steps=20, height=64, width=64,
        generator=torch.Generator().manual_seed(0),
    ).images


def test_tiny_base_loads_as_sd1_and_draws_64px(tiny_base):
    from sd_lora.models import architecture_of

    assert architecture_of(tiny_base).arch == "sd1"
    images = _red_circles(tiny_base)
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    # Not noise: a flat background with something standing out of it, in most samples.
    assert sum(0.02 < sm.shape_mask(im).mean() < 0.6 for im in images) >= 2


def test_tiny_base_draws_the_prompted_colour(tiny_base):
    images = _red_circles(tiny_base)
    # Share of the shape region that is red, against the best of the other shape colours, averaged
    # over four seeds (one sample of a tiny model can miss).
    red = np.mean([sm.content_scores(im).get("red", 0.0) for im in images])
    others = max(np.mean([sm.content_scores(im).get(c, 0.0) for im in images]) for c in ("green", "yellow", "white", "black"))
    assert red > 0.5 and red > 2 * others, (red, others)
    assert [sm.background_colour(im) for im in images].count("blue") >= 3
