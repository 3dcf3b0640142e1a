"""kohya dataset configs in the web UI: every folder a config names must be an absolute path inside the
workspace (webui/security.py confine_dataset_config, asking sd_lora.data.kohya_config.dataset_config_paths)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.data.kohya_config import dataset_config_paths
from webui.security import SNAPSHOTS, PathError, Workspace, confine_config, confine_dataset_config


def test_every_path_a_config_names_is_listed_from_every_table(tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text("""\
[general]
image_dir = "/misplaced"          # kohya refuses it here; a checker must still see it

[[datasets]]
resolution = 64
metadata_file = "/also/misplaced.json"

  [[datasets.subsets]]
  image_dir = "/data/dog"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "rel/cat"
  conditioning_data_dir = "/data/masks"
  is_reg = true

[[datasets]]
  [[datasets.subsets]]
  metadata_file = "/data/meta.json"
  image_dir = 3
""")
    assert dataset_config_paths(toml) == [
        ("general.image_dir", "/misplaced"), ("datasets[1].metadata_file", "/also/misplaced.json"),
        ("datasets[1].subsets[1].image_dir", "/data/dog"), ("datasets[1].subsets[2].image_dir", "rel/cat"),
        ("datasets[1].subsets[2].conditioning_data_dir", "/data/masks"),
        ("datasets[2].subsets[1].metadata_file", "/data/meta.json"), ("datasets[2].subsets[1].image_dir", 3)]
    js = tmp_path / "ds.json"
    js.write_text('{"datasets": [{"subsets": [{"image_dir": "/x"}]}]}')
    assert dataset_config_paths(js) == [("datasets[1].subsets[1].image_dir", "/x")]


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path / "ws")
    for name in ("dog", "reg"):
        (w.root / "datasets" / name).mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(w.root / "datasets" / name / "a.png")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", w.root / "datasets" / "escape")
    return w


def _write(ws, text: str, name: str = "ds.toml"):
    path = ws.root / "configs" / "kohya" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.format(ws=ws.root, out=ws.root.parent / "outside"))
    return f"configs/kohya/{name}"


GOOD = """\
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{ws}/datasets/dog"
  [[datasets.subsets]]
  image_dir = "{ws}/datasets/reg"
  is_reg = true
"""


def test_a_config_inside_the_workspace_is_checked_and_its_checked_copy_is_trained(ws):
    rel = _write(ws, GOOD)
    cfg = confine_config(ws, TrainConfig(model="m", output="loras/x.safetensors", steps=1,
                                         data=DataConfig(dataset_config_path=rel)))
    snap = cfg.data.dataset_config_path
    assert snap.startswith(str(ws.root / SNAPSHOTS)) and open(snap).read() == (ws.root / rel).read_text()
    # the file edited after the check (a queued job starts later): the job reads the checked copy
    (ws.root / rel).write_text(GOOD.format(ws=ws.root).replace(f"{ws.root}/datasets/dog", "/etc"))
    assert open(snap).read() != (ws.root / rel).read_text()
    from sd_lora.data.subsets import dataset_subsets

    assert [s.path for s in dataset_subsets(cfg.data)] == [str(ws.root / "datasets" / "dog"), str(ws.root / "datasets" / "reg")]
    # ... and the edited file is refused when it is checked again
    with pytest.raises(PathError, match=r"ds.toml: datasets\[1\].subsets\[1\].image_dir: '/etc' is outside the workspace") as err:
        confine_dataset_config(ws, rel)
    assert "relative paths are taken" not in str(err.value)  # they are refused in a kohya config, not taken from it
    # saving or loading a config checks without a copy (the saved file keeps the user's path)
    (ws.root / rel).write_text(GOOD.format(ws=ws.root))
    assert confine_dataset_config(ws, rel, snapshot=False) == ws.root / rel


@pytest.mark.parametrize("image_dir, why", [
    ("{out}", "outside the workspace"), ("{ws}/datasets/escape", "symbolic link"),
    ("{ws}/../outside", "outside the workspace"), ("datasets/dog", "is a relative path"),
])
def test_every_folder_outside_the_workspace_is_refused_by_name(ws, image_dir, why):
    rel = _write(ws, GOOD.replace("{ws}/datasets/reg", image_dir))
    with pytest.raises(PathError) as e:
        confine_config(ws, TrainConfig(data=DataConfig(dataset_config_path=rel)))
    assert "datasets[1].subsets[2].image_dir" in str(e.value) and why in str(e.value), str(e.value)
    assert "subsets[1]" not in str(e.value)  # the good folder is not named


def test_the_config_file_itself_must_be_a_toml_or_json_file_in_the_workspace(ws):
    (ws.root.parent / "outside" / "ds.toml").write_text(GOOD)
    for path, why in ((str(ws.root.parent / "outside" / "ds.toml"), "outside the workspace"),
                      ("configs/none.toml", "does not exist"), ("datasets/dog/a.png", "not a kohya dataset config")):
        with pytest.raises(PathError, match=why):
            confine_dataset_config(ws, path)
    (ws.root / "configs" / "bad.toml").write_text("[[datasets]\n")
    with pytest.raises(PathError, match="not a valid TOML"):
        confine_dataset_config(ws, "configs/bad.toml")


def test_the_train_tab_lists_and_saves_uploaded_configs(ws, tmp_path):
    from webui.tabs.train import list_dataset_configs, save_dataset_config

    upload = tmp_path / "my kohya.toml"
    upload.write_text(GOOD.format(ws=ws.root))
    assert save_dataset_config(ws, str(upload)) == "configs/kohya/my kohya.toml"
    (ws.root / "datasets" / "dog" / "dataset.toml").write_text(GOOD.format(ws=ws.root))
    assert list_dataset_configs(ws) == ["configs/kohya/my kohya.toml", "datasets/dog/dataset.toml"]
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(PathError, match="not a .toml or .json"):
        save_dataset_config(ws, str(tmp_path / "x.txt"))



def test_images_named_by_a_metadata_file_must_be_inside_too(ws):
    import json

    meta = ws.root / "datasets" / "dog" / "meta.json"
    outside = ws.root.parent / "outside" / "b.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(outside)
    meta.write_text(json.dumps({"a.png": {"caption": "a dog"}}))
    rel = _write(ws, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{ws}/datasets/dog"\n'
                     'metadata_file = "{ws}/datasets/dog/meta.json"\n')
    assert confine_dataset_config(ws, rel, snapshot=False)
    for key in (str(outside), "../../../outside/b.png"):
        meta.write_text(json.dumps({"a.png": {"caption": "a dog"}, key: {"caption": "secret"}}))
        with pytest.raises(PathError, match=r"datasets\[1\].subsets\[1\].metadata_file: meta.json names an image: .* is outside"):
            confine_dataset_config(ws, rel, snapshot=False)
        # the same file named by a [[data.subsets]] table
        from sd_lora.config import SubsetConfig

        cfg = TrainConfig(data=DataConfig(subsets=[SubsetConfig(path="datasets/dog", metadata_path="datasets/dog/meta.json")]))
        with pytest.raises(PathError, match=r"^data.subsets\[1\].metadata_path: meta.json names an image"):
            confine_config(ws, cfg)
