"""Issue #18: adapters only where the UNet's conditioning reads the text encoder (SDXL conditions on
CLIP-L's penultimate layer), so AdaLoRA trains the text encoders on every architecture and SDXL
files carry no dead te1 last-layer modules. Tiny pipelines, CPU, fixed seeds."""

from __future__ import annotations

import pytest
import torch

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.models import conditioning_hidden_state, unread_text_encoder_layers
from sd_lora.network.presets import select_targets
from sd_lora.testing import tiny_pipeline
from sd_lora.training import train

from test_train import make_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCHS = ("sd1", "sd2", "sd2-v", "sdxl")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond_models")
    for arch in ARCHS:
        tiny_pipeline(arch).save_pretrained(root / arch)
    return {arch: str(root / arch) for arch in ARCHS}


def test_unread_layers_rule():
    assert list(unread_text_encoder_layers("sdxl", "text_encoder", 12)) == [11]
    assert list(unread_text_encoder_layers("sdxl", "text_encoder_2", 32)) == []  # its pooled output reads layer 31
    for arch in ("sd1", "sd2", "sd2-v"):
        assert list(unread_text_encoder_layers(arch, "text_encoder", 12)) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_cover_exactly_the_layers_whose_output_reaches_the_unet(arch):
    """Every text-encoder target gets a gradient from what conditioning.py feeds the UNet, and every
    layer left out gets none (checked by backpropagating through the encoders as the trainer does)."""
    from sd_lora.training.conditioning import TextConditioner

    pipe = tiny_pipeline(arch)
    is_sdxl = arch == "sdxl"
    for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if te is not None:
            te.requires_grad_(True)
    hidden, pooled = TextConditioner(pipe, is_sdxl).encode(["a red circle"], "cpu")
    (hidden.sum() + (pooled.sum() if pooled is not None else 0)).backward()
    targets = {(t.component, t.path) for t in select_targets(pipe, arch, "kohya", train_unet=False)}
    for component in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, component, None)
        if te is None:
            continue
        for path, module in te.named_modules():
            if isinstance(module, torch.nn.Linear) and ("self_attn" in path or ".mlp." in path):
                reached = module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)
                assert ((component, path) in targets) == reached, (component, path, reached)
    assert conditioning_hidden_state(arch) == (-2 if is_sdxl else -1)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_trains_text_encoders(models, tmp_path, arch):
    """PEFT's AdaLoRA multiplies every adapter weight by its gradient (update_ipt): an adapter the
    conditioning never reads crashed it on SDXL (TypeError: Parameter * NoneType)."""
    make_images(tmp_path / "data" / "1_circle", n=2)
    out = tmp_path / f"{arch}.safetensors"
    cfg = TrainConfig(model=models[arch], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"method": "adalora", "rank": 4, "alpha": 4, "preset": "attention", "train_text_encoder": True},
                      steps=3, seed=1)
    train(cfg)
    tensors, _ = load_safetensors(out)
    prefixes = ("lora_te1_", "lora_te2_") if arch == "sdxl" else ("lora_te_",)
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in tensors), prefix


def test_sdxl_file_has_no_te1_last_layer_modules_and_no_dead_modules(models, tmp_path):
    make_images(tmp_path / "data" / "1_circle", n=2)
    out = tmp_path / "sdxl.safetensors"
    cfg = TrainConfig(model=models["sdxl"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "alpha": 4, "train_text_encoder": True}, steps=2, seed=1)
    train(cfg)
    tensors, _ = load_safetensors(out)
    last = tiny_pipeline("sdxl").text_encoder.config.num_hidden_layers - 1
    assert not [k for k in tensors if k.startswith(f"lora_te1_text_model_encoder_layers_{last}_")]
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in tensors)
    assert any(k.startswith(f"lora_te2_text_model_encoder_layers_{last}_") for k in tensors)
    # lora_up starts at zero: a module still all-zero after training never got a gradient.
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not dead, dead[:6]
