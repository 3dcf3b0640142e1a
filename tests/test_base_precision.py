"""Low-memory frozen base (base_precision): fp8 storage upcast per layer, under trainable LoRA adapters."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from sd_lora.config import ConfigError, DataConfig, TrainConfig
from sd_lora.training.base_precision import (
    UpcastConv2d,
    UpcastLinear,
    apply_base_precision,
    dequantize,
    model_bytes,
    quantize,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp8_scale_keeps_sd_sized_weights_precise():
    # Below ~1e-2 plain e4m3 turns subnormal and loses bits; a per-channel scale keeps 3 mantissa bits.
    torch.manual_seed(0)
    w = torch.randn(320, 768) * 0.005
    q, scale = quantize(w, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (320, 1)
    scaled_err = ((dequantize(q, scale, torch.float32) - w).norm() / w.norm()).item()
    plain_err = ((w.to(torch.float8_e4m3fn).float() - w).norm() / w.norm()).item()
    assert scaled_err < 0.03, scaled_err  # measured 0.026
    assert plain_err > 3 * scaled_err  # measured 0.113, (plain_err, scaled_err)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_upcast_layers_match_a_plain_layer_with_the_stored_weight_forward_and_backward(compute):
    torch.manual_seed(0)
    for layer, x in ((nn.Linear(16, 24), torch.randn(2, 5, 16)), (nn.Conv2d(8, 12, 3, padding=1, stride=2), torch.randn(2, 8, 9, 9))):
        cls = UpcastLinear if isinstance(layer, nn.Linear) else UpcastConv2d
        wrapped = cls.convert(copy.deepcopy(layer), torch.float8_e4m3fn, compute)
        assert isinstance(wrapped, type(layer)) and wrapped.stored_weight.dtype == torch.float8_e4m3fn
        assert "weight" not in wrapped._parameters  # the full-precision weight is gone
        assert not list(wrapped.parameters()) or not any(p.requires_grad for p in wrapped.parameters())
        # the reference: an ordinary layer holding the same (dequantized) weight
        ref = type(layer).__new__(type(layer))
        ref.__dict__.update(layer.__dict__)
        ref._parameters = {"weight": nn.Parameter(wrapped.weight.detach().clone(), requires_grad=False),
                           "bias": nn.Parameter(layer.bias.detach().to(compute), requires_grad=False)}
        xa = x.clone().requires_grad_(True)
        xb = x.clone().to(compute).requires_grad_(True)
        ya, yb = wrapped(xa), ref(xb)
        assert ya.dtype == compute
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        (ya.float() ** 2).sum().backward()
        (yb.float() ** 2).sum().backward()
        assert xa.grad.dtype == torch.float32  # the gradient comes back in the input's dtype
        tol = 0 if compute == torch.float32 else 2e-2
        torch.testing.assert_close(xa.grad, xb.grad.float(), rtol=tol, atol=tol)


def _inject(arch="sd1", method="lora"):
    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.testing import tiny_pipeline

    pipe = tiny_pipeline(arch)
    network = inject_network(pipe, NetworkConfig(method=method, rank=4, alpha=4, train_text_encoder=True))
    return pipe, network


def test_fp8_from_the_files_equals_fp8_from_the_loaded_weights(tmp_path):
    """With readers, each layer's weight is read from the safetensors file just before it is stored in
    fp8 (the loaded, memory-mapped fp32 weights are never paged in): the same bits as converting the
    loaded weights."""
    from sd_lora.models import WeightReader, load_base
    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.testing import tiny_pipeline

    tiny_pipeline("sdxl").save_pretrained(tmp_path / "m")
    stored = []
    for use_files in (False, True):
        pipe = load_base(tmp_path / "m")
        readers = {n: WeightReader.for_model(getattr(pipe, n)) for n in ("unet", "text_encoder", "text_encoder_2")} if use_files else None
        reads = []
        if readers:
            assert all(readers.values())
            for r in readers.values():
                r.read = lambda name, dtype=None, _read=r.read: reads.append(name) or _read(name, dtype)
        inject_network(pipe, NetworkConfig(rank=4, alpha=4, train_text_encoder=True))
        layers = apply_base_precision(pipe, "fp8", torch.bfloat16, readers)["layers"]
        assert layers > 50 and len(reads) == (layers if use_files else 0)  # every layer read from its file
        stored.append({f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2")
                       for k, v in getattr(pipe, c).state_dict().items() if k.endswith(("stored_weight", "weight_scale"))})
    assert stored[0].keys() == stored[1].keys() and len(stored[0]) > 100
    for k in stored[0]:
        assert torch.equal(stored[0][k].view(torch.uint8) if stored[0][k].dtype == torch.float8_e4m3fn else stored[0][k],
                           stored[1][k].view(torch.uint8) if stored[1][k].dtype == torch.float8_e4m3fn else stored[1][k]), k


@pytest.mark.parametrize("method", ["lora", "dora", "loha"])
def test_apply_fp8_under_peft_adapters(method):
    pipe, network = _inject("sd1", method)
    before = {n: model_bytes(getattr(pipe, n)) for n in ("unet", "text_encoder")}
    info = apply_base_precision(pipe, "fp8", torch.float32)
    assert info["layers"] > 50
    for name in ("unet", "text_encoder"):
        model = getattr(pipe, name)
        # every frozen Linear/Conv2d is stored in fp8, adapters are untouched fp32 trainables
        plain = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and not m.weight.requires_grad]
        assert plain == [], plain[:3]
        # (the tiny text encoder is mostly token embedding, which stays in the compute dtype)
        assert model_bytes(model) < (0.6 if name == "unet" else 0.8) * before[name]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in network.parameters())
    assert any(n.endswith("stored_weight") for n in pipe.unet._ddp_params_and_buffers_to_ignore)  # no DDP broadcast per step
    # converted in place: the network's own references see fp8 too (no full-precision copy kept alive)
    assert all("weight" not in t.module._parameters for t in network.targets)
    # gradients reach the adapters of both models through the fp8 base layers
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), hidden).sample
    out.pow(2).mean().backward()
    for params in (network.unet_parameters(), network.text_encoder_parameters()):
        assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    # the exported file has the same keys and shapes as one trained on the unquantized base
    _, reference = _inject("sd1", method)
    ours = network.kohya_state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.kohya_state_dict().items()}


def test_precision_equal_to_compute_dtype_changes_nothing():
    pipe, _ = _inject()
    assert apply_base_precision(pipe, "bf16", torch.bfloat16)["layers"] == 0
    assert apply_base_precision(pipe, None, torch.float32)["layers"] == 0


def test_fp8_base_of_full_size_sd15_unet_is_about_half_of_bf16():
    from sd_lora.testing import full_size_unet

    unet = full_size_unet("sd1", device="meta")  # no storage: only the bytes are counted
    bf16 = model_bytes(unet.to(torch.bfloat16))
    unet.requires_grad_(False)  # only frozen layers are stored small
    apply_base_precision(types.SimpleNamespace(unet=unet), "fp8", torch.bfloat16)
    fp8 = model_bytes(unet)
    assert fp8 < 0.52 * bf16, (fp8, bf16)  # measured 0.503: 1 byte + per-channel scales vs 2 bytes
    assert bf16 / 2**30 > 1.5  # 859.5 M parameters


def test_config_validates_base_precision_up_front(monkeypatch):
    import sd_lora.config as config

    cfg = TrainConfig(model="", output="x.safetensors", data=DataConfig(path="d"), steps=1, base_precision="nf4")
    monkeypatch.setattr(config, "_cuda_available", lambda: False)
    errors = cfg.validate(check_paths=False)
    assert any(e.startswith("base_precision: nf4 needs a CUDA GPU") and 'base_precision = "fp8"' in e for e in errors)
    assert any(e.startswith("model:") for e in errors)  # reported together with the other problems
    cfg.base_precision = "fp4"
    assert any("unknown 'fp4'" in e and "fp8" in e for e in cfg.validate(check_paths=False))
    for ok in ("fp8", "bf16", "fp16", "fp32", None):
        cfg.base_precision = ok
        assert not any(e.startswith("base_precision") for e in cfg.validate(check_paths=False))
    monkeypatch.setattr(config, "_cuda_available", lambda: True)
    cfg.base_precision = "int8"
    assert not any(e.startswith("base_precision") for e in cfg.validate(check_paths=False))  # bitsandbytes is installed


def test_cli_flag_and_toml_key(tmp_path):
    import argparse

    from sd_lora.commands import train as train_cmd
    from sd_lora.config import load_config

    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--base-precision", "fp8"])
    assert train_cmd.config_from_args(args).base_precision == "fp8"
    (tmp_path / "c.toml").write_text('base_precision = "fp8"\n')
    assert load_config(tmp_path / "c.toml").base_precision == "fp8"
    (tmp_path / "c.toml").write_text('base_precision = "nf5"\n')
    with pytest.raises(ConfigError):
        load_config(tmp_path / "c.toml").check()


def test_fp8_base_trains_tiny_sd1_and_the_file_works_on_the_fp32_base(tmp_path):
    from sd_lora.data.cache import encode_pixels, item_pixels
    from sd_lora.data.dataset import scan_dataset
    from sd_lora.io import load_safetensors
    from sd_lora.models import load_base
    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.testing import tiny_pipeline
    from sd_lora.training import train
    from sd_lora.training.events import read_events
    from tests.test_train import _fixed_noise_loss, make_images

    tiny_pipeline("sd1").save_pretrained(tmp_path / "model")
    make_images(tmp_path / "data" / "5_circle")
    out = tmp_path / "out" / "fp8.safetensors"
    net = {"rank": 8, "alpha": 8, "preset": "attention"}
    cfg = TrainConfig(model=str(tmp_path / "model"), output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network=net, steps=20, batch_size=4, lr=1e-2, seed=1, mixed_precision="bf16", base_precision="fp8")
    train(cfg)
    losses = [e["loss"] for e in read_events(out.parent / "fp8.events.jsonl") if e["event"] == "step"]
    assert sum(losses[-5:]) < sum(losses[:5]), losses

    # an ordinary LoRA: applied to the unquantized fp32 base it lowers the loss at fixed noise
    pipe = load_base(str(tmp_path / "model"))
    ds = scan_dataset(cfg.data)
    latents = torch.cat([encode_pixels(pipe.vae, item_pixels(i, False, 10**8)[None]) for i in ds.items])
    ids = pipe.tokenizer([i.caption for i in ds.items], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0].detach()
    network = inject_network(pipe, NetworkConfig(**net))
    before = _fixed_noise_loss(pipe, latents, hidden)
    tensors, metadata = load_safetensors(out)
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k.endswith(".weight"))
    network.load_kohya_state_dict({k: v.float() for k, v in tensors.items()})
    after = _fixed_noise_loss(pipe, latents, hidden)
    assert after < before * 0.97, (before, after)  # measured: 1.088 -> 1.045


def test_nf4_int8_refused_without_cuda_and_bitsandbytes_layers_build(monkeypatch):
    import bitsandbytes as bnb

    from sd_lora.training import base_precision

    pipe, _ = _inject()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*fp8"):
        apply_base_precision(pipe, "nf4", torch.bfloat16)
    # the layers the CUDA path puts in place (quantized by bitsandbytes on the move to the GPU)
    lin = nn.Linear(64, 32)
    four = base_precision._bnb_layer(lin, "nf4", torch.bfloat16)
    eight = base_precision._bnb_layer(lin, "int8", torch.bfloat16)
    assert isinstance(four, bnb.nn.Linear4bit) and four.weight.quant_type == "nf4" and not four.weight.requires_grad
    assert isinstance(eight, bnb.nn.Linear8bitLt) and not eight.weight.requires_grad
    torch.testing.assert_close(four.bias, lin.bias.detach().bfloat16())
