"""Issue #18: a LoRA's metadata says what it was trained to predict, whatever the base architecture."""

from __future__ import annotations

import pytest

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.formats.metadata import build_training_metadata
from sd_lora.io import load_safetensors
from sd_lora.training import train

from test_train import make_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sd1_trained_with_v_prediction_is_labelled_v(tiny_models, tmp_path):
    make_images(tmp_path / "data" / "1_circle", n=2)
    out = tmp_path / "v.safetensors"
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "alpha": 4, "preset": "attention"}, steps=1, seed=1, prediction_type="v_prediction")
    train(cfg)
    _, md = load_safetensors(out)
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_v_parameterization"] == "True" and md["modelspec.prediction_type"] == "v"


def test_prediction_type_follows_the_argument_not_the_architecture():
    eps = build_training_metadata("sd1", timestamp=0)
    assert "ss_v_parameterization" not in eps and eps["modelspec.prediction_type"] == "epsilon"
    assert build_training_metadata("sd2-v", timestamp=0)["modelspec.prediction_type"] == "v"
    v = build_training_metadata("sdxl", timestamp=0, prediction_type="v_prediction")
    assert v["ss_v_parameterization"] == "True" and v["modelspec.prediction_type"] == "v"
    with pytest.raises(ValueError, match="prediction_type"):
        build_training_metadata("sd1", prediction_type="v")
