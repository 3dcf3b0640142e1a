"""Config keys that describe themselves: one field declaration gives the CLI flag (with kohya's
spellings), the checks, the TOML path handling, the web UI's choices and the docs table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sd_lora.commands.train import config_from_args, with_flags
from sd_lora.config import ConfigError, DataConfig, TrainConfig, config_key, config_keys, load_config
from sd_lora.fields import markdown_table, table_in
from sd_lora.network.config import NetworkConfig

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    from sd_lora.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def _dataset(root):
    (root / "5_sks").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "5_sks" / "a.png")
    return root


def test_config_and_train_flags_import_without_torch_or_the_trainer():
    # A bare `sd_lora` package, so only the config modules' own imports count (the package __init__
    # is made lazy separately); the flags are built and the registry's method choices are read.
    code = f"""
import argparse, json, sys, types
pkg = types.ModuleType("sd_lora"); pkg.__path__ = [{str(ROOT / "sd_lora")!r}]; sys.modules["sd_lora"] = pkg
import sd_lora.config, sd_lora.network.config
from sd_lora.network.config import NetworkConfig
from sd_lora.commands import train
train.register(argparse.ArgumentParser().add_subparsers())
sd_lora.config.config_key("network.method").choices
sd_lora.config.TrainConfig(steps=1).validate(check_paths=False)
NetworkConfig().validate()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "peft")
                        or m.startswith("sd_lora.training"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_docs_table_matches_the_fields():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert table_in(text) == markdown_table(config_keys()), (
        "docs/training.md's key table is out of date: run `python -m sd_lora.fields docs/training.md`")
    for key in config_keys():
        assert f"| `{key.name}` |" in text


def test_every_key_describes_itself():
    keys = config_keys()
    names = [k.name for k in keys]
    assert len(names) == len(set(names)) and "network.method" in names and "data.path" in names
    flags = [k.flag for k in keys]
    assert len(flags) == len(set(flags))
    kohya = [alias for k in keys for alias in k.kohya]
    assert len(kohya) == len(set(kohya))
    for k in keys:
        assert k.help, f"{k.name} has no help"
        if k.choices is not None:
            assert k.default is None or k.default in k.choices, k.name
    # the facts live on the fields: method choices from the registry, the rest declared there
    from sd_lora.methods import trainable_method_names

    assert config_key("network.method").choices == trainable_method_names()
    assert config_key("base_precision").choices == ("fp32", "fp16", "bf16", "fp8", "nf4", "int8")
    assert config_key("data.cache_latents").choices == ("ram", "disk", "none")
    # every str key named like a path is marked as one (or the UI would not confine it)
    for k in keys:
        looks_like_path = k.attr in ("model", "output", "vae", "resume", "sample_prompts", "init_lora") or k.attr.endswith(("path", "_dir"))
        assert bool(k.path) == looks_like_path, k.name


def test_help_has_readable_metavars_real_defaults_and_help_for_every_flag():
    from sd_lora.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    assert "CFG__" not in text and "(default: None)" not in text
    for shown in ("--model PATH", "--data DIR", "--output FILE", "--rank N", "--lr LR", "--resume [latest|DIR]",
                  "--method {lora,dora,loha,lokr,adalora}", "--cache-latents {ram,disk,none}"):
        assert shown in text, shown
    assert "adapter rank (dim); 16-32 is typical for SD1.5 (default: 32) [kohya: --network_dim]" in " ".join(text.split())
    assert "(default: 512 px)" in " ".join(text.split())
    for action in train._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            assert action.help, action.option_strings


def test_kohya_spellings_are_aliases(tmp_path):
    cfg = config_from_args(_parse([
        "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--reg_data_dir", "r", "--output_dir", "out",
        "--output_name", "style", "--network_dim", "8", "--network_alpha", "4", "--network_dropout", "0.1",
        "--learning_rate", "3e-4", "--train_batch_size", "2", "--max_train_steps", "40", "--gradient_accumulation_steps", "2",
        "--cache_latents", "--cache_latents_to_disk", "--flip_aug", "--shuffle_caption", "--network_train_unet_only",
        "--v_parameterization", "--save_every_n_steps", "10", "--sample_every_n_steps", "0", "--caption_dropout_rate", "0.05",
        "--bucket_reso_steps", "32", "--training_comment", "hi", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--lr_warmup_steps", "5", "--batch_size", "2", "--optimizer_type", "PagedAdamW8bit",
    ]))
    assert cfg.optimizer == "paged_adamw8bit"  # kohya's spelling of the same choice
    assert (cfg.model, cfg.data.path, cfg.data.reg_path, cfg.output) == ("m", "d", "r", str(Path("out") / "style.safetensors"))
    assert (cfg.network.rank, cfg.network.alpha, cfg.network.dropout, cfg.lr, cfg.batch_size, cfg.steps) == (8, 4.0, 0.1, 3e-4, 2, 40)
    assert cfg.gradient_accumulation == 2 and cfg.data.cache_latents == "disk" and cfg.data.flip and cfg.data.shuffle_captions
    assert cfg.network.train_text_encoder is False and cfg.network.train_unet is True
    assert cfg.prediction_type == "v_prediction" and (cfg.save_every, cfg.sample_every) == (10, 0)
    assert (cfg.data.caption_dropout, cfg.data.bucket_step, cfg.comment) == (0.05, 32, "hi")
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.lr_warmup_steps == 5
    # kohya's output name defaults to "last"
    assert config_from_args(_parse(["--output_dir", "out"])).output == str(Path("out") / "last.safetensors")
    with pytest.raises(ConfigError, match="not both"):
        config_from_args(_parse(["--output", "x.safetensors", "--output_name", "y"]))


@pytest.mark.parametrize("flag, answer", [
    ("--rnak", "did you mean --rank?"),
    ("--network_dimm", "did you mean --rank?"),  # close to kohya's --network_dim, which is --rank
    ("--batch_sise", "did you mean --batch-size?"),
    ("--unet_lr", "--lr is the UNet learning rate here"),
    ("--network_module", "--method"),
    ("--xformers", "nothing to set"),
])
def test_unknown_flags_get_an_answer(flag, answer, capsys):
    with pytest.raises(SystemExit):
        _parse([flag, "1"] if flag != "--xformers" else [flag])
    err = capsys.readouterr().err
    assert f"unrecognized argument {flag}" in err and answer in err, err


def test_steps_and_epochs_name_each_other_as_partners():
    from sd_lora.config import config_key, config_keys

    assert (config_key("steps").partner, config_key("epochs").partner) == ("epochs", "steps")
    assert {k.name for k in config_keys() if k.partner} == {"steps", "epochs"}


def test_a_length_flag_replaces_the_files_length(tmp_path):
    (tmp_path / "run.toml").write_text('epochs = 3\n')
    cfg = config_from_args(_parse([str(tmp_path / "run.toml"), "--steps", "40"]))
    assert (cfg.steps, cfg.epochs) == (40, None)
    assert not any(e.startswith("steps/epochs") for e in cfg.validate(check_paths=False))
    (tmp_path / "run.toml").write_text('steps = 30\n')
    cfg = config_from_args(_parse([str(tmp_path / "run.toml"), "--max_train_epochs", "2"]))
    assert (cfg.steps, cfg.epochs) == (None, 2)
    # both flags: that is still a conflict, not a silent choice
    cfg = config_from_args(_parse(["--steps", "5", "--epochs", "2"]))
    assert "steps/epochs: set only one of them (both are set)" in cfg.validate(check_paths=False)
    # both in the file: also a conflict
    (tmp_path / "run.toml").write_text('steps = 30\nepochs = 2\n')
    assert "steps/epochs: set only one of them (both are set)" in load_config(tmp_path / "run.toml").validate(check_paths=False)


def test_zero_means_never_for_save_and_sample_every():
    cfg = TrainConfig(model="m", output="o.safetensors", data=DataConfig(path="d"), steps=5, save_every=0, sample_every=0,
                      save_every_epochs=0)
    assert cfg.validate(check_paths=False) == []
    assert config_from_args(_parse(["--sample-every", "0", "--save-every", "0"])).sample_every == 0
    cfg.save_every, cfg.sample_every = -1, -2
    errors = cfg.validate(check_paths=False)
    assert "save_every: must be a whole number >= 0 (0: never) (got -1)" in errors
    assert "sample_every: must be a whole number >= 0 (0: never) (got -2)" in errors


def test_a_type_error_does_not_hide_the_other_problems(tmp_path):
    (tmp_path / "run.toml").write_text(
        'steps = "10"\nlr = 0\nbatch_size = 2.5\n[data]\nresolution = 500\nflip = "yes"\n[network]\nrank = "x"\nmethod = "lorra"\n')
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "run.toml")
    errors = err.value.errors
    expect = ["steps: must be a whole number (got '10')", "batch_size: must be a whole number (got 2.5)",
              "data.flip: must be true or false (got 'yes')", "network.rank: must be a whole number (got 'x')",
              "lr: must be a number > 0", "data.resolution: must be a multiple of 64",
              "network.method: unknown 'lorra' (did you mean 'lora'?)", "model: missing", "data.path: missing"]
    for start in expect:
        assert any(e.startswith(start) for e in errors), (start, errors)
    # the wrong-typed keys are reported once, not again as "missing"/"unset"
    assert not any(e.startswith("steps/epochs") for e in errors)
    assert len(errors) == len(expect) + 1  # + output: missing


def test_messages_name_keys_and_the_cli_adds_flags(tmp_path, capsys):
    errors = TrainConfig().validate(check_paths=False)
    assert errors and not any("--" in e for e in errors), errors
    assert "model: missing; set it to a diffusers folder or a .safetensors file" in errors
    net = NetworkConfig(method="lorra", preset="everything").validate()
    assert net[0] == "method: unknown 'lorra' (did you mean 'lora'?); choose one of lora, dora, loha, lokr, adalora"
    assert net[1].startswith("preset: unknown 'everything'")
    assert with_flags("data.path: missing") == "data.path (--data): missing"
    assert with_flags("steps/epochs: set one") == "steps/epochs (--epochs / --steps): set one"
    assert with_flags("network.rank: bad") == "network.rank (--rank): bad"
    from sd_lora.cli import main

    assert main(["train", "--rank", "0"]) == 1
    err = capsys.readouterr().err
    assert "model (--model): missing" in err and "network.rank (--rank): must be a whole number >= 1 (got 0)" in err


def test_toml_relative_paths_follow_the_path_markers(tmp_path):
    path_keys = [k for k in config_keys() if k.path]
    lines, tables = [], {"data": [], "network": []}
    for k in path_keys:
        (tables[k.section] if k.section else lines).append(f'{k.attr} = "rel/{k.attr}"')
    toml = "\n".join(lines) + "\n" + "".join(f"[{s}]\n" + "\n".join(v) + "\n" for s, v in tables.items() if v)
    (tmp_path / "run.toml").write_text(toml)
    cfg = load_config(tmp_path / "run.toml")  # loading checks types and keys; the paths are checked by validate()
    for k in path_keys:
        assert k.get(cfg) == str(tmp_path / "rel" / k.attr), k.name
    # not paths: the resume keyword, prompt lines
    (tmp_path / "run.toml").write_text('resume = "latest"\nsample_prompts = "a cat\\na dog"\nmodel = "/abs/m"\n')
    cfg = load_config(tmp_path / "run.toml")
    assert (cfg.resume, cfg.sample_prompts, cfg.model) == ("latest", "a cat\na dog", "/abs/m")
    (tmp_path / "run.toml").write_text('sample_prompts = ["p.txt"]\n')
    assert load_config(tmp_path / "run.toml").sample_prompts == ["p.txt"]


def test_resume_latest_looks_for_checkpoint_folders_by_their_artifact_name(tmp_path):
    from sd_lora import artifacts

    data = _dataset(tmp_path / "data")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    cfg = TrainConfig(model=str(tmp_path / "model"), output=str(tmp_path / "o.safetensors"), data=DataConfig(path=str(data)),
                      steps=10, resume="latest")
    assert any(e.startswith("resume: no checkpoint in") for e in cfg.validate())
    (cfg.checkpoint_root / "not-a-checkpoint").mkdir(parents=True)
    assert any(e.startswith("resume: no checkpoint in") for e in cfg.validate())
    (cfg.checkpoint_root / artifacts.checkpoint_name(20)).mkdir()
    assert cfg.validate() == []
    assert cfg.stop_file == artifacts.stop_file(cfg.checkpoint_root)
    assert cfg.events_path == artifacts.events_file(cfg.output)
    assert TrainConfig(output="o.safetensors", checkpoint_dir="c").checkpoint_root == Path("c")
