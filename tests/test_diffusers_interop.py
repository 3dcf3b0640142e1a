"""Interop with diffusers and PEFT: our files load there with the same result, and theirs load here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_lora.formats import load_lora, match_lora, save_lora
from sd_lora.network import NetworkConfig, inject_network
from sd_lora.testing import tiny_pipeline

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _trained_file(tmp_path, arch, preset, method="lora", **network):
    torch.manual_seed(3)
    pipe = tiny_pipeline(arch)
    net = inject_network(pipe, NetworkConfig(method=method, preset=preset, rank=4, alpha=2, conv_rank=3, conv_alpha=1.5,
                                             block_ranks={"up": 6}, **network))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_lora(tmp_path / f"{arch}_{preset}.safetensors", net, dtype=torch.float32), len(net.targets)


def _apply_ours(pipe, lora):
    """Our own application: W += delta for every matched module (strict: all must match)."""
    with torch.no_grad():
        for name, (_, _, module) in match_lora(lora, pipe).items():
            module.weight += lora.modules[name].delta(module.weight.shape, base_weight=module.weight)
    return pipe


def _weights(pipe):
    out = {}
    for c in COMPONENTS:
        m = getattr(pipe, c, None)
        if m is not None:
            out.update({f"{c}.{k.replace('.base_layer', '')}": v.detach().clone() for k, v in m.state_dict().items() if "lora_" not in k})
    return out


def _image(pipe):
    kw = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
              generator=torch.Generator().manual_seed(0))
    return pipe(**kw).images


def _assert_same_model(ours, theirs, only: str = ""):
    wo, wt = _weights(ours), _weights(theirs)
    assert wo.keys() == wt.keys()
    wo = {k: v for k, v in wo.items() if k.startswith(only)}
    worst = max((wo[k] - wt[k]).abs().max().item() for k in wo)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("arch,preset", [("sd1", "full"), ("sdxl", "kohya")])
def test_our_kohya_file_loads_in_diffusers_with_the_same_image(tmp_path, arch, preset):
    from peft.tuners.tuners_utils import BaseTunerLayer

    path, n_modules = _trained_file(tmp_path, arch, preset)
    ref = tiny_pipeline(arch)
    ref.load_lora_weights(str(path), adapter_name="ours")
    # Every module of the file became an adapter layer in diffusers (UNet and text encoders).
    adapted = sum(isinstance(m, BaseTunerLayer) for c in COMPONENTS if getattr(ref, c, None) is not None
                  for m in getattr(ref, c).modules())
    assert adapted == n_modules
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora_weights()
    ours = _apply_ours(tiny_pipeline(arch), load_lora(path))
    base = _weights(tiny_pipeline(arch))
    fused = _weights(ref)
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert any(k.startswith("text_encoder.") for k in changed) and any(k.startswith("unet.") for k in changed)
    _assert_same_model(ours, ref)
    diff = np.abs(_image(ours) - _image(ref)).max()
    assert diff < 1e-3, diff


def test_diffusers_saved_file_loads_here_like_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    pipe = tiny_pipeline("sd1")
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                          rank_pattern={"up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2}, init_lora_weights=False)
    te_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    ref = tiny_pipeline("sd1")
    ref.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    ref.fuse_lora()
    ref.unload_lora_weights()
    lora = load_lora(tmp_path)
    assert lora.format == "diffusers"
    assert lora.modules["lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].rank == 2
    _assert_same_model(_apply_ours(tiny_pipeline("sd1"), lora), ref)


def test_peft_saved_adapters_load_here_like_in_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(6)
    pipe = tiny_pipeline("sd1")
    merged = tiny_pipeline("sd1")
    for comp, cfg in (("unet", LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "ff.net.2"], use_dora=True,
                                          init_lora_weights=False)),
                      ("text_encoder", LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "fc2"], init_lora_weights=False))):
        model = get_peft_model(getattr(pipe, comp), cfg)
        model.save_pretrained(tmp_path / comp)
        setattr(merged, comp, model.merge_and_unload())
    lora = load_lora(tmp_path)
    assert lora.format == "peft" and any(m.has_dora for m in lora.modules.values())
    _assert_same_model(_apply_ours(tiny_pipeline("sd1"), lora), merged)


def test_converted_diffusers_and_peft_files_load_in_diffusers_and_peft(tmp_path):
    from peft import PeftModel

    from sd_lora.formats.convert import convert_lora

    # DoRA's default (input-axis) magnitudes have no PEFT form; network.dora_axis = "output" trains PEFT's
    default, _ = _trained_file(tmp_path, "sd1", "full", method="dora")
    with pytest.raises(ValueError, match="per input column.*Keep this file in kohya format"):
        convert_lora(default, tmp_path / "d.safetensors", to="diffusers", dtype="fp32")
    (tmp_path / "out").mkdir()
    path, _ = _trained_file(tmp_path / "out", "sd1", "full", method="dora", dora_axis="output")
    ours = _apply_ours(tiny_pipeline("sd1"), load_lora(path))
    out = convert_lora(path, tmp_path / "d.safetensors", to="diffusers", dtype="fp32")
    ref = tiny_pipeline("sd1")
    ref.load_lora_weights(str(out))
    ref.fuse_lora()
    ref.unload_lora_weights()
    # diffusers 0.42 + transformers 5.23 drop DoRA magnitudes for text encoders even from files
    # diffusers saved itself (key `lora_magnitude_vector.<name>` vs `.<name>.weight`): UNet only here.
    _assert_same_model(ours, ref, only="unet.")
    folder = convert_lora(path, tmp_path / "peft", to="peft", dtype="fp32")
    peft_pipe = tiny_pipeline("sd1")
    for comp in ("unet", "text_encoder"):
        setattr(peft_pipe, comp, PeftModel.from_pretrained(getattr(peft_pipe, comp), folder / comp).merge_and_unload())
    _assert_same_model(ours, peft_pipe)
