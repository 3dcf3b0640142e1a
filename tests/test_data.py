"""Dataset scanning, captions, buckets, odd images and the latent cache (no training here)."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from sd_lora.config import DataConfig
from sd_lora.data.buckets import make_buckets, place
from sd_lora.data.captions import shuffle_caption
from sd_lora.data.dataset import scan_dataset
from sd_lora.data.images import open_image


def _png(path, size=(64, 64), colour=(200, 40, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_kohya_folders_repeats_captions_and_report(tmp_path):
    root = tmp_path / "data"
    _png(root / "10_sks dog" / "a.png")
    (root / "10_sks dog" / "a.txt").write_text("sks dog, sitting\n")
    _png(root / "10_sks dog" / "b.png")
    (root / "10_sks dog" / "b.caption").write_text("sks dog, running")
    _png(root / "10_sks dog" / "c.png")  # no caption: folder name is the prompt
    _png(root / "3_style" / "d.png")
    (root / "3_style" / "d.tags").write_text("painting")
    (root / "3_style" / "d.txt").write_text("ignored: .tags comes first")
    _png(root / "notes" / "x.png")  # not an N_name folder: ignored, as kohya does

    ds = scan_dataset(DataConfig(path=str(root), resolution=64, caption_extension=".tags"))
    by_name = {i.path.name: i for i in ds.items}
    assert set(by_name) == {"a.png", "b.png", "c.png", "d.png"}
    assert by_name["a.png"].caption == "sks dog, sitting" and by_name["a.png"].repeats == 10
    assert by_name["b.png"].caption == "sks dog, running"
    assert by_name["c.png"].caption == "sks dog"
    assert by_name["d.png"].caption == "painting" and by_name["d.png"].repeats == 3
    rep = ds.report
    assert rep.images == 4 and rep.fallback_captions == 1
    assert dict(rep.captions_by_extension) == {".txt": 1, ".caption": 1, ".tags": 1}
    assert ds.num_repeated == 3 * 10 + 3
    assert any("from .txt" in line for line in rep.lines())


def test_plain_folder_instance_prompt_and_reg_images(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "reg" / "1_dog" / "r.png")
    ds = scan_dataset(DataConfig(path=str(tmp_path / "imgs"), reg_path=str(tmp_path / "reg"), repeats=4,
                                 instance_prompt="ohwx dog", resolution=64))
    train = [i for i in ds.items if not i.is_reg]
    reg = [i for i in ds.items if i.is_reg]
    assert [(i.caption, i.repeats) for i in train] == [("ohwx dog", 4)]
    assert [(i.caption, i.repeats) for i in reg] == [("dog", 1)]
    assert ds.report.reg_images == 1


def test_bad_images_are_skipped_and_listed_odd_modes_fixed(tmp_path):
    d = tmp_path / "data" / "1_x"
    good = _png(d / "good.png")
    # truncated PNG
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (d / "empty.png").write_bytes(b"")
    # "huge": a tiny file that claims 20000 x 20000 pixels (a decompression bomb); never decoded
    _png(d / "bomb.png", size=(20000, 20000), colour=0, mode="1")
    # odd modes that are fixed
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(d / "gray16.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    Image.new("RGB", (96, 64), (0, 0, 255)).save(d / "rotated.jpg", exif=exif)

    ds = scan_dataset(DataConfig(path=str(tmp_path / "data"), resolution=64, max_image_pixels=10_000_000))
    skipped = {p.split("/")[-1]: why for p, why in ds.report.skipped}
    assert set(skipped) == {"truncated.png", "garbage.jpg", "empty.png", "bomb.png"}
    assert "too large" in skipped["bomb.png"]
    assert {i.path.name for i in ds.items} == {"good.png", "cmyk.jpg", "gray16.png", "alpha.png", "rotated.jpg"}
    assert good.exists()
    assert open_image(d / "cmyk.jpg").getpixel((5, 5))[0] > 200  # CMYK (0,255,255,0) is red
    assert open_image(d / "gray16.png").getpixel((5, 5)) == (255, 255, 255)  # 16-bit white, not clipped junk
    assert open_image(d / "alpha.png").getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert open_image(d / "rotated.jpg").size == (64, 96)  # EXIF rotation applied
    assert "skipped 4 image(s):" in "\n".join(ds.report.lines())


def test_buckets_area_multiple_of_64_and_no_upscale():
    for res in (256, 512, 1024):
        for w, h in make_buckets(res):
            assert w % 64 == 0 and h % 64 == 0 and w * h <= res * res
            assert max(w / h, h / w) <= 2.0
            assert (h, w) in make_buckets(res)
    p = place((1200, 800), 512)
    assert p.bucket[0] > p.bucket[1]  # landscape stays landscape
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
    small = place((300, 200), 512)
    assert small.bucket[0] <= 300 and small.bucket[1] <= 200  # not blown up
    assert place((300, 200), 512, upscale=True).bucket[0] * place((300, 200), 512, upscale=True).bucket[1] > 300 * 200


def test_caption_shuffle_keeps_leading_tokens():
    rng = random.Random(0)
    caption = "sks, dog, grass, sunny, park, ball"
    outs = {shuffle_caption(caption, 1, rng) for _ in range(20)}
    assert len(outs) > 1
    for o in outs:
        tags = o.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(caption.split(", "))


def test_epoch_batches_deterministic_and_never_mix_buckets(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "2_a" / f"sq{i}.png", (128, 128))
        _png(root / "2_a" / f"wide{i}.png", (128, 64))
    ds = scan_dataset(DataConfig(path=str(root), resolution=128))
    a = ds.epoch_batches(0, 2, seed=1)
    assert a == ds.epoch_batches(0, 2, seed=1)
    assert a != ds.epoch_batches(1, 2, seed=1)
    assert sorted(i for b in a for i in b) == sorted(list(range(6)) * 2)
    for b in a:
        assert len({ds.items[i].bucket for i in b}) == 1


def test_disk_latent_cache_reused_and_invalidated(tmp_path):
    from sd_lora.testing import tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny VAE: extra threads only wait on each other on a busy machine
    try:
        _disk_cache_checks(tmp_path, tiny_pipeline)
    finally:
        torch.set_num_threads(threads)


def _disk_cache_checks(tmp_path, tiny_pipeline):
    from sd_lora.data.cache import LatentCache

    vae = tiny_pipeline("sd1").vae
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "1_a" / f"{i}.png", colour=(i * 80, 0, 0))
    cfg = DataConfig(path=str(root), resolution=64)
    cache_dir = tmp_path / "cache"

    ds = scan_dataset(cfg)
    # An interrupted first pass: only the first image got cached ...
    assert LatentCache(ds.items[:1], vae, "disk", cache_dir, False, cfg.max_image_pixels).build(show_progress=False) == {"encoded": 1, "reused": 0}
    # ... the next pass continues from there.
    cache = LatentCache(ds.items, vae, "disk", cache_dir, False, cfg.max_image_pixels)
    assert cache.build(show_progress=False) == {"encoded": 2, "reused": 1}
    lat = cache.get(1, False)
    assert lat.shape == (4, 32, 32)  # the tiny VAE downsamples by 2
    ram = LatentCache(ds.items, vae, "ram", None, False, cfg.max_image_pixels)
    ram.build(show_progress=False)
    assert torch.equal(ram.get(1, False), lat)

    _png(root / "1_a" / "1.png", colour=(0, 200, 0))  # the image changed: its entry must be redone
    ds2 = scan_dataset(cfg)
    assert LatentCache(ds2.items, vae, "disk", cache_dir, False, cfg.max_image_pixels).build(show_progress=False) == {"encoded": 1, "reused": 2}
    # flip on: mirrored latents are extra entries
    flip = LatentCache(ds2.items, vae, "disk", cache_dir, True, cfg.max_image_pixels)
    assert flip.build(show_progress=False) == {"encoded": 3, "reused": 3}


# ---- honest reports: every layout mistake is named, with the folder and the fix -----------------------


def _caption(path, text):
    path.with_suffix(".txt").write_text(text)


def test_images_beside_n_name_folders_are_named_not_silently_dropped(tmp_path):
    root = tmp_path / "mixed"
    for i in range(2):
        _caption(_png(root / "10_dotted" / f"{i}.png"), "dotted")
    for i in range(5):
        _png(root / "cats" / f"{i}.png")
    _png(root / "loose.png")
    ds = scan_dataset(DataConfig(path=str(root), resolution=64))
    assert {i.path.parent.name for i in ds.items} == {"10_dotted"}  # kohya's rule: only N_name folders
    text = "\n".join(ds.report.lines())
    assert f"5 image(s) in {root / 'cats'} are NOT trained" in text and "rename it to e.g. 1_cats" in text
    assert f"1 image(s) directly in {root} are NOT trained (loose.png)" in text
    ds.check()  # a warning, not a refusal: the N_name folders train


def test_run_outputs_in_the_data_folder_are_left_out_and_named(tmp_path):
    from sd_lora import artifacts

    root = tmp_path / "data"
    _caption(_png(root / "a.png"), "a red square")
    out = root / "style.safetensors"
    _png(artifacts.sample_image(out, 100, 0))
    _png(artifacts.sample_grid(out))
    _png(artifacts.loss_curve(out))
    out.write_bytes(b"not really a LoRA")
    ds = scan_dataset(DataConfig(path=str(root), resolution=64))
    assert [i.path.name for i in ds.items] == ["a.png"]
    text = "\n".join(ds.report.lines())
    assert f"{root} holds 3 image(s) that a training run wrote" in text and "style-loss.png" in text
    assert "NOT trained" in text and "output = somewhere else" in text
    assert "holds .safetensors files (style.safetensors)" in text


def test_data_one_level_too_high_is_refused_with_the_folder_to_use(tmp_path):
    import pytest

    project = tmp_path / "project"
    _png(project / "data" / "10_dotted" / "a.png")
    _png(project / "out" / "style-samples" / "step-000100-0.png")
    ds = scan_dataset(DataConfig(path=str(project), resolution=64))
    with pytest.raises(ValueError) as e:
        ds.check()
    msg = str(e.value)
    assert f"{project} has no `N_name` folders, but {project / 'data'} has (10_dotted)" in msg
    assert f'set data.path = "{project / "data"}"' in msg


def test_empty_captions_are_called_empty_not_the_folder_prompt(tmp_path):
    root = tmp_path / "plain"
    for i in range(3):
        _png(root / f"{i}.png")
    (root / "0.txt").write_text("   \n")  # an empty caption file is no caption
    ds = scan_dataset(DataConfig(path=str(root), resolution=64))
    rep = ds.report
    assert (rep.empty_captions, rep.fallback_captions) == (3, 0)
    text = "\n".join(rep.lines())
    assert "0 image(s) use the folder/instance prompt, 3 image(s) have an EMPTY caption" in text
    assert "set data.instance_prompt" in text
    named = scan_dataset(DataConfig(path=str(root), resolution=64, instance_prompt="ohwx"))
    assert (named.report.empty_captions, named.report.fallback_captions) == (0, 3) and not named.report.warnings


def test_a_folder_with_no_usable_image_is_refused(tmp_path):
    import pytest

    root = tmp_path / "data"
    _png(root / "10_good" / "a.png")
    (root / "5_broken").mkdir(parents=True)
    (root / "5_broken" / "x.png").write_bytes(b"not a png")
    (root / "3_empty").mkdir()
    ds = scan_dataset(DataConfig(path=str(root), resolution=64))
    with pytest.raises(ValueError) as e:
        ds.check()
    msg = str(e.value)
    assert f"{root / '5_broken'} has no usable image (all 1 skipped" in msg
    assert f"{root / '3_empty'} has no usable image (it holds no images); add images to it or remove the folder" in msg


def test_a_reg_folder_inside_the_data_folder_is_not_a_stray_folder(tmp_path):
    root = tmp_path / "data"
    _png(root / "10_sks" / "a.png")
    _png(root / "reg" / "1_dog" / "r.png")
    _png(root / "reg" / "stray.png")
    ds = scan_dataset(DataConfig(path=str(root), reg_path=str(root / "reg"), resolution=64))
    assert sorted(i.folder for i in ds.items) == ["10_sks", "reg:1_dog"]
    warnings = ds.report.warnings
    assert len(warnings) == 1 and f"data.reg_path: 1 image(s) directly in {root / 'reg'} are NOT trained" in warnings[0]


def test_text_cache_on_disk_is_reused_and_keyed_by_the_encoder(tmp_path, one_torch_thread):
    from sd_lora.data.cache import TextCache
    from sd_lora.testing import tiny_pipeline
    from sd_lora.training.conditioning import TextConditioner

    pipe = tiny_pipeline("sd1")
    cond = TextConditioner(pipe, is_sdxl=False)
    captions = ["a red square", "a blue circle", "a red square", ""]
    first = TextCache(tmp_path / "cache")
    assert first.build(captions, cond, "cpu", show_progress=False) == {"encoded": 3, "reused": 0}
    again = TextCache(tmp_path / "cache")
    assert again.build(captions, cond, "cpu", show_progress=False) == {"encoded": 0, "reused": 3}
    assert torch.equal(again.get(captions)[0], first.get(captions)[0])
    assert torch.equal(again.get(["a blue circle"])[0], cond.encode(["a blue circle"], "cpu")[0].float())
    with torch.no_grad():  # another text encoder (a fine-tune): the entries are not reused
        next(pipe.text_encoder.parameters()).add_(0.5)
    other = TextCache(tmp_path / "cache")
    assert other.build(captions, TextConditioner(pipe, is_sdxl=False), "cpu", show_progress=False) == {"encoded": 3, "reused": 0}
    assert not torch.equal(other.get(["a red square"])[0], first.get(["a red square"])[0])
