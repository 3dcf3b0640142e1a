"""Issue #18: a LoRA's metadata says what it was trained to predict, whatever the base architecture."""

from __future__ import annotations

import pytest

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.formats.metadata import build_training_metadata
from sd_lora.io import load_safetensors
from sd_lora.training import train

from test_train import make_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sd1_trained_with_v_prediction_is_labelled_v(tiny_models, tmp_path, capsys):
    make_images(tmp_path / "data" / "1_circle", n=2)
    out = tmp_path / "v.safetensors"
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "alpha": 4, "preset": "attention"}, steps=1, seed=1, prediction_type="v_prediction")
    train(cfg)
    _, md = load_safetensors(out)
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_v_parameterization"] == "True" and md["modelspec.prediction_type"] == "v"
    # every kohya key the trainer wrote before the settings declared their own (issue #17), same values
    before = {"ss_base_model_version", "ss_batch_size_per_device", "ss_cache_latents", "ss_caption_dropout_rate",
              "ss_dataset_dirs", "ss_epoch", "ss_gradient_accumulation_steps", "ss_gradient_checkpointing",
              "ss_learning_rate", "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_max_grad_norm", "ss_max_train_steps",
              "ss_mixed_precision", "ss_network_alpha", "ss_network_dim", "ss_network_dropout", "ss_network_module",
              "ss_noise_offset", "ss_num_batches_per_epoch", "ss_num_epochs", "ss_num_reg_images", "ss_num_train_images",
              "ss_optimizer", "ss_output_name", "ss_resolution", "ss_sd_model_name", "ss_seed", "ss_steps",
              "ss_tag_frequency", "ss_text_encoder_lr", "ss_unet_lr", "ss_v2", "ss_zero_terminal_snr"}
    assert before <= set(md)
    # ss_optimizer: the class that ran and its arguments, as kohya writes it (train_network.py: "module.Class(args)")
    assert (md["ss_learning_rate"], md["ss_seed"], md["ss_sd_model_name"], md["ss_optimizer"]) == (
        "0.0001", "1", "sd1", "torch.optim.adamw.AdamW(weight_decay=0.01)")
    assert (md["ss_steps"], md["ss_network_dim"], md["ss_cache_latents"]) == ("1", "4", "True")
    from sd_lora.fields import recorded_settings

    settings = recorded_settings(md)
    assert settings["prediction_type"] == "v_prediction" and settings["data.path"] == "data" and "cpu_threads" not in settings
    # `sd-lora inspect` shows the settings that are not at their default
    from sd_lora.cli import main

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert 'prediction_type = "v_prediction"' in shown and "  steps = 1" in shown and "  network.method" not in shown


def test_prediction_type_follows_the_argument_not_the_architecture():
    eps = build_training_metadata("sd1", timestamp=0)
    assert "ss_v_parameterization" not in eps and eps["modelspec.prediction_type"] == "epsilon"
    assert build_training_metadata("sd2-v", timestamp=0)["modelspec.prediction_type"] == "v"
    v = build_training_metadata("sdxl", timestamp=0, prediction_type="v_prediction")
    assert v["ss_v_parameterization"] == "True" and v["modelspec.prediction_type"] == "v"
    with pytest.raises(ValueError, match="prediction_type"):
        build_training_metadata("sd1", prediction_type="v")


# ---- issue #17: the metadata follows from each field's declaration -------------------------------------

def _other_value(key):
    """A value of the key's type that differs from its default."""
    if key.choices:
        return next(c for c in key.choices if c != key.default)
    if key.path:
        return "/home/someone/private/thing-name"
    if key.kind == "bool":
        return not key.default
    if key.kind == "int":
        return (key.default or 1) + 6
    return {"float": 0.375, "dict": {"down": 2}, "list": ["a prompt"]}.get(key.kind, "some text")


def test_every_setting_reaches_the_metadata_as_its_field_declares():
    from sd_lora.config import config_keys, config_metadata
    from sd_lora.fields import recorded_settings

    base = config_metadata(TrainConfig())
    assert recorded_settings(base)["network.rank"] == 32 and "resume" not in recorded_settings(base)
    for key in config_keys():
        cfg = TrainConfig()
        value = _other_value(key)
        key.set(cfg, value)
        md = config_metadata(cfg)
        settings = recorded_settings(md)
        written = "thing-name" if key.path else value  # paths are written as their last part only
        if key.ss is False:
            assert key.name not in settings and md == base, key.name
            continue
        assert settings[key.name] == written, key.name
        if key.ss:
            assert md[key.ss] == str(written), key.name
        assert "/home/someone" not in str(md), key.name


def test_kohya_metadata_keys_are_declared_once():
    from sd_lora.config import config_keys

    declared = [k.ss for k in config_keys() if isinstance(k.ss, str)]
    assert len(declared) == len(set(declared))
    # kohya's names for what these settings mean (sd-scripts train_network.py @48d368f, lines 1004-1064, 1183-1198)
    assert {"ss_learning_rate", "ss_optimizer", "ss_seed", "ss_noise_offset", "ss_network_dropout", "ss_sd_model_name",
            "ss_caption_dropout_rate", "ss_batch_size_per_device", "ss_prior_loss_weight"} <= set(declared)
