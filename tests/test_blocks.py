"""Issue #18 items 5 and 6: kohya's block numbering, block-wise dims / alphas / LR weights, and
continuing from a LoRA file (network.init_lora)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sd_lora.formats import load_lora, match_lora, save_lora
from sd_lora.io import load_safetensors
from sd_lora.network import NetworkConfig, inject_network
from sd_lora.network.blocks import block_index, block_label, block_plan, lr_curve, num_blocks
from sd_lora.network.blocks import network_args as block_network_args
from sd_lora.network.presets import select_targets
from sd_lora.testing import assert_same_tensors, full_size_unet, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- numbering: hand-written from kohya's get_block_index (networks/lora.py @48d368f) -----------------

SD1_EXPECTED = {  # diffusers-layout names: down 1 + 3i + j (samplers j = 2), mid 12, up 13 + 3i + j
    "lora_unet_down_blocks_0_attentions_0_proj_in": 1,
    "lora_unet_down_blocks_0_resnets_1_conv1": 2,
    "lora_unet_down_blocks_0_downsamplers_0_conv": 3,
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": 4,
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k": 8,
    "lora_unet_down_blocks_3_resnets_1_conv2": 11,
    "lora_unet_mid_block_attentions_0_proj_out": 12,
    "lora_unet_mid_block_resnets_1_conv1": 12,
    "lora_unet_up_blocks_0_resnets_0_conv1": 13,
    "lora_unet_up_blocks_0_resnets_2_conv_shortcut": 15,
    "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
    "lora_unet_up_blocks_1_attentions_0_proj_in": 16,
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": 24,
}
SDXL_EXPECTED = {  # SGM names: input_blocks.n -> 1 + n, middle_block.n -> 10 + n, output_blocks.n -> 13 + n
    "lora_unet_input_blocks_1_0_in_layers_2": 2,
    "lora_unet_input_blocks_3_0_op": 4,
    "lora_unet_input_blocks_4_1_proj_in": 5,
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_q": 9,
    "lora_unet_middle_block_0_in_layers_2": 10,
    "lora_unet_middle_block_1_proj_in": 11,
    "lora_unet_middle_block_2_out_layers_3": 12,
    "lora_unet_output_blocks_0_1_proj_in": 13,
    "lora_unet_output_blocks_2_2_conv": 15,
    "lora_unet_output_blocks_8_0_skip_connection": 21,
}


@pytest.mark.parametrize("arch,expected,covered", [("sd1", SD1_EXPECTED, set(range(1, 25))),
                                                   ("sdxl", SDXL_EXPECTED, set(range(2, 22)))])
def test_block_numbering_is_kohyas_on_full_size_unets(arch, expected, covered):
    targets = select_targets({"unet": full_size_unet(arch)}, arch, "full")  # meta device: structure only
    index = {t.kohya_name: t.block_index for t in targets}
    assert {name: index[name] for name in expected} == expected
    assert set(index.values()) == covered  # SD1 IN00 (conv_in) and SDXL 0/1/22 (embeddings, conv_in, out) have no module
    assert num_blocks(arch) == (25 if arch == "sd1" else 23)
    family = {t.kohya_name: t.block for t in targets}
    assert family[next(iter(expected))] == "down" and family[list(expected)[-1]] == "up"


def test_block_labels_and_names_outside_the_blocks():
    assert [block_label(i, "sd1") for i in (0, 11, 12, 13, 24)] == ["IN00", "IN11", "MID", "OUT00", "OUT11"]
    assert [block_label(i, "sdxl") for i in (0, 1, 9, 10, 12, 13, 21, 22)] == \
        ["EMB", "IN00", "IN08", "MID00", "MID02", "OUT00", "OUT08", "END"]
    assert block_index("lora_unet_time_embed_0", "sdxl") == 0 and block_index("lora_unet_out_2", "sdxl") == 22
    assert block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", "sd1") is None


def test_lr_curves_and_padding_follow_kohya():
    # kohya get_block_lr_weight: sine = sin(pi/2 * i/(n-1)), cosine the same reversed, "+x" added
    assert lr_curve("sine", 12) == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in range(12)])
    assert lr_curve("cosine+.25", 9) == pytest.approx([math.sin(math.pi * i / 8 / 2) + 0.25 for i in reversed(range(9))])
    assert lr_curve("reverse_linear", 3) == [1.0, 0.5, 0.0]
    plan = block_plan(NetworkConfig(rank=8, down_lr_weight="0,0.5", mid_lr_weight=2, up_lr_weight="zeros+0.2",
                                    block_lr_zero_threshold=0.3), "sd1")
    # down: given values then 1.0; the threshold zeroes 0.2 (and the given 0): those blocks get no modules
    assert plan.lr_weights == [0.0, 0.5] + [1.0] * 10 + [2.0] + [0.0] * 12
    assert plan.dims == [0, 8] + [8] * 10 + [8] + [0] * 12
    sdxl = block_plan(NetworkConfig(mid_lr_weight="1,0.5,1"), "sdxl")
    assert sdxl.lr_weights == [1.0] * 11 + [0.5] + [1.0] * 11  # 0 (embeddings) and 22 (out) stay 1


def test_validation_names_the_key_and_the_block_count():
    errors = NetworkConfig(block_dims="1,2,3", conv_block_dims=[1] * 25, down_lr_weight="sin", mid_lr_weight="1,2,3,4",
                           block_ranks={"up": 4}, block_alphas=[1.0] * 25).validate()
    text = "\n".join(errors)
    assert "block_dims: has 3 values; give one per UNet block: 25 for SD1/SD2, 23 for SDXL" in text
    assert "conv_block_dims/conv_block_alphas: only 3x3 convs" in text and "preset = \"full\"" in text
    assert "down_lr_weight: 'sin' is not a number" in text and "mid_lr_weight: has 4 values" in text
    assert "block_ranks/block_dims: both set" in text
    assert len(errors) == 5
    with pytest.raises(ValueError, match="network.block_dims: has 23 values; a sd1 UNet has 25 blocks"):
        inject_network(tiny_pipeline("sd1"), NetworkConfig(block_dims=[4] * 23))


# ---- per-block dims in a file that diffusers and our reader load ---------------------------------------

def _ranks(sd):
    return {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")}


def test_block_dims_give_per_module_ranks_that_load_in_diffusers(tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from test_diffusers_interop import _apply_ours, _assert_same_model

    dims = [2 + i % 3 for i in range(25)]
    dims[4] = 0  # down_blocks.1 resnets.0 + attentions.0 of the tiny UNet: left out
    conv = [3] * 25
    conv[17] = 0  # up_blocks.1.resnets.1's 3x3 convs only
    # One alpha: diffusers 0.42 drops a kohya file's per-module alphas of attention layers (its
    # _get_alpha_name keeps `processor.to_k_lora...` in the name, so they match no module), so
    # per-block alphas are checked in our reader only (test_block_settings_go_into_ss_network_args...).
    alphas = [2.0] * 25
    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(preset="full", rank=4, alpha=2, block_dims=",".join(map(str, dims)),
                                             conv_block_dims=conv, conv_rank=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_lora(tmp_path / "blocks.safetensors", net, dtype=torch.float32)
    sd, _ = load_safetensors(path)
    ranks = _ranks(sd)
    unet = {n: r for n, r in ranks.items() if n.startswith("lora_unet_")}
    conv3x3 = {n for n in unet if sd[f"{n}.lora_down.weight"].dim() == 4 and sd[f"{n}.lora_down.weight"].shape[-1] == 3}
    assert not any(block_index(n, "sd1") == 4 for n in set(unet) - conv3x3)  # its 3x3 convs follow conv_block_dims
    assert "lora_unet_up_blocks_1_resnets_1_conv1" not in unet and "lora_unet_up_blocks_1_resnets_1_time_emb_proj" in unet
    for name, rank in unet.items():
        assert rank == (conv if name in conv3x3 else dims)[block_index(name, "sd1")], name
        if name not in conv3x3:
            assert float(sd[f"{name}.alpha"]) == alphas[block_index(name, "sd1")], name
    assert len(set(unet.values())) >= 3 and ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 4
    assert len(match_lora(load_lora(path), tiny_pipeline("sd1"))) == len(net.targets)  # our kohya reader
    ref = tiny_pipeline("sd1")
    ref.load_lora_weights(str(path), adapter_name="blocks")
    assert sum(isinstance(m, BaseTunerLayer) for c in ("unet", "text_encoder") for m in getattr(ref, c).modules()) == len(net.targets)
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora_weights()
    _assert_same_model(_apply_ours(tiny_pipeline("sd1"), load_lora(path)), ref)


def test_block_settings_go_into_ss_network_args_and_families_are_the_same_rule(tmp_path):
    from sd_lora.formats.metadata import build_training_metadata

    pipe = tiny_pipeline("sdxl")
    families = inject_network(pipe, NetworkConfig(rank=4, alpha=2, block_ranks={"down": 3, "up": 5}, block_alphas={"up": 7}))
    fam_sd = families.kohya_state_dict()
    args = json.loads(build_training_metadata("sdxl", **families.metadata_fields())["ss_network_args"])
    families.remove()
    # the families are these per-block lists (SDXL: 1-9 down, 10-12 mid, 13-21 up); the same lists as
    # kohya's block_dims / block_alphas build the same network
    assert args["block_dims"] == ",".join(["4"] + ["3"] * 9 + ["4"] * 3 + ["5"] * 9 + ["4"])
    assert args["block_alphas"] == ",".join(["2"] + ["2"] * 12 + ["7"] * 9 + ["2"])
    per_block = inject_network(pipe, NetworkConfig(rank=4, alpha=2, block_dims=args["block_dims"], block_alphas=args["block_alphas"],
                                                   down_lr_weight="sine"))
    assert {k: tuple(v.shape) for k, v in per_block.kohya_state_dict().items()} == {k: tuple(v.shape) for k, v in fam_sd.items()}
    # per-module alphas: each module's alpha in the file, read back by our reader
    lora = load_lora(save_lora(tmp_path / "alphas.safetensors", per_block, dtype=torch.float32))
    assert {n: m.alpha for n, m in lora.modules.items() if n.startswith("lora_unet_output")} == \
        {n: 7.0 for n in lora.modules if n.startswith("lora_unet_output")}
    assert lora.modules["lora_unet_middle_block_1_proj_in"].alpha == 2.0
    args2 = json.loads(build_training_metadata("sdxl", **per_block.metadata_fields())["ss_network_args"])
    assert args2["down_lr_weight"] == "sine" and args2["block_lr_zero_threshold"] == "0"
    assert block_network_args(NetworkConfig(), block_plan(NetworkConfig(), "sd1"), True) == {}  # nothing without block settings


# ---- LR weights per parameter group ----------------------------------------------------------------

def test_lr_weights_split_the_unet_group_per_block():
    from sd_lora.training.optim import param_groups

    net = inject_network(tiny_pipeline("sd1"), NetworkConfig(preset="full", rank=4, down_lr_weight="0,0,0,0,0.5",
                                                             mid_lr_weight=2.0, up_lr_weight="0.25"))
    groups = param_groups(net.unet_parameters(), net.text_encoder_parameters(), 1e-3, 5e-4, lr_weights=net.lr_weights())
    lrs = {g["name"]: g["lr"] for g in groups}
    # blocks 1-3 at weight 0 have no modules; IN04 0.5, IN05 padded 1.0, MID 2, OUT00 0.25, OUT01-02 1.0
    assert lrs == pytest.approx({"unet_IN04": 5e-4, "unet_IN05": 1e-3, "unet_MID": 2e-3, "unet_OUT00": 2.5e-4,
                                 "unet_OUT01": 1e-3, "unet_OUT02": 1e-3, "unet_OUT03": 1e-3, "unet_OUT04": 1e-3,
                                 "unet_OUT05": 1e-3, "text_encoder": 5e-4})
    assert not any(t.block_index in (1, 2, 3) for t in net.targets)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in net.parameters())  # every parameter exactly once
    assert net.lr_weights() is not None and inject_network(tiny_pipeline("sd1"), NetworkConfig(rank=4)).lr_weights() is None
    plain = param_groups(net.unet_parameters(), [], 1e-3, 0.0)
    assert [g["name"] for g in plain] == ["unet"]
    # with LoRA+ too, each block's up matrices get their own group; the step events show the run's rate
    from types import SimpleNamespace

    from sd_lora.training.optim import applied_lr

    up = [p for n, p in net.named_parameters() if "lora_B" in n.split(".")]
    both = {g["name"]: g["lr"] for g in param_groups(net.unet_parameters(), [], 1e-3, 0.0, up, 4.0, lr_weights=net.lr_weights())}
    assert both["unet_IN04"] == pytest.approx(5e-4) and both["unet_IN04_plus"] == pytest.approx(2e-3)
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    assert applied_lr(optimizer, SimpleNamespace(get_last_lr=lambda: [g["lr"] for g in optimizer.param_groups])) == pytest.approx(1e-3)


# ---- continue from a LoRA file -------------------------------------------------------------------

def _random_file(tmp_path, name="init.safetensors", arch="sd1", **network):
    torch.manual_seed(7)
    net = inject_network(tiny_pipeline(arch), NetworkConfig(**network))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from sd_lora.formats.metadata import build_training_metadata

    return save_lora(tmp_path / name, net, metadata=build_training_metadata(arch, **net.metadata_fields()))


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_continuing_from_a_file_saves_the_same_tensors(tmp_path, method):
    settings = dict(method=method, preset="full", rank=4, alpha=2, conv_rank=2, conv_alpha=1, block_ranks={"up": 3})
    path = _random_file(tmp_path, **settings)
    net = inject_network(tiny_pipeline("sd1"), NetworkConfig(**settings, init_lora=str(path)))
    again = save_lora(tmp_path / "again.safetensors", net, metadata={})
    assert_same_tensors(path, again)


def test_training_with_init_lora_starts_from_the_file(tmp_path, tiny_models):
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.fields import recorded_settings
    from sd_lora.training import train

    from test_train import make_images

    path = _random_file(tmp_path, preset="attention", rank=4, alpha=4)
    make_images(tmp_path / "data" / "1_circle", n=1)
    out = tmp_path / "continued.safetensors"
    lr = 1e-4
    train(TrainConfig(model=tiny_models["sd1"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "alpha": 4, "preset": "attention", "init_lora": str(path)}, steps=1, seed=1, lr=lr))
    start, (end, md) = load_safetensors(path)[0], load_safetensors(out)
    assert start.keys() == end.keys()
    # one AdamW step moves a weight by about lr at most: the run started from the file, not from a fresh init
    # (whose lora_up is all zero and lora_down random)
    worst = max((end[k].float() - start[k].float()).abs().max().item() for k in start)
    assert 0 < worst < 3 * lr
    assert recorded_settings(md)["network.init_lora"] == "init.safetensors"


def test_a_file_that_does_not_fit_names_the_module_and_the_setting(tmp_path):
    from sd_lora.network.init_lora import InitLoraError

    path = _random_file(tmp_path, preset="kohya", rank=4, alpha=2)

    from sd_lora.network.init_lora import load_init_lora

    pipes = {"sd1": tiny_pipeline("sd1"), "sdxl": tiny_pipeline("sdxl")}

    def fails(match, arch="sd1", **network):
        net = inject_network(pipes[arch], NetworkConfig(**{"preset": "kohya", "rank": 4, "alpha": 2, **network}))
        try:
            with pytest.raises(InitLoraError, match=match):
                load_init_lora(net, str(path))  # what inject_network does with init_lora set
        finally:
            net.remove()

    fails(r"lora_unet_\w+ has rank 4 in the file and 8 in this network; set network.rank to 4 \(or block IN04's entry of block_dims\)", rank=8)
    fails(r"has alpha 2 in the file and 4 in this network; set network.alpha \(or block_alphas\) to 2", alpha=4)
    fails(r"is a lora module and network.method is 'loha'; set network.method = \"lora\"", method="loha")
    fails(r"is a lora module and network.method is 'dora'; set network.method = \"lora\"", method="dora")
    fails(r"has no module for lora_unet_down_blocks_0_resnets_0_conv1 .*use the preset", preset="full")
    fails(r"has a module for lora_te_text_model_\w+, which this network does not adapt", train_text_encoder=False)
    fails(r"has rank 4 in the file and 3 in this network; set block OUT00's rank in network.block_dims / block_ranks to 4",
          block_ranks={"up": 3})
    fails(r"Stable Diffusion 1.x .* but the pipeline is .*XL", arch="sdxl")
    with pytest.raises(ValueError, match="adalora cannot start from a LoRA file"):
        NetworkConfig(method="adalora", init_lora=str(path)).check()
