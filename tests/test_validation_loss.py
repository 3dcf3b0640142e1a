"""Validation loss (#18 item 4): held-out images, val events at the set interval, exact on resume, and the
training run unchanged by it."""

from __future__ import annotations

import re

import pytest

from sd_lora.config import ConfigError, DataConfig, TrainConfig
from sd_lora.data.dataset import held_out_count, scan_dataset
from sd_lora.training import train
from sd_lora.training.events import read_events
from sd_lora.training.validation import validation_due, validation_timesteps
from test_resume import stop_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from sd_lora.testing import tiny_pipeline, write_noise_images

    root = tmp_path_factory.mktemp("valloss")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "2_thing", 4, [f"red, circle, {p}" for p in ("left", "right", "top", "bottom")])
    write_noise_images(root / "reg" / "1_dog", 2, "dog")
    write_noise_images(root / "val", 2, ["red, circle", "blue, square"], seed=5)
    return root


# ---- which images are held out ------------------------------------------------------------------


def test_held_out_count_is_kohyas_split():
    # kohya trains ceil(n x (1 - split)) images (library/train_util.py split_train_val): the rest are held out
    assert [held_out_count(n, 0.25) for n in (1, 3, 4, 10)] == [0, 0, 1, 2]
    assert held_out_count(10, 0.3) == 3  # not 2: 10 x 0.7 is 7.000000000000001 in floating point
    assert held_out_count(3, 0.99) == 2  # one image is always left to train on below 1.0
    assert held_out_count(3, 1.0) == 3  # a subset held out whole (kohya's validation folder)


def test_the_same_images_are_held_out_every_time_and_never_trained(root):
    data = DataConfig(path=str(root / "data"), reg_path=str(root / "reg"), resolution=64, validation_split=0.5)
    a, b = scan_dataset(data, seed=1), scan_dataset(data, seed=1)
    held = [i.path for i in a.validation]
    assert held == [i.path for i in b.validation] and len(held) == 2
    trained = [i.path for i in a.items]
    assert not set(held) & set(trained) and len(trained) == 2 + 2  # two training images left + two reg images
    assert not any(i.is_reg for i in a.validation)  # regularization images are never held out
    # the step arithmetic counts only what is trained; the report says what is held out
    assert a.report.images == 2 and a.num_repeated == 2 * 2 + 2
    assert "2 more held out for the validation loss" in "\n".join(a.report.lines())
    assert [s["validation"] for s in a.report.to_dict()["subsets"]] == [2, 0]
    # validation_seed (else the training seed) chooses them: another seed, in general, other images
    chosen = {tuple(sorted(i.path.name for i in scan_dataset(data, seed=s).validation)) for s in range(8)}
    assert len(chosen) > 1
    pinned = DataConfig(**{**data.__dict__, "validation_seed": 3})
    assert [i.path for i in scan_dataset(pinned, seed=1).validation] == [i.path for i in scan_dataset(pinned, seed=2).validation]


def test_a_validation_folder_is_held_out_whole(root):
    ds = scan_dataset(DataConfig(path=str(root / "data"), resolution=64, validation_path=str(root / "val")))
    assert sorted(i.path.name for i in ds.validation) == ["0.png", "1.png"]
    assert all(i.path.parent == root / "val" for i in ds.validation) and ds.report.images == 4
    assert [i.caption for i in ds.validation] == ["red, circle", "blue, square"]
    assert "val:val" not in ds.report.folders  # not a dataset dir of the trained file (ss_dataset_dirs)
    assert "  val:val: 2 validation image(s), 64 px, never trained on" in ds.report.lines()


def test_a_kohya_dataset_config_holds_out_per_dataset(root, tmp_path):
    from sd_lora.data.kohya_config import read_dataset_config

    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nvalidation_split = 0.25\nvalidation_seed = 4\n[[datasets.subsets]]\n'
                    f'image_dir = "{root / "data" / "2_thing"}"\n')
    (_, table), = read_dataset_config(toml).subsets
    assert (table.validation_split, table.validation_seed) == (0.25, 4)
    ds = scan_dataset(DataConfig(dataset_config_path=str(toml), resolution=64))
    assert len(ds.validation) == 1 and len(ds.items) == 3


def test_config_errors():
    def errors(**kw):
        with pytest.raises(ConfigError) as e:
            TrainConfig(model="m", output="o.safetensors", steps=1, **kw).check()
        return "\n".join(e.value.errors)

    assert "data.validation_split: must be in [0, 1)" in errors(data={"path": ".", "validation_split": 1.0})
    text = errors(data={"path": "."}, validate_every_n_steps=10)
    assert re.search(r"validate_every_n_steps: has no validation images to score; set data.validation_split", text)


# ---- when and how ----------------------------------------------------------------------------------


def test_the_intervals():
    def due(**kw):
        return [s for s in range(1, 13) if validation_due(s, 12, 4, kw.get("steps"), kw.get("epochs"))]

    assert due(steps=5) == [5, 10, 12]  # a step interval alone, and the last step
    assert due() == [4, 8, 12]  # neither: every epoch (kohya's default)
    assert due(epochs=2) == [8, 12]
    assert due(steps=3, epochs=3) == [3, 6, 9, 12]


def test_kohyas_fixed_timesteps():
    # train_network.py: np.linspace(min_timestep, max_timestep, 4 + 2, dtype=int)[1:-1]
    assert validation_timesteps(1000, None, None) == [200, 400, 600, 800]
    assert validation_timesteps(1000, 100, 600) == [200, 300, 400, 500]
    assert validation_timesteps(1000, 0, 7) == [1, 2, 4, 5]


# ---- in a run ------------------------------------------------------------------------------------------


def _config(root, out, **kw):
    # adapter dropout and a trained text encoder: validation in training mode, or left in eval mode after, would show
    data = DataConfig(path=str(root / "data"), resolution=64, validation_path=str(root / "val"))
    return TrainConfig(model=str(root / "model"), output=str(out), data=data, steps=4, lr=1e-3, seed=3,
                       network={"rank": 4, "dropout": 0.2, "train_text_encoder": True}, **kw)


def _events(cfg, kind):
    return [e for e in read_events(cfg.events_path) if e["event"] == kind]


@pytest.fixture(scope="module")
def full_run(root, tmp_path_factory):
    cfg = _config(root, tmp_path_factory.mktemp("full") / "lora.safetensors", validate_every_n_steps=2)
    train(cfg)
    return cfg


def test_val_events_at_the_interval_and_on_the_loss_curve(full_run):
    from PIL import Image

    from sd_lora.training.report import VALIDATION_COLOUR

    val = _events(full_run, "val")
    assert [(e["step"], e["images"]) for e in val] == [(2, 2), (4, 2)]
    assert all(e["loss"] > 0 for e in val) and val[0]["loss"] != val[1]["loss"]  # the weights changed in between
    from sd_lora.io import load_safetensors

    _, metadata = load_safetensors(full_run.output)
    assert metadata["ss_validate_every_n_steps"] == "2"  # kohya's metadata key (train_network.py)
    assert metadata["ss_num_train_images"] == "4"  # the validation folder is not counted
    curve = _events(full_run, "done")[0]["loss_curve"]
    with Image.open(curve) as im:
        assert VALIDATION_COLOUR in {c for _, c in im.convert("RGB").getcolors(1 << 20)}


def test_resumed_run_has_the_same_val_events(full_run, root, tmp_path):
    out = tmp_path / "parts" / "lora.safetensors"
    first = _config(root, out, validate_every_n_steps=2)
    assert stop_at_step(first, 2).step == 2
    second = _config(root, out, validate_every_n_steps=2, resume="latest")
    train(second)
    events = read_events(second.events_path)  # both stretches append to one events file
    resumed = next(e for e in events if e["event"] == "resumed")
    full = [(e["step"], e["loss"]) for e in _events(full_run, "val")]
    assert [tuple(x) for x in resumed["val_losses"]] == full[:1]
    assert [(e["step"], e["loss"]) for e in events if e["event"] == "val"] == full  # bit for bit


def test_validation_leaves_the_training_losses_unchanged(full_run, root, tmp_path):
    plain = _config(root, tmp_path / "plain.safetensors")
    plain.data.validation_path = None
    train(plain)
    assert not _events(plain, "val")
    assert [e["loss"] for e in _events(plain, "step")] == [e["loss"] for e in _events(full_run, "step")]


def test_the_web_ui_plot_has_a_validation_line():
    from webui.jobs import Progress, fold_event
    from webui.tabs.train import loss_svg

    p = Progress()
    fold_event(p, {"event": "val", "step": 3, "loss": 0.5, "images": 2})
    fold_event(p, {"event": "resumed", "step": 4, "checkpoint": "c", "losses": [[4, 0.7]], "val_losses": [[2, 0.6]]})
    assert p.val_losses == [(2, 0.6)]  # the resumed run's history replaces what this reader saw
    svg = loss_svg([(1, 1.0), (2, 0.8), (4, 0.7)], 0.5, validation=[(2, 0.6), (4, 0.55)])
    assert len(re.findall(r'class="sd-val" points="([^"]+)"', svg)[0].split()) == 2
    assert "validation</span> 0.5500" in svg
    assert 'class="sd-val"' not in loss_svg([(1, 1.0)], 0.5)


def test_a_validation_folder_inside_the_data_folder_is_not_trained(tmp_path):
    from sd_lora.testing import write_noise_images

    write_noise_images(tmp_path / "data", 2, "thing")
    write_noise_images(tmp_path / "data" / "val", 1, "thing", seed=4)
    ds = scan_dataset(DataConfig(path=str(tmp_path / "data"), resolution=64, validation_path=str(tmp_path / "data" / "val")))
    assert [i.path.parent.name for i in ds.items] == ["data", "data"] and len(ds.validation) == 1


def test_validation_captions_are_the_same_every_time():
    from dataclasses import replace
    from types import SimpleNamespace

    from sd_lora.config import SubsetConfig
    from sd_lora.data.subsets import resolve
    from sd_lora.training.validation import validation_caption

    sub = resolve(SubsetConfig(path="x"), DataConfig(path="x", caption_prefix="style", shuffle_captions=True,
                                                   caption_dropout=0.5, caption_tag_dropout=0.5, wildcards=True), "x", "x", "x")
    item = SimpleNamespace(caption="a {red|blue} dog, b, c", subset=sub)
    captions = [validation_caption(item, i) for i in range(20)]
    assert captions == [validation_caption(item, i) for i in range(20)]  # one wildcard choice per image, kept
    assert {c.replace("blue", "red") for c in captions} == {"style a red dog, b, c"}  # unshuffled, nothing dropped
    assert validation_caption(SimpleNamespace(caption="x", subset=replace(sub, caption_prefix="")), 0) == "x"
