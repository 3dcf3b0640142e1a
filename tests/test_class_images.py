"""Class images for prior preservation (issue #19 item 6): sd_lora/data/class_images.py."""

import shutil

import pytest

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.data.class_images import ensure_class_images, plan
from sd_lora.testing import write_noise_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["sd1"]


@pytest.fixture
def loaded(model, monkeypatch):
    """The model loaded once for a test's several runs (loading it is most of a tiny run's time)."""
    import sd_lora.generation

    pipe = sd_lora.generation.load_pipeline(model)
    monkeypatch.setattr(sd_lora.generation, "load_pipeline", lambda *a, **k: pipe)


def _cfg(model, tmp_path, reg, n, **data) -> TrainConfig:
    if not (tmp_path / "data").exists():
        write_noise_images(tmp_path / "data" / "1_thing", 1)
    data = {"path": str(tmp_path / "data"), "reg_path": str(reg) if reg else None, "num_class_images": n, "resolution": 64,
            "class_prompt": "a photo of a dog", "class_image_steps": 1, "class_image_guidance": 1.0,
            "class_image_batch_size": 2, **data}
    return TrainConfig(model=model, output=str(tmp_path / "out.safetensors"), data=DataConfig(**data), steps=1)


def _class_files(folder):
    return sorted(p.name for p in folder.glob("class-*"))


def test_the_missing_count_is_rendered_with_captions_and_a_second_run_renders_nothing(model, tmp_path, monkeypatch):
    reg = write_noise_images(tmp_path / "reg", 2)  # the user's own class images count
    cfg = _cfg(model, tmp_path, reg, 5)
    assert cfg.validate() == []
    progress = []
    p = ensure_class_images(cfg, on_progress=lambda done, total: progress.append((done, total)))
    names = _class_files(reg)
    assert [n for n in names if n.endswith(".png")] == [f"class-{p.key}-{i:05d}.png" for i in range(3)]
    assert [n for n in names if n.endswith(".txt")] == [f"class-{p.key}-{i:05d}.txt" for i in range(3)]
    assert {(reg / n).read_text() for n in names if n.endswith(".txt")} == {"a photo of a dog\n"}
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert len(list(reg.glob("*.png"))) == 5
    # seeded per index, as the PNG says (A1111 infotext)
    from PIL import Image

    assert "Seed: 43" in Image.open(reg / f"class-{p.key}-00001.png").text["parameters"]

    # a second run: the folder is full, no model is loaded
    import sd_lora.generation

    monkeypatch.setattr(sd_lora.generation, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    again = ensure_class_images(cfg)
    assert again.missing == 0 and _class_files(reg) == names


def test_a_stopped_generation_is_completed_with_the_images_an_uninterrupted_one_gives(model, tmp_path, loaded):
    whole = tmp_path / "whole"
    ensure_class_images(_cfg(model, tmp_path, whole, 3))

    stopped = tmp_path / "stopped"

    def stop(done, total):
        if done == 1:
            raise KeyboardInterrupt  # killed after the first image (mid-group: batch size 2)

    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(_cfg(model, tmp_path, stopped, 3), on_progress=stop)
    assert len(list(stopped.glob("*.png"))) == 1 and not list(stopped.glob(".*.tmp"))
    resumed = ensure_class_images(_cfg(model, tmp_path, stopped, 3))
    assert resumed.indices == [1, 2]
    assert _class_files(stopped) == _class_files(whole)
    for name in _class_files(whole):
        assert (stopped / name).read_bytes() == (whole / name).read_bytes(), name

    # an image deleted by the user is rendered again, the same
    name = next(n for n in _class_files(whole) if n.endswith("00002.png"))
    (stopped / name).unlink()
    ensure_class_images(_cfg(model, tmp_path, stopped, 3))
    assert (stopped / name).read_bytes() == (whole / name).read_bytes()


def test_images_of_other_settings_count_and_are_reported(model, tmp_path, loaded):
    reg = tmp_path / "reg"
    ensure_class_images(_cfg(model, tmp_path, reg, 2))
    p = ensure_class_images(_cfg(model, tmp_path, reg, 3, class_prompt="a photo of a cat"))
    assert p.indices == [0] and len(list(reg.glob("*.png"))) == 3  # one more, under the cat prompt's key
    assert "2 class image(s) there were rendered with other settings" in p.warnings[0]


def test_an_n_name_folder_gets_the_images_and_its_name_is_the_prompt(model, tmp_path):
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    p = plan(_cfg(model, tmp_path, tmp_path / "reg", 4, class_prompt=None))
    assert (p.folder.name, p.prompt, p.missing) == ("1_dog", "dog", 4)


def test_errors_name_the_setting_and_the_fix(model, tmp_path):
    no_prompt = _cfg(model, tmp_path, tmp_path / "reg", 2, class_prompt=None).validate()
    assert any(m.startswith("data.class_prompt: missing") and "set data.class_prompt" in m for m in no_prompt), no_prompt

    (tmp_path / "a_file").write_text("x")
    unwritable = _cfg(model, tmp_path, tmp_path / "a_file" / "reg", 2).validate()
    assert any(m.startswith("data.reg_path: cannot write the class images") and "is a file" in m for m in unwritable), unwritable

    no_reg = _cfg(model, tmp_path, None, 2).validate()
    assert any(m.startswith("data.num_class_images:") and "set data.reg_path" in m for m in no_reg), no_reg

    two = tmp_path / "two"
    (two / "1_dog").mkdir(parents=True)
    (two / "1_cat").mkdir()
    several = _cfg(model, tmp_path, two, 2).validate()
    assert any("2 regularization folders" in m for m in several), several
    with pytest.raises(ValueError, match="class images cannot be rendered"):
        plan(_cfg(model, tmp_path, two, 2))


def test_dry_run_says_how_many_without_rendering(model, tmp_path, capsys):
    from sd_lora.cli import main

    _cfg(model, tmp_path, tmp_path / "reg", 3)  # writes the data folder
    assert main(["train", "--model", model, "--data", str(tmp_path / "data"), "--reg-data", str(tmp_path / "reg"),
                 "--class-prompt", "a dog", "--num-class-images", "3", "--resolution", "64", "--steps", "1",
                 "--output", str(tmp_path / "o.safetensors"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 in " in out and "3 to render with \"a dog\" at 64x64" in out
    assert not (tmp_path / "reg").exists()


def test_training_renders_them_first_with_cache_events(model, tmp_path):
    from sd_lora.training import train

    reg = tmp_path / "reg"
    events = []
    cfg = _cfg(model, tmp_path, reg, 2)
    cfg.network.rank = 2
    train(cfg, on_event=events.append)
    stages = [(e["stage"], e["done"], e["total"]) for e in events if e["event"] == "cache" and e["stage"] == "class_images"]
    assert stages == [("class_images", 1, 2), ("class_images", 2, 2)]
    dataset = next(e for e in events if e["event"] == "dataset")
    assert dataset["reg_images"] == 2 and dataset["empty_captions"] == 0
    shutil.rmtree(reg)


def test_a_kohya_reg_subset_is_the_folder_and_a_broken_kohya_file_is_a_problem_not_a_crash(model, tmp_path):
    write_noise_images(tmp_path / "dog", 1)
    (tmp_path / "ds.toml").write_text(f"""[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'dog'}"
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'reg'}"
  class_tokens = "dog"
  is_reg = true
""")
    (tmp_path / "reg").mkdir()
    cfg = TrainConfig(model=model, output=str(tmp_path / "o.safetensors"), steps=1,
                      data=DataConfig(dataset_config_path=str(tmp_path / "ds.toml"), num_class_images=2))
    p = plan(cfg)
    assert (p.folder, p.prompt, p.missing) == (tmp_path / "reg", "dog", 2)
    (tmp_path / "ds.toml").write_text("[[datasets]\n")
    problems = cfg.validate()
    assert any("not a valid TOML" in m for m in problems) and any(m.startswith("data.num_class_images:") for m in problems)
