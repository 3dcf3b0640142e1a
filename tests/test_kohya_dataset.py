"""kohya dataset configs, [[data.subsets]], multi-resolution buckets and the kohya_ss GUI import.

The dataset configs are written the way kohya-ss/sd-scripts' docs/config_README-en.md shows them
(commit 48d368fa): [general], [[datasets]] with resolution / batch_size / bucket options, and
[[datasets.subsets]] with image_dir or metadata_file. Expected images, repeats, captions, buckets and
step counts are worked out by hand in the comments. The GUI example is bmaltais/kohya_ss
test/config/locon-AdamW.json (commit 45088f04), the settings it saves, trimmed of empty ones.
"""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from sd_lora.config import ConfigError, DataConfig, TrainConfig, load_config
from sd_lora.data.buckets import make_buckets
from sd_lora.data.captions import step_caption
from sd_lora.data.dataset import scan_dataset
from sd_lora.training.loop import make_plan


def _png(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (len(path.name) * 20 % 255, 90, 30)).save(path)
    return path


DOCS_STYLE = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
color_aug = false

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 2
keep_tokens = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10
  keep_tokens_separator = "|||"
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3
  num_repeats = 3
  flip_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1
  shuffle_caption = false
  caption_dropout_rate = 0.5

# This is a fine-tuning dataset
[[datasets]]
resolution = [128, 128]
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = '{root}/piyo'
  metadata_file = '{root}/piyo/piyo_md.json'
  shuffle_caption = false
  caption_prefix = "masterpiece,"
  caption_dropout_every_n_epochs = 2
"""


@pytest.fixture
def kohya_dataset(tmp_path):
    for i in range(3):
        _png(tmp_path / "hoge" / f"h{i}.png")
    (tmp_path / "hoge" / "h0.txt").write_text("aaa, bbb ||| ccc, ddd, eee ||| ggg, hhh")
    for i in range(2):
        _png(tmp_path / "fuga" / f"f{i}.png", (128, 64))
        (tmp_path / "fuga" / f"f{i}.txt").write_text("fuga, boy, smiling, outdoors, sunny, tree")
    for i in range(4):
        _png(tmp_path / "reg" / f"r{i}.png")
    _png(tmp_path / "reg" / "deeper" / "not-read.png")  # kohya reads image_dir itself, not its sub-folders
    _png(tmp_path / "piyo" / "p0.png", (256, 128))
    _png(tmp_path / "piyo" / "p1.png", (128, 128))
    (tmp_path / "piyo" / "piyo_md.json").write_text(json.dumps({
        "p0.png": {"caption": "a frog", "tags": "open mouth, green"},
        "p1": {"caption": "a toad\nsecond line"},  # no extension (finetune/merge_captions_to_metadata.py); first line
        "gone.png": {"caption": "no such image"},
    }))
    path = tmp_path / "dataset.toml"
    path.write_text(DOCS_STYLE.format(root=tmp_path.as_posix()))
    return path


def test_kohya_docs_style_config_images_repeats_buckets_and_steps(kohya_dataset, tmp_path):
    cfg = TrainConfig(model="m", output="o.safetensors", epochs=2, batch_size=2, data=DataConfig(dataset_config_path=str(kohya_dataset)))
    assert cfg.validate(check_paths=False) == []
    ds = scan_dataset(cfg.data)
    by_name = {i.path.name: i for i in ds.items}
    assert sorted(by_name) == ["f0.png", "f1.png", "h0.png", "h1.png", "h2.png", "p0.png", "p1.png", "r0.png", "r1.png", "r2.png",
                               "r3.png"]
    # repeats, prompts, the values each subset inherits ([general] < [[datasets]] < subset)
    h, f, r, p = by_name["h1.png"].subset, by_name["f0.png"].subset, by_name["r0.png"].subset, by_name["p0.png"].subset
    assert (h.repeats, h.keep_tokens, h.shuffle_captions, h.flip, h.resolution) == (10, 2, True, False, 64)
    assert (f.repeats, f.keep_tokens, f.shuffle_captions, f.flip) == (3, 3, True, True)
    assert (r.repeats, r.keep_tokens, r.shuffle_captions, r.is_reg, r.caption_dropout) == (1, 1, False, True, 0.5)
    assert (p.resolution, p.min_bucket_side, p.max_bucket_side, p.caption_prefix, p.caption_dropout_every_n_epochs) == (
        128, 64, 256, "masterpiece,", 2)
    assert by_name["h1.png"].caption == "hoge girl" and by_name["r2.png"].caption == "human"
    assert by_name["p0.png"].caption == "a frog, open mouth, green" and by_name["p1.png"].caption == "a toad"
    assert ds.report.skipped == [("gone.png", f"listed in {tmp_path.as_posix()}/piyo/piyo_md.json but no such image")]

    # buckets. 64 px (no min/max: ours): only 64x64 fits, the 128x64 images are cropped to it (left 32).
    # 128 px with min 64 / max 256 / step 64 (kohya's rule, area 128*128 = 16384): (128,128) and for each width
    # w = 64..256 the tallest h <= 256 with w*h <= 16384: 64 -> 256, 128 -> 128, 192 -> 64, 256 -> 64, turned too.
    assert make_buckets(128, 64, min_side=64, max_side=256) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
    assert by_name["f0.png"].placement.bucket == (64, 64) and by_name["f0.png"].placement.crop == (0, 32)
    # p0 is 256x128 (aspect 2): the nearest aspect (log scale) is 192x64 (3); scaled by 0.75 to 192x96, 16 cut top
    assert by_name["p0.png"].placement.bucket == (192, 64) and by_name["p0.png"].placement.resized == (192, 96)
    assert by_name["p0.png"].placement.crop == (16, 0) and by_name["p1.png"].bucket == (128, 128)
    rep = ds.report
    assert {res: dict(c) for res, c in rep.buckets_by_resolution.items()} == {64: {(64, 64): 9}, 128: {(192, 64): 1, (128, 128): 1}}

    # step arithmetic: 3x10 + 2x3 + 4x1 (reg) + 2x1 = 42 samples; at batch 2 the 64x64 bucket holds 40 -> 20
    # batches, 192x64 and 128x128 one each -> 22 batches = 22 steps per epoch, x 2 epochs = 44 steps
    assert [(s["name"], s["samples"]) for s in rep.subsets] == [("hoge", 30), ("fuga", 6), ("reg:reg", 4), ("piyo", 2)]
    plan = make_plan(cfg, ds, 1)
    assert (plan.samples_per_epoch, plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (42, 22, 22, 44)
    text = "\n".join(rep.lines())
    assert "hoge: 3 image(s) x 10 repeats = 30 samples per epoch (71%), 64 px, shuffled captions" in text
    assert "reg:reg: 4 image(s) x 1 repeats = 4 samples per epoch (10%), 64 px, regularization" in text
    assert "buckets at 128 px: 128x128: 1, 192x64: 1" in text


def test_kohya_captions_after_keep_tokens_shuffle_and_dropout(kohya_dataset):
    ds = scan_dataset(DataConfig(dataset_config_path=str(kohya_dataset)))
    by_name = {i.path.name: i for i in ds.items}
    rng = random.Random(0)
    h0, f0, r0, p0 = (by_name[n] for n in ("h0.png", "f0.png", "r0.png", "p0.png"))
    seen = set()
    for _ in range(30):
        # keep_tokens_separator: "aaa, bbb" stays first and "ggg, hhh" last; only the middle is shuffled
        c = step_caption(h0.caption, h0.subset, rng, epoch=0)
        tags = c.split(", ")
        assert tags[:2] == ["aaa", "bbb"] and tags[-2:] == ["ggg", "hhh"] and sorted(tags[2:5]) == ["ccc", "ddd", "eee"]
        seen.add(c)
        # keep_tokens = 3: the first three tags stay
        tags = step_caption(f0.caption, f0.subset, rng, epoch=0).split(", ")
        assert tags[:3] == ["fuga", "boy", "smiling"] and sorted(tags[3:]) == ["outdoors", "sunny", "tree"]
    assert len(seen) > 1 and "|||" not in "".join(seen)
    # the reg subset drops half its captions (caption_dropout_rate = 0.5) and never shuffles
    drawn = [step_caption(r0.caption, r0.subset, random.Random(k), epoch=0) for k in range(200)]
    assert set(drawn) == {"", "human"} and 70 < drawn.count("") < 130
    # caption_prefix, and every 2nd epoch (kohya counts epochs from 1) on empty captions
    assert step_caption(p0.caption, p0.subset, rng, epoch=0) == "masterpiece, a frog, open mouth, green"
    assert step_caption(p0.caption, p0.subset, rng, epoch=1) == ""
    assert step_caption(p0.caption, p0.subset, rng, epoch=2) == "masterpiece, a frog, open mouth, green"
    assert ds.cacheable_captions() is None  # hoge and fuga shuffle: the text encoder cannot be cached


def test_kohya_unknown_and_unsupported_keys_are_refused_with_their_line(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "bad.toml"
    path.write_text(
        "[general]\n"                      # 1
        "flipaug = true\n"                 # 2
        "[[datasets]]\n"                   # 3
        "resolution = 64\n"                # 4
        "batch_size = 4\n"                 # 5
        "  [[datasets.subsets]]\n"         # 6
        f"  image_dir = '{tmp_path.as_posix()}/img'\n"  # 7
        "  token_warmup_step = 10\n"       # 8
        "  resolution = 512\n"             # 9
        "  color_aug = false\n"            # 10: kohya's off value: fine
        "  num_repeats = 'ten'\n")         # 11
    cfg = TrainConfig(model="m", output="o.safetensors", steps=1, data=DataConfig(dataset_config_path=str(path)))
    errors = cfg.validate(check_paths=False)
    assert f"{path} line 2: [general] flipaug: unknown key (did you mean 'flip_aug'?)" in errors
    assert (f"{path} line 8: datasets[1].subsets[1].token_warmup_step = 10: sd-lora has no such option yet; remove it or set "
            "it to 0") in errors
    assert f"{path} line 9: datasets[1].subsets[1].resolution: kohya sets it per dataset, not per subset; move it to its " \
           "[[datasets]] table" in errors
    assert f"{path} line 11: datasets[1].subsets[1].num_repeats: must be a whole number (got 'ten')" in errors
    assert not any("color_aug" in e for e in errors)
    # a good file with another batch size than the run's is named too (kohya: per dataset; here one for all)
    path.write_text(f"[[datasets]]\nbatch_size = 4\n[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/img'\n")
    assert cfg.validate(check_paths=False) == [
        "batch_size: the kohya dataset config says batch_size = 4; set batch_size = 4 (--train_batch_size 4) or remove it "
        "from the file"]
    # and what the file decides may not be set beside it
    cfg.data.path = str(tmp_path)
    assert any(e.startswith("data.path: not used with data.dataset_config_path") for e in cfg.validate(check_paths=False))


def test_our_toml_subsets_inherit_data_and_name_bad_keys(tmp_path):
    for i in range(2):
        _png(tmp_path / "style" / f"s{i}.png", (128, 128))
        _png(tmp_path / "faces" / "deeper" / f"f{i}.png")  # our subsets read sub-folders too
    _png(tmp_path / "classes" / "c.png")
    (tmp_path / "run.toml").write_text(
        'model = "m"\noutput = "o.safetensors"\nsteps = 10\n'
        '[data]\nresolution = 64\nflip = true\ninstance_prompt = "sks"\n'
        '[[data.subsets]]\npath = "style"\nrepeats = 5\nresolution = 128\nflip = false\n'
        '[[data.subsets]]\npath = "faces"\nprompt = "ohwx face"\nshuffle_captions = true\n'
        '[[data.subsets]]\npath = "classes"\nis_reg = true\nprompt = "person"\n')
    cfg = load_config(tmp_path / "run.toml")
    assert [s.path for s in cfg.data.subsets] == [str(tmp_path / n) for n in ("style", "faces", "classes")]
    ds = scan_dataset(cfg.data)
    rows = {s["name"]: (s["images"], s["repeats"], s["resolution"], s["flip"], s["is_reg"]) for s in ds.report.subsets}
    assert rows == {"style": (2, 5, 128, False, False), "faces": (2, 1, 64, True, False), "reg:classes": (1, 1, 64, True, True)}
    assert {i.caption for i in ds.items} == {"sks", "ohwx face", "person"}
    assert {i.bucket for i in ds.items} == {(128, 128), (64, 64)}
    assert "buckets at 128 px: 128x128: 2" in "\n".join(ds.report.lines())
    from sd_lora.config import dump_config

    assert "[[data.subsets]]" in dump_config(cfg)  # a checkpoint's config keeps the tables
    (tmp_path / "run.toml").write_text(
        'model = "m"\noutput = "o.safetensors"\nsteps = 10\n[[data.subsets]]\npath = "style"\nflip_aug = true\n'
        '[[data.subsets]]\nrepeats = 0\npath = "nowhere"\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.toml")
    errors = e.value.errors
    assert "data.subsets[1].flip_aug: unknown key (did you mean 'flip'?)" in errors
    assert "data.subsets[2].repeats: must be a whole number >= 1 (got 0)" in errors
    assert f"data.subsets[2].path: folder {tmp_path / 'nowhere'} does not exist" in errors


def test_cli_dry_run_reads_a_kohya_dataset_config(kohya_dataset, capsys):
    from sd_lora.cli import main

    out = kohya_dataset.parent / "out" / "x.safetensors"
    model = kohya_dataset.parent / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")  # a dry run loads no model
    assert main(["train", "--model", str(model), "--output", str(out), "--max_train_epochs", "2",
                 "--dataset_config", str(kohya_dataset), "--dry-run"]) == 0  # batch_size 2: the file's
    text = capsys.readouterr().out
    assert "fuga: 2 image(s) x 3 repeats = 6 samples per epoch" in text
    assert "/ batch 2 = 22 batches (bucketed); / accumulation 1 / 1 process(es) = 22 steps per epoch; x 2 epoch(s) = 44 steps" in text
    # a flag that disagrees with the file is named, not silently preferred
    assert main(["train", "--model", str(model), "--output", str(out), "--max_train_epochs", "2", "--train_batch_size", "3",
                 "--dataset-config", str(kohya_dataset), "--dry-run"]) == 1
    assert "batch_size (--batch-size): the kohya dataset config says batch_size = 2" in capsys.readouterr().err


def test_subsets_at_two_resolutions_train(tiny_models, tmp_path, one_torch_thread):
    from sd_lora.training import train

    for i in range(2):
        _png(tmp_path / "a" / f"{i}.png")
        _png(tmp_path / "b" / f"{i}.png", (128, 128))
    (tmp_path / "ds.toml").write_text(  # no shuffling: the text-encoder outputs are cached, here on disk too
        "[general]\nshuffle_caption = false\nflip_aug = true\n"
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/a'\nclass_tokens = 'x, y'\n"
        f"[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/b'\nclass_tokens = 'z'\n")
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(tmp_path / "out" / "l.safetensors"), steps=2,
                      cpu_threads=1, data=DataConfig(dataset_config_path=str(tmp_path / "ds.toml"), cache_text_to_disk=True),
                      network={"rank": 2, "train_text_encoder": False})
    events = []
    train(cfg, on_event=events.append)
    assert (tmp_path / "out" / "l.safetensors").is_file()
    dataset = next(e for e in events if e["event"] == "dataset")
    assert dataset["buckets"] == {"64x64": 2, "128x128": 2}
    assert len([e for e in events if e["event"] == "step"]) == 2
    assert len(list((tmp_path / ".sd-lora-cache").glob("text-*.safetensors"))) == 2  # "x, y" and "z"


GUI_LOCON = {  # bmaltais/kohya_ss test/config/locon-AdamW.json (45088f04), without its empty/off settings but three
    "LoRA_type": "Kohya LoCon", "LyCORIS_preset": "full", "bucket_no_upscale": True, "bucket_reso_steps": 64,
    "cache_latents": True, "cache_latents_to_disk": False, "caption_dropout_rate": 0.05, "clip_skip": 2, "conv_alpha": 8,
    "conv_dim": 16, "enable_bucket": True, "epoch": 1, "factor": -1, "gradient_accumulation_steps": 4, "keep_tokens": "0",
    "learning_rate": 0.0005, "lr_scheduler": "constant", "max_bucket_reso": 2048, "max_grad_norm": 1,
    "max_resolution": "512,512", "max_token_length": "75", "max_train_steps": "", "min_bucket_reso": 256,
    "mixed_precision": "bf16", "model_list": "runwayml/stable-diffusion-v1-5", "module_dropout": 0.1, "network_alpha": 8,
    "network_dim": 16, "network_dropout": 0.1, "noise_offset": 0.05, "noise_offset_type": "Original",
    "optimizer": "AdamW", "output_dir": "./test/output", "output_name": "locon-AdamW",
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "prior_loss_weight": 1, "rank_dropout": 0.1,
    "sample_every_n_steps": 25, "sample_prompts": "a painting of a gas mask , by darius kawasaki",
    "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_model_as": "safetensors", "save_precision": "fp16",
    "seed": "1234", "shuffle_caption": False, "text_encoder_lr": 0.0001, "train_batch_size": 1,
    "train_data_dir": "./test/img", "unet_lr": 0.0001, "xformers": "xformers", "reg_data_dir": "", "v2": False,
}


def test_import_kohya_gui_config_round_trips(tmp_path, capsys):
    from sd_lora.cli import main

    (tmp_path / "locon.json").write_text(json.dumps(GUI_LOCON))
    assert main(["import-kohya", str(tmp_path / "locon.json")]) == 0
    err = capsys.readouterr().err
    cfg = load_config(tmp_path / "locon.toml")
    n = cfg.network
    assert (n.method, n.preset, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.dropout, n.rank_dropout, n.module_dropout) == (
        "lora", "full", 16, 8.0, 16, 8.0, 0.1, 0.1, 0.1)
    d = cfg.data
    assert (d.resolution, d.buckets, d.upscale, d.bucket_step, d.min_bucket_side, d.max_bucket_side) == (512, True, False, 64, 256, 2048)
    assert (d.caption_dropout, d.shuffle_captions, d.cache_latents, d.path) == (0.05, False, "ram", str(tmp_path / "test" / "img"))
    # unet_lr wins over learning_rate for the UNet (sd-scripts); "epoch" with no max_train_steps is the epochs
    assert (cfg.lr, cfg.text_encoder_lr, cfg.epochs, cfg.steps, cfg.gradient_accumulation, cfg.batch_size, cfg.seed) == (
        1e-4, 1e-4, 1, None, 4, 1, 1234)
    assert (cfg.optimizer, cfg.mixed_precision, cfg.noise_offset, cfg.save_every_epochs, cfg.sample_every) == (
        "adamw", "bf16", 0.05, 1, 25)
    assert cfg.output == str(tmp_path / "test" / "output" / "locon-AdamW.safetensors")
    text = (tmp_path / "locon.toml").read_text()
    # clip_skip and max_token_length are settings of ours now (issue #19 item 4): they map
    assert (cfg.clip_skip, cfg.max_token_length) == (2, 75)
    for unmapped in ("LyCORIS_preset", "save_precision",
                     "xformers = \"xformers\": attention uses PyTorch"):
        assert unmapped in text and unmapped in err
    assert "model_list" not in text  # the GUI's copy of the model name
    # a second import does not overwrite the first
    assert main(["import-kohya", str(tmp_path / "locon.json")]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


def test_web_ui_confines_subset_paths_and_kohya_configs(tmp_path):
    from sd_lora.config import SubsetConfig
    from webui.security import PathError, Workspace, confine_config

    ws = Workspace(tmp_path / "ws")
    cfg = TrainConfig(data=DataConfig(subsets=[SubsetConfig(path="datasets/a"), SubsetConfig(path="/etc")]))
    with pytest.raises(PathError, match=r"^data.subsets\[2\].path: .*outside the workspace"):
        confine_config(ws, cfg)
    cfg.data.subsets.pop()
    assert confine_config(ws, cfg).data.subsets[0].path == str(ws.root / "datasets" / "a")
    # a kohya dataset config is read now, once it and every folder it names are checked (tests/test_webui_kohya_config.py)
    with pytest.raises(PathError, match="^data.dataset_config_path: 'configs/ds.toml' does not exist in the workspace"):
        confine_config(ws, TrainConfig(data=DataConfig(dataset_config_path="configs/ds.toml")))


def test_subsets_are_recorded_in_the_metadata_without_their_folders():
    from sd_lora.config import SubsetConfig, config_metadata
    from sd_lora.fields import recorded_settings

    cfg = TrainConfig(data=DataConfig(subsets=[SubsetConfig(path="/home/someone/private/faces", repeats=3, flip=True)]))
    md = config_metadata(cfg)
    assert recorded_settings(md)["data.subsets"] == [{"path": "faces", "repeats": 3, "flip": True, "is_reg": False}]
    assert "/home/someone" not in str(md) and "ss_flip_aug" in md and md["ss_flip_aug"] == "False"  # [data] flip: off
