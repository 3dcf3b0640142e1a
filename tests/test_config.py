"""Training config: TOML and flags with the same keys, every error at once, before any model loads."""

from __future__ import annotations

import pytest
from PIL import Image

from sd_lora.commands.train import config_from_args
from sd_lora.config import ConfigError, DataConfig, TrainConfig, dump_config, load_config


def _dataset(root):
    (root / "5_sks").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "5_sks" / "a.png")
    return root


def _parse(argv):
    from sd_lora.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_bad_config_lists_every_error_before_loading_anything(tmp_path, monkeypatch):
    import sd_lora.models
    from sd_lora.training import loop

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(sd_lora.models, "load_base", no_loading)
    monkeypatch.setattr(loop, "scan_dataset", no_loading)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = TrainConfig(
        model=str(tmp_path / "missing-model"),
        output=str(tmp_path / "out.ckpt"),
        data=DataConfig(path=str(empty), resolution=500, caption_dropout=1.5),
        network={"rank": 0, "preset": "everything"},
        steps=100, epochs=3, lr=0, optimizer="adam8bit", mixed_precision="fp8",
        sample_every=10,
    )
    with pytest.raises(ConfigError) as err:
        loop.train(cfg)
    msg = str(err.value)
    keys = ["model:", "output:", "data.path:", "steps/epochs:", "lr:", "optimizer:", "mixed_precision:",
            "sample_prompts:", "data.resolution:", "data.caption_dropout:", "network.rank:", "network.preset:"]  # keys as a TOML file writes them
    for key in keys:
        assert key in msg, f"{key} missing from:\n{msg}"
    assert len(err.value.errors) == len(keys)
    assert "did you mean 'adamw8bit'" in msg  # each error says what to do
    assert "no images found" in msg and "10_sks_dog" in msg


def test_valid_config_has_no_errors(tmp_path):
    data = _dataset(tmp_path / "data")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    cfg = TrainConfig(model=str(tmp_path / "model"), output=str(tmp_path / "o.safetensors"), data=DataConfig(path=str(data)), steps=10)
    assert cfg.validate() == []
    assert cfg.checkpoint_root == tmp_path / "o-checkpoints"


def test_toml_sections_relative_paths_and_unknown_keys(tmp_path):
    _dataset(tmp_path / "data")
    (tmp_path / "run.toml").write_text(
        'model = "model"\noutput = "out/x.safetensors"\nsteps = 50\nlr = 2e-4\n'
        '[data]\npath = "data"\nresolution = 768\nflip = true\n'
        '[network]\nrank = 8\nalpha = 4\ntrain_text_encoder = false\n'
    )
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.model == str(tmp_path / "model") and cfg.data.path == str(tmp_path / "data")
    assert (cfg.steps, cfg.lr, cfg.data.resolution, cfg.data.flip) == (50, 2e-4, 768, True)
    assert (cfg.network.rank, cfg.network.alpha, cfg.network.train_text_encoder) == (8, 4, False)
    # round trip through the TOML stored with each checkpoint
    (tmp_path / "again.toml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "again.toml")
    assert again.to_dict() == cfg.to_dict()

    (tmp_path / "bad.toml").write_text('learning_rate = 1\nrank = 4\n[data]\nresolutoin = 512\n')
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.toml")
    msg = str(err.value)
    assert "learning_rate: unknown key" in msg
    assert "rank: unknown key; it belongs in the [network] table" in msg
    assert "data.resolutoin: unknown key (did you mean 'resolution'?)" in msg


def test_flags_use_the_same_keys_and_override_toml(tmp_path):
    _dataset(tmp_path / "data")
    (tmp_path / "run.toml").write_text('model = "m"\noutput = "o.safetensors"\nsteps = 50\n[data]\npath = "data"\n[network]\nrank = 8\n')
    args = _parse([str(tmp_path / "run.toml"), "--rank", "16", "--alpha", "8", "--lr", "3e-4", "--resolution", "1024",
                   "--no-train-text-encoder", "--optimizer", "adamw8bit", "--resume", "--batch-size", "2",
                   "--sample-prompts", "a dog --w 64", "--sample-prompts", "a cat"])
    cfg = config_from_args(args)
    assert (cfg.network.rank, cfg.network.alpha, cfg.lr, cfg.data.resolution) == (16, 8, 3e-4, 1024)
    assert cfg.network.train_text_encoder is False and cfg.optimizer == "adamw8bit" and cfg.batch_size == 2
    assert cfg.steps == 50 and cfg.resume == "latest"
    assert cfg.sample_prompts == ["a dog --w 64", "a cat"]
    assert config_from_args(_parse(["--data", "d", "--resume", "ckpt/step-1"])).resume == "ckpt/step-1"
    assert config_from_args(_parse(["--data", "d"])).data.path == "d"


def test_sample_prompt_syntax():
    from sd_lora.training.sampling import load_prompts, parse_prompt_line

    sp = parse_prompt_line("a photo of sks dog, beach --n blurry, low quality --w 512 --h 768 --s 28 --d 1234 --l 7.5")
    assert (sp.prompt, sp.negative, sp.width, sp.height, sp.steps, sp.seed, sp.guidance) == (
        "a photo of sks dog, beach", "blurry, low quality", 512, 768, 28, 1234, 7.5)
    assert [p.prompt for p in load_prompts("# comment\n\na cat\na dog --s 3")] == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="--w needs a number"):
        parse_prompt_line("x --w wide")
