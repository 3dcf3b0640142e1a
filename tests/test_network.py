"""Adapter injection: presets and kohya names on full-size models, sizes, methods, dropout, removal."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from sd_lora.network import NetworkConfig, inject_network
from sd_lora.network.presets import estimate_file_bytes, select_targets
from sd_lora.testing import full_size_text_encoders, full_size_unet, tiny_pipeline


def _meta_pipe(arch):
    tes = full_size_text_encoders(arch)
    return SimpleNamespace(unet=full_size_unet(arch), text_encoder=tes[0],
                           text_encoder_2=tes[1] if len(tes) > 1 else None, scheduler=None)


def _expected_kohya_names(arch):
    """kohya's naming rule written out independently: transformer-block layers of each attention
    block (diffusers layout for SD1/SD2, SGM layout for SDXL) + TE attention and MLP."""
    inner = ["proj_in", "proj_out"]
    per_block = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj", "ff_net_2"]
    names = set()
    if arch == "sdxl":
        blocks = {**{f"input_blocks_{n}_1": d for n, d in ((4, 2), (5, 2), (7, 10), (8, 10))},
                  "middle_block_1": 10, **{f"output_blocks_{n}_1": d for n, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2))}}
        # CLIP-L's last layer is not read (SDXL conditions on its penultimate states): no modules there.
        te = {"lora_te1_": 11, "lora_te2_": 32}
    else:
        blocks = {**{f"down_blocks_{i}_attentions_{j}": 1 for i in range(3) for j in range(2)}, "mid_block_attentions_0": 1,
                  **{f"up_blocks_{i}_attentions_{j}": 1 for i in range(1, 4) for j in range(3)}}
        te = {"lora_te_": 12 if arch == "sd1" else 23}
    for block, depth in blocks.items():
        names |= {f"lora_unet_{block}_{p}" for p in inner}
        names |= {f"lora_unet_{block}_transformer_blocks_{d}_{p}" for d in range(depth) for p in per_block}
    for prefix, layers in te.items():
        names |= {f"{prefix}text_model_encoder_layers_{i}_{p}" for i in range(layers)
                  for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    return names


@pytest.mark.parametrize("arch,n_unet,n_te", [("sd1", 192, 72), ("sd2", 192, 138), ("sdxl", 722, 258)])
def test_kohya_preset_names_on_full_size_models(arch, n_unet, n_te):
    net = inject_network(_meta_pipe(arch), NetworkConfig())  # meta device: no weights allocated
    shapes = net.kohya_shapes()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in shapes}
    assert modules == _expected_kohya_names(arch)
    assert sum(m.startswith("lora_unet_") for m in modules) == n_unet
    assert sum(m.startswith("lora_te") for m in modules) == n_te
    assert all(re.fullmatch(r"lora_(unet|te[12]?)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in shapes)


def test_documented_sd15_sizes():
    """docs/formats.md size table (fp16 MB, SD1.5): counted from the injected PEFT parameters."""
    pipe = _meta_pipe("sd1")
    mb = {}
    for preset in ("attention", "kohya"):
        for rank in (16, 32):
            net = inject_network(pipe, NetworkConfig(preset=preset, rank=rank))
            n = sum(torch.Size(s).numel() for s in net.kohya_shapes().values())
            mb[(preset, rank)] = round(n * 2 / 1e6, 1)
            assert estimate_file_bytes(net.targets, net.config) == n * 2
            net.remove()
    assert mb == {("attention", 16): 8.7, ("attention", 32): 17.5, ("kohya", 16): 18.9, ("kohya", 32): 37.7}
    # Defaults (kohya, rank 32) give a 20-50 MB file.
    assert 20 <= mb[("kohya", NetworkConfig().rank)] <= 50


def test_estimate_matches_real_file_size(tmp_path):
    from sd_lora.formats import save_lora

    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(preset="full", rank=4, conv_rank=2))
    path = save_lora(tmp_path / "a.safetensors", net, metadata={})
    data = path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    assert data == estimate_file_bytes(net.targets, net.config)


def test_config_validate_lists_every_problem():
    errors = NetworkConfig(method="lorax", rank=0, dropout=1.5, block_ranks={"side": 4},
                           train_unet=False, train_text_encoder=False).validate()
    assert len(errors) == 5
    assert NetworkConfig().validate() == []
    with pytest.raises(ValueError, match="rank: must be"):  # messages name the key
        inject_network(tiny_pipeline("sd1"), NetworkConfig(rank=0))


def test_inject_freezes_base_trains_adapters_and_remove_restores():
    pipe = tiny_pipeline("sd1").to(torch.float16)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    x = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    ctx = torch.randn(1, 77, 32, dtype=torch.float16)
    ref = pipe.unet(x, 10, ctx).sample
    net = inject_network(pipe, NetworkConfig(rank=4, alpha=4))
    assert net.unet_parameters() and net.text_encoder_parameters()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "sd_lora" not in n)
    assert torch.equal(pipe.unet(x, 10, ctx).sample, ref)  # lora_up starts at zero
    with pytest.raises(ValueError, match="already has adapters"):
        inject_network(pipe, NetworkConfig())
    net.remove()
    assert pipe.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    assert type(pipe.unet.down_blocks[1].attentions[0].proj_in).__name__ == "Conv2d"


def test_block_ranks_and_conv_rank():
    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(preset="full", rank=4, alpha=2, conv_rank=2, conv_alpha=1,
                                             block_ranks={"down": 3, "up": 5}, block_alphas={"up": 7}))
    sd = net.kohya_state_dict()
    rank = {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    alpha = {k[: -len(".alpha")]: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert rank["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == 3
    assert rank["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"] == 4
    up = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert (rank[up], alpha[up]) == (5, 7.0)
    assert (rank["lora_unet_down_blocks_0_resnets_0_conv1"], alpha["lora_unet_down_blocks_0_resnets_0_conv1"]) == (2, 1.0)
    assert rank["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == 3  # Linear in a ResNet: rank, not conv_rank
    assert rank["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 4


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_kohya_state_dict_reproduces_peft_delta_and_reloads(method):
    from sd_lora.formats.lora_file import LoraModule
    from sd_lora.methods import for_keys

    torch.manual_seed(1)
    pipe = tiny_pipeline("sdxl")
    net = inject_network(pipe, NetworkConfig(method=method, preset="full", rank=4, alpha=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = net.kohya_state_dict()
    for t in net.targets[::7]:
        layer = getattr(pipe, t.component).get_submodule(t.path)
        base = layer.get_base_layer().weight.detach()
        tensors = {k[len(t.kohya_name) + 1:]: v for k, v in sd.items() if k.startswith(t.kohya_name + ".")}
        ours = LoraModule(t.kohya_name, for_keys(tensors).name, tensors).delta(base.shape, base_weight=base)
        if method == "dora":  # the trained layer's output equals the base layer's with base + our delta
            # (DoRA is PEFT's LoRA layer plus our input-axis magnitude, which PEFT's merge() does not know)
            bl = layer.get_base_layer()
            x = torch.randn(2, base.shape[1], 6, 6) if base.dim() == 4 else torch.randn(2, 3, base.shape[1])
            with torch.no_grad():
                want = layer(x)
                saved = bl.weight.data.clone()
                bl.weight.data += ours
                got = layer.get_base_layer()(x)
                bl.weight.data = saved
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            continue
        else:
            peft = layer.get_delta_weight("sd_lora").detach()
        torch.testing.assert_close(ours, peft, atol=1e-5, rtol=1e-4)
    # Inverse: a fresh network loaded from the state dict exports the same tensors.
    pipe2 = tiny_pipeline("sdxl")
    net2 = inject_network(pipe2, NetworkConfig(method=method, preset="full", rank=4, alpha=2))
    net2.load_kohya_state_dict(sd)
    sd2 = net2.kohya_state_dict()
    assert all(torch.allclose(sd[k], sd2[k]) for k in sd)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        net2.load_kohya_state_dict(bad)


def test_rank_and_module_dropout_only_in_training():
    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(rank=8, alpha=8, rank_dropout=0.5, module_dropout=0.0, train_text_encoder=False))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, layer.in_features)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a different rank mask each call
    net.remove()
    net = inject_network(pipe, NetworkConfig(rank=8, module_dropout=0.999, train_text_encoder=False))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    layer.train()
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x))  # adapter skipped
    layer.eval()
    assert not torch.allclose(layer(x), layer.get_base_layer()(x))


def test_adalora_saves_plain_lora_with_per_module_ranks():
    from sd_lora.formats.lora_file import LoraModule

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(method="adalora", rank=6, alpha=6, adalora_total_steps=100))
    assert all(isinstance(t.module, torch.nn.Linear) for t in net.targets)  # convs are left out
    with torch.no_grad():
        for i, t in enumerate(net.targets):
            layer = getattr(pipe, t.component).get_submodule(t.path)
            for n in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, n)["sd_lora"].normal_()
            layer.lora_E["sd_lora"][: i % 5] = 0.0  # what the allocator does when it prunes ranks
    sd = net.kohya_state_dict()
    ranks = {k.rsplit(".", 2)[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert len(set(ranks.values())) > 1
    for t in net.targets[:6]:
        layer = getattr(pipe, t.component).get_submodule(t.path)
        tensors = {k[len(t.kohya_name) + 1:]: v for k, v in sd.items() if k.startswith(t.kohya_name + ".")}
        ours = LoraModule(t.kohya_name, "lora", tensors).delta(layer.get_base_layer().weight.shape)
        torch.testing.assert_close(ours, layer.get_delta_weight("sd_lora").detach(), atol=1e-5, rtol=1e-4)


def test_select_targets_attention_preset_is_a_subset():
    pipe = tiny_pipeline("sd2")
    attn = {t.kohya_name for t in select_targets(pipe, "sd2", "attention")}
    kohya = {t.kohya_name for t in select_targets(pipe, "sd2", "kohya")}
    assert attn < kohya
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj")) for n in attn)
