"""Augmentation (#19 item 5): random crop, colour augmentation, caption tag dropout, caption separators and
wildcard captions, each checked against kohya sd-scripts' rule (library/train_util.py at 48d368fa, see
sd_lora/data/augment.py) worked out by hand on tiny images and strings with fixed seeds."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sd_lora.config import DataConfig, SubsetConfig, TrainConfig, config_metadata
from sd_lora.data import augment
from sd_lora.data.buckets import place
from sd_lora.data.captions import fixed_caption, read_caption, step_caption
from sd_lora.data.dataset import scan_dataset
from sd_lora.data.kohya_config import read_dataset_config, read_metadata
from sd_lora.data.subsets import resolve


def _options(**kw):
    """A subset with every option decided: [data]'s defaults and `kw`."""
    return resolve(SubsetConfig(path="x", **kw), DataConfig(), "x", "test", "test")


# ---- random crop ------------------------------------------------------------------------------------------

def test_random_crop_draws_the_offset_over_the_whole_overhang():
    # 100x64 into a 64x64 bucket: resized to 100x64 (covers it), 36 px overhang; centre crop at 36 // 2 = 18
    p = place((100, 64), 64, 64, square=True)
    assert p.resized == (100, 64) and p.crop == (0, 18)
    for seed in range(50):  # kohya: randint(0, overhang) on the width, no draw for the height (no overhang)
        assert augment.random_crop(p, random.Random(seed)).crop == (0, random.Random(seed).randint(0, 36))
    lefts = {augment.random_crop(p, random.Random(s)).crop[1] for s in range(400)}
    assert min(lefts) == 0 and max(lefts) == 36  # both ends reachable
    # an image of its bucket's size has nothing to crop: no draw, no change
    same = place((64, 64), 64, 64, square=True)
    rng = random.Random(0)
    assert augment.random_crop(same, rng) == same and rng.random() == random.Random(0).random()


def test_sdxl_time_ids_get_the_random_offset_and_mirror_it_with_the_image():
    from sd_lora.training.conditioning import sdxl_time_ids

    p = place((160, 64), 64, 64, square=True)  # resized 160x64, bucket 64x64: left in 0..96
    view = augment.draw_view(p, _options(random_crop=True), False, random.Random(5))
    left = random.Random(5).randint(0, 96)
    assert view.placement.crop == (0, left)
    ids = sdxl_time_ids([view.conditioned], "cpu", torch_float())
    assert ids.tolist() == [[64, 160, 0, left, 64, 64]]  # original h, w, crop top, left, target h, w
    flipped = augment.View(view.placement, True)  # mirrored: the crop's left edge counted from the other side
    assert sdxl_time_ids([flipped.conditioned], "cpu", torch_float()).tolist() == [[64, 160, 0, 160 - left - 64, 64, 64]]


def torch_float():
    import torch

    return torch.float32


def test_the_image_and_its_mask_are_cropped_at_the_drawn_offset(tmp_path):
    from sd_lora.data.cache import item_mask, item_pixels

    a = np.zeros((64, 128, 4), np.uint8)
    a[..., 0] = np.arange(128, dtype=np.uint8)[None, :] * 2  # red: 2 x the column
    a[..., 3] = np.where(np.arange(128) < 40, 255, 0)[None, :].astype(np.uint8)  # opaque: columns 0-39
    Image.fromarray(a, "RGBA").save(tmp_path / "0.png")
    item = scan_dataset(DataConfig(path=str(tmp_path), resolution=64, buckets=False, random_crop=True, alpha_mask=True)).items[0]
    assert item.placement.resized == (128, 64) and item.placement.crop == (0, 32)
    view = augment.draw_view(item.placement, item.subset, False, random.Random(1))
    left = random.Random(1).randint(0, 64)
    pixels = item_pixels(item, False, 10**8, view)
    expected = np.arange(left, left + 64) * 2 / 127.5 - 1  # alpha composited on white: red is 255 where transparent
    expected = np.where(np.arange(left, left + 64) < 40, expected, 1.0)
    assert np.allclose(pixels[0, 0].numpy(), expected, atol=1e-6)
    mask = item_mask(item, False, (8, 8), view)[0]  # 8 px per latent column, area mean
    opaque = np.clip(40 - (left + 8 * np.arange(8)), 0, 8) / 8
    assert np.allclose(mask[0].numpy(), opaque)


# ---- colour ---------------------------------------------------------------------------------------------------

def _rgb(*pixels):
    return Image.fromarray(np.array([pixels], np.uint8), "RGB")


def test_color_aug_draws_as_kohya_does():
    draws = [augment.draw_color(random.Random(s)) for s in range(3000)]
    applied = [d for d in draws if d is not None]
    assert 0.30 < len(applied) / len(draws) < 0.36  # random() <= 0.33
    kinds = Counter(d.kind for d in applied)
    assert 0.45 < kinds["hue"] / len(applied) < 0.55  # then random() > 0.5: hue, else gamma
    assert all(-8 <= d.amount <= 8 for d in applied if d.kind == "hue")
    assert all(0.95 <= d.amount <= 1.05 for d in applied if d.kind == "gamma")
    # the same draws in kohya's order: random(), random(), uniform(...)
    for s in range(20):
        r = random.Random(s)
        first = r.random()
        if first > 0.33:
            assert draws[s] is None
        else:
            hue = r.random() > 0.5
            amount = r.uniform(-8, 8) if hue else r.uniform(0.95, 1.05)
            assert draws[s] == augment.ColorShift("hue" if hue else "gamma", amount)


def test_hue_shift_turns_hues_as_kohyas_bgr_opencv_call_does():
    # kohya: cv2 BGR2HSV on RGB pixels, hue + 8 (of 180), back. Pure red read as BGR is blue (hue 120 of 180) ->
    # 128 = 256 degrees -> BGR (255, 0, 68) -> the array [255, 0, 68]: red turned by -16 degrees. Green (60) -> 68 =
    # 136 degrees -> BGR (0, 255, 68)... read back as the array [68, 255, 0]. Greys have no hue.
    out = augment.apply_color(_rgb((255, 0, 0), (0, 255, 0), (128, 128, 128)), augment.ColorShift("hue", 8))
    assert np.asarray(out).tolist() == [[[255, 0, 68], [68, 255, 0], [128, 128, 128]]]
    back = augment.apply_color(out, augment.ColorShift("hue", -8))
    assert np.abs(np.asarray(back, int)[0, :2] - [[255, 0, 0], [0, 255, 0]]).max() <= 1


def test_gamma_is_applied_to_values_in_0_1():
    # (128 / 255) ** 1.05 * 255 = 123.66 -> 123; (128 / 255) ** 0.95 * 255 = 132.45 -> 132; 0 and 255 stay
    out = augment.apply_color(_rgb((128, 0, 255)), augment.ColorShift("gamma", 1.05))
    assert np.asarray(out).tolist() == [[[123, 0, 255]]]
    assert np.asarray(augment.apply_color(_rgb((128, 0, 255)), augment.ColorShift("gamma", 0.95))).tolist() == [[[132, 0, 255]]]


# ---- captions ---------------------------------------------------------------------------------------------------

def test_tag_dropout_drops_each_free_tag_with_its_rate():
    o = _options(caption_tag_dropout=0.5, keep_tokens=1)
    for seed in range(30):  # no shuffle: kohya splits, drops with random() >= rate kept, joins with ", "
        r = random.Random(seed)
        kept = [t for t in ("b", "c", "d", "e") if r.random() >= 0.5]
        assert step_caption("a, b, c, d, e", o, random.Random(seed), 0) == ", ".join(["a"] + kept)
    assert fixed_caption("a, b", o) is None  # differs from step to step: not text-cacheable
    # the parts outside keep_tokens_separator are never dropped; a secondary-separated tag drops as one
    o = _options(caption_tag_dropout=0.9, keep_tokens_separator="|||", secondary_separator=";;;")
    for seed in range(30):
        text = step_caption("x, y ||| sky;;;cloud, b, c ||| z", o, random.Random(seed), 0)
        assert text.startswith("x, y") and text.endswith("z")
        assert ("sky,cloud" in text) or ("sky" not in text and "cloud" not in text)
    # shuffled, then dropped (kohya's order): the draws after the shuffle's
    o = _options(caption_tag_dropout=0.3, shuffle_captions=True)
    r = random.Random(3)
    tags = ["a", "b", "c", "d"]
    r.shuffle(tags)
    assert step_caption("a, b, c, d", o, random.Random(3), 0) == ", ".join(t for t in tags if r.random() >= 0.3)


def test_caption_separator_splits_tags_and_the_shuffle_joins_them_with_a_comma():
    o = _options(caption_separator=";", shuffle_captions=True, keep_tokens=1)
    r = random.Random(2)
    rest = ["b", "c d", "e"]
    r.shuffle(rest)
    assert step_caption("a; b; c d; e", o, random.Random(2), 0) == ", ".join(["a"] + rest)
    # unshuffled: as written; the secondary separator becomes the caption separator (kohya's rule)
    o = _options(caption_separator=";", secondary_separator="::")
    assert step_caption("a; b::c", o, random.Random(0), 0) == "a; b;c"


def test_wildcards_pick_one_choice_per_use_and_keep_escaped_braces():
    o = _options(wildcards=True)
    drawn = Counter(step_caption("1girl, {simple|white} background", o, random.Random(s), 0) for s in range(100))
    assert set(drawn) == {"1girl, simple background", "1girl, white background"}
    assert step_caption("1girl, {{retro style}}", o, random.Random(0), 0) == "1girl, {retro style}"
    assert fixed_caption("1girl, {{retro style}}", o) == "1girl, {retro style}"  # nothing to choose: cacheable
    assert fixed_caption("1girl, {a|b}", o) is None
    # off: the braces are text
    assert step_caption("1girl, {a|b}", _options(), random.Random(0), 0) == "1girl, {a|b}"
    # several choices in one caption: each drawn in turn (re.sub left to right)
    r = random.Random(9)
    first, second = r.choice(["a", "b"]), r.choice(["c", "d", "e"])
    assert step_caption("{a|b} and {c|d|e}", o, random.Random(9), 0) == f"{first} and {second}"


def test_a_several_line_caption_trains_one_line_per_use(tmp_path):
    img = tmp_path / "0.png"
    Image.new("RGB", (64, 64)).save(img)
    (tmp_path / "0.txt").write_text("1girl, miku, stage\n\n  a girl   on a stage \ndigital art of a {girl|woman}\n")
    assert read_caption(img, (".txt",)) == ("1girl, miku, stage a girl on a stage digital art of a {girl|woman}", ".txt")
    text, _ = read_caption(img, (".txt",), lines=True)
    assert text == "1girl, miku, stage\na girl on a stage\ndigital art of a {girl|woman}"
    # one line per use, then its wildcard; the prefix (with its keep_tokens_separator) goes on every line
    o = _options(wildcards=True, caption_prefix="sks |||", keep_tokens_separator="|||", shuffle_captions=True)
    seen = set()
    for s in range(200):
        r = random.Random(s)
        line = r.choice(text.split("\n"))
        if "{" in line:
            line = line.replace("{girl|woman}", r.choice(["girl", "woman"]))
        tags = [t.strip() for t in line.split(",")]
        r.shuffle(tags)
        got = step_caption(text, o, random.Random(s), 0)
        assert got == ", ".join(["sks"] + tags)
        seen.add(got.split(", ", 1)[1] if "miku" not in got else "tags")
    assert {"a girl on a stage", "digital art of a girl", "digital art of a woman", "tags"} <= seen
    # the dataset keeps the lines only with wildcards on, and such a caption is not text-cacheable
    ds = scan_dataset(DataConfig(path=str(tmp_path), resolution=64, wildcards=True))
    assert ds.items[0].caption == text and ds.cacheable_captions() is None
    assert scan_dataset(DataConfig(path=str(tmp_path), resolution=64)).items[0].caption == text.replace("\n", " ")


def test_metadata_captions_with_wildcards_put_the_tags_on_every_line(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "frog.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"frog.png": {"caption": "a frog\ntest caption1", "tags": "open mouth, green"}}))
    assert read_metadata(meta, tmp_path)[0] == [(tmp_path / "frog.png", "a frog, open mouth, green")]  # the first line
    assert read_metadata(meta, tmp_path, lines=True)[0] == [
        (tmp_path / "frog.png", "a frog, open mouth, green\ntest caption1, open mouth, green")]


# ---- settings: kohya configs, the latent cache, the report, the metadata -----------------------------------------

def test_kohya_dataset_config_maps_the_augmentation_keys(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "d.toml"
    path.write_text("[general]\ncolor_aug = true\nenable_wildcard = true\ncaption_separator = ';'\n[[datasets]]\n"
                    "caption_tag_dropout_rate = 0.1\n[[datasets.subsets]]\n"
                    f"image_dir = '{tmp_path.as_posix()}/img'\nrandom_crop = true\n")
    (_, table), = read_dataset_config(path).subsets
    assert (table.color_aug, table.wildcards, table.caption_separator, table.caption_tag_dropout, table.random_crop) == \
        (True, True, ";", 0.1, True)


def test_random_crop_and_color_aug_refuse_the_latent_cache_with_the_fix(tmp_path):
    cfg = TrainConfig(model="m", output="o.safetensors", steps=1, data=DataConfig(path="d", random_crop=True))
    errors = cfg.validate(check_paths=False)
    assert ("data.cache_latents/random_crop/color_aug: the latent cache (data.cache_latents = \"ram\" (the default)) holds "
            "one crop of each image in its own colours, but data.random_crop changes them every step; set "
            "data.cache_latents = \"none\" (each step then encodes its images with the VAE: slower), or turn random_crop / "
            "color_aug off to keep the cache (kohya refuses the two together too)") in errors
    cfg.data.cache_latents = "none"
    assert cfg.validate(check_paths=False) == []
    # per subset: named by its table; a subset that turns it off keeps [data]'s value out of the message
    cfg = TrainConfig(model="m", output="o.safetensors", steps=1, data=DataConfig(
        color_aug=True, cache_latents="disk", subsets=[SubsetConfig(path="a", color_aug=False), SubsetConfig(path="b", random_crop=True, color_aug=False)]))
    (message,) = [m for m in cfg.validate(check_paths=False) if m.startswith("data.cache_latents")]
    assert "\"disk\")" in message and "but data.subsets[2].random_crop changes them" in message
    cfg.data.subsets[0].color_aug = None  # subset 1 takes [data]'s color_aug = true
    assert "but data.subsets[2].random_crop, data.color_aug change them" in cfg.validate(check_paths=False)[0]
    # and the rates and separators are checked
    cfg = TrainConfig(model="m", output="o.safetensors", steps=1, data=DataConfig(
        path="d", caption_tag_dropout=1.5, subsets=[], caption_separator=" "))
    assert set(cfg.validate(check_paths=False)) >= {
        "data.caption_tag_dropout: must be in [0, 1) (got 1.5); 0.1 drops one tag in ten",
        "data.caption_separator: must not be empty or blank (got ' '); \",\" is usual"}


def test_the_report_and_the_metadata_say_what_is_on(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    data = DataConfig(path=str(tmp_path), resolution=64, random_crop=True, color_aug=True, caption_tag_dropout=0.1,
                      wildcards=True, cache_latents="none")
    lines = scan_dataset(data).report.lines()
    assert any(line.endswith("random crop, colour aug, tag dropout 0.1, wildcards") for line in lines), lines
    meta = config_metadata(TrainConfig(model="m", output="o.safetensors", steps=1, data=data))
    assert (meta["ss_random_crop"], meta["ss_color_aug"], meta["ss_caption_tag_dropout_rate"]) == ("True", "True", "0.1")


@pytest.mark.parametrize("flag, value", [("--random_crop", True), ("--color_aug", True), ("--enable_wildcard", True)])
def test_kohya_flags_work_on_the_command_line(flag, value):
    from sd_lora.cli import build_parser
    from sd_lora.commands.train import config_from_args

    args = build_parser().parse_args(["train", "--data", "d", "--output", "o.safetensors", "--model", "m", "--steps", "1", flag])
    cfg = config_from_args(args)
    assert {"--random_crop": cfg.data.random_crop, "--color_aug": cfg.data.color_aug,
            "--enable_wildcard": cfg.data.wildcards}[flag] is value
