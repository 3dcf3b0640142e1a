"""LoRA files: kohya writing, metadata and hashes, reading every format, architecture checks, CLI."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from sd_lora.formats import LoraFormatError, build_training_metadata, load_lora, match_lora, save_lora
from sd_lora.formats.kohya import NonFiniteWeightsError
from sd_lora.network import NetworkConfig, inject_network
from sd_lora.network.naming import module_index
from sd_lora.testing import tiny_pipeline


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    net = inject_network(pipe, NetworkConfig(preset="full", rank=4, alpha=2, conv_rank=2, conv_alpha=1))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return pipe, net


def _meta(**kw):
    return build_training_metadata(arch="sd1", method="lora", rank=4, alpha=2, output_name="shapes", steps=10,
                                   tag_frequency={"10_sks shapes": {"sks": 12, "red circle": 3}}, timestamp=1.7e9, **kw)


def test_round_trip_is_byte_identical(sd1, tmp_path):
    _, net = sd1
    a = save_lora(tmp_path / "a.safetensors", net, _meta())
    lora = load_lora(a)
    b = save_lora(tmp_path / "b.safetensors", lora)
    assert a.read_bytes() == b.read_bytes()
    c = save_lora(tmp_path / "c.safetensors", load_lora(b))
    assert c.read_bytes() == a.read_bytes()
    assert lora.format == "kohya" and lora.arch == "sd1" and len(lora.modules) == len(net.targets)


def test_sshs_hashes_match_kohyas_definition(tmp_path):
    # > 1 MiB of tensors so the legacy hash window (0x100000..0x110000) holds data.
    torch.manual_seed(0)
    sd = {"lora_unet_x_to_q.lora_down.weight": torch.randn(8, 40000), "lora_unet_x_to_q.lora_up.weight": torch.randn(40000, 8),
          "lora_unet_x_to_q.alpha": torch.tensor(8.0)}
    md = {"ss_network_dim": "8", "ss_output_name": "x", "modelspec.title": "not hashed"}
    path = save_lora(tmp_path / "h.safetensors", sd, md)
    meta = load_lora(path).metadata
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    # Legacy: kohya hashes the file as saved with only the ss_* metadata.
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.half() for k, v in sd.items()}, str(ref), metadata={"ss_network_dim": "8", "ss_output_name": "x"})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ref.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert meta["modelspec.title"] == "not hashed"


def test_metadata_is_strings_and_describes_the_model():
    md = _meta(optimizer="AdamW8bit", seed=42, learning_rate=1e-4, training_comment="hi", clip_skip=2)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False" and md["ss_resolution"] == "(512, 512)"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.resolution"] == "512x512"
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.encoder_layer"] == "2"
    assert json.loads(md["ss_tag_frequency"]) == {"10_sks shapes": {"sks": 12, "red circle": 3}}
    xl = build_training_metadata(arch="sdxl", method="loha", rank=8, alpha=4)
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0" and xl["ss_network_module"] == "lycoris.kohya"
    assert json.loads(xl["ss_network_args"]) == {"algo": "loha"}
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and xl["modelspec.resolution"] == "1024x1024"
    v = build_training_metadata(arch="sd2-v")
    assert v["ss_v2"] == "True" and v["ss_v_parameterization"] == "True" and v["modelspec.prediction_type"] == "v"
    with pytest.raises(TypeError, match="unknown metadata"):
        build_training_metadata(arch="sd1", learning_rat=1)


def test_trigger_words_and_dtypes(sd1, tmp_path):
    _, net = sd1
    for dtype, name in ((torch.float16, "F16"), ("bf16", "BF16"), ("fp32", "F32")):
        path = save_lora(tmp_path / f"{name}.safetensors", net, _meta(), dtype=dtype)
        header = json.loads(path.read_bytes()[8: 8 + int.from_bytes(path.read_bytes()[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {name}
    assert load_lora(tmp_path / "F16.safetensors").trigger_words == ["sks", "red circle"]


def test_refuses_nan_inf_overflow_and_keeps_old_file(sd1, tmp_path):
    _, net = sd1
    path = save_lora(tmp_path / "a.safetensors", net, _meta())
    good = path.read_bytes()
    sd = net.kohya_state_dict()
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    for value, match in ((float("nan"), "NaN or inf"), (1e6, "exceed the range")):
        bad = dict(sd)
        bad[key] = sd[key].clone()
        bad[key][0, 0] = value
        with pytest.raises(NonFiniteWeightsError, match=match):
            save_lora(path, bad, {})
        assert path.read_bytes() == good
    save_lora(tmp_path / "big.safetensors", bad, {}, dtype="bf16")  # bf16 holds 1e6
    with pytest.raises(TypeError, match="strings"):
        save_lora(tmp_path / "x.safetensors", sd, {"ss_steps": 10})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "big.safetensors"]  # no temp files left


def _write(path, sd, metadata=None):
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_reads_lycoris_loha_lokr_tucker_and_full(tmp_path):
    pipe = tiny_pipeline("sd1")
    idx = module_index(pipe, "sd1")
    lin = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 -> 64
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32 -> 32, 3x3
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 32 -> 64
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        f"{lin}.hada_w1_a": r(64, 4), f"{lin}.hada_w1_b": r(4, 64), f"{lin}.hada_w2_a": r(64, 4), f"{lin}.hada_w2_b": r(4, 64),
        f"{lin}.alpha": torch.tensor(2.0),
        f"{conv}.hada_t1": r(4, 4, 3, 3), f"{conv}.hada_w1_a": r(4, 32), f"{conv}.hada_w1_b": r(4, 32),
        f"{conv}.hada_t2": r(4, 4, 3, 3), f"{conv}.hada_w2_a": r(4, 32), f"{conv}.hada_w2_b": r(4, 32), f"{conv}.alpha": torch.tensor(4.0),
        f"{te}.lokr_w1": r(4, 2), f"{te}.lokr_w2_a": r(16, 2), f"{te}.lokr_w2_b": r(2, 16), f"{te}.alpha": torch.tensor(1.0),
        "lora_unet_conv_in.diff": r(32, 4, 3, 3), "lora_unet_conv_in.diff_b": r(32),
    }
    lora = load_lora(_write(tmp_path / "ly.safetensors", sd))
    assert lora.format == "lycoris" and {m.kind for m in lora.modules.values()} == {"loha", "lokr", "full"}
    matched = match_lora(lora, pipe)
    assert set(matched) == set(lora.modules)
    # LoHa Tucker by hand: rebuild each factor from its core.
    t1 = torch.einsum("ijkl,ip,jr->prkl", sd[f"{conv}.hada_t1"], sd[f"{conv}.hada_w1_a"], sd[f"{conv}.hada_w1_b"])
    t2 = torch.einsum("ijkl,ip,jr->prkl", sd[f"{conv}.hada_t2"], sd[f"{conv}.hada_w2_a"], sd[f"{conv}.hada_w2_b"])
    torch.testing.assert_close(lora.modules[conv].delta(idx[conv][2].weight.shape), t1 * t2 * 1.0)
    kron = torch.kron(sd[f"{te}.lokr_w1"], sd[f"{te}.lokr_w2_a"] @ sd[f"{te}.lokr_w2_b"]) * 0.5
    torch.testing.assert_close(lora.modules[te].delta((64, 32)), kron)


def test_reads_diffusers_styles_and_dora(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    base = "down_blocks.1.attentions.0.transformer_blocks.0"
    kohya = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0"
    styles = {
        "peft": {f"unet.{base}.attn1.to_q.lora_A.weight": a, f"unet.{base}.attn1.to_q.lora_B.weight": b},
        "old": {f"unet.{base}.attn1.to_q.lora.down.weight": a, f"unet.{base}.attn1.to_q.lora.up.weight": b},
        "proc": {f"unet.{base}.attn1.processor.to_q_lora.down.weight": a, f"unet.{base}.attn1.processor.to_q_lora.up.weight": b},
    }
    for style, sd in styles.items():
        lora = load_lora(_write(tmp_path / f"{style}.safetensors", sd))
        assert lora.format == "diffusers" and list(lora.modules) == [f"{kohya}_attn1_to_q"]
        torch.testing.assert_close(lora.modules[f"{kohya}_attn1_to_q"].delta((64, 64)), b @ a)
    with pytest.raises(LoraFormatError, match="not part of any LoRA format"):
        load_lora(_write(tmp_path / "bad.safetensors", {**styles["peft"], "something_else.weight": a}))
    lora = load_lora(_write(tmp_path / "bad2.safetensors", {**styles["peft"], "something_else.weight": a}), strict=False)
    assert len(lora.modules) == 1
    with pytest.raises(LoraFormatError, match="incomplete"):
        load_lora(_write(tmp_path / "half.safetensors", {f"unet.{base}.attn1.to_q.lora_A.weight": a}))
    # DoRA in kohya layout: dora_scale per output channel.
    m = torch.rand(64, 1, generator=g) + 0.5
    lora = load_lora(_write(tmp_path / "dora.safetensors", {f"{kohya}_attn1_to_q.lora_down.weight": a, f"{kohya}_attn1_to_q.lora_up.weight": b,
                                                              f"{kohya}_attn1_to_q.alpha": torch.tensor(4.0), f"{kohya}_attn1_to_q.dora_scale": m}))
    w = torch.randn(64, 64, generator=g)
    new = w + lora.modules[f"{kohya}_attn1_to_q"].delta((64, 64), base_weight=w)
    torch.testing.assert_close(new.norm(dim=1), m.flatten())  # DoRA: rows renormalised to the magnitude


def test_architecture_detection_and_wrong_architecture_error(sd1, tmp_path):
    _, net = sd1
    path = save_lora(tmp_path / "sd1.safetensors", net, _meta())
    with pytest.raises(LoraFormatError, match=r"Stable Diffusion 1.x \(sd1\).*Stable Diffusion XL"):
        match_lora(load_lora(path), tiny_pipeline("sdxl"))
    # Shapes alone: cross-attention width 2048 -> SDXL, 768 -> SD1; lora_te1_ -> SDXL.
    for width, arch in ((2048, "sdxl"), (768, "sd1"), (1024, "sd2")):
        sd = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, width),
              "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 2)}
        assert load_lora(_write(tmp_path / f"{width}.safetensors", sd)).arch == arch
    sd = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}
    assert load_lora(_write(tmp_path / "te1.safetensors", sd)).arch == "sdxl"
    assert load_lora(_write(tmp_path / "v.safetensors", sd, {"ss_base_model_version": "sd_v2", "ss_v_parameterization": "True"})).arch == "sdxl"


def test_match_reports_unmatched_and_misshaped_modules(sd1, tmp_path):
    pipe, net = sd1
    sd = net.kohya_state_dict()
    sd["lora_unet_nowhere_to_q.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_nowhere_to_q.lora_up.weight"] = torch.zeros(8, 4)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    sd[f"{key}.lora_down.weight"] = torch.zeros(4, 31)
    lora = load_lora(save_lora(tmp_path / "x.safetensors", sd, _meta()))
    with pytest.raises(LoraFormatError, match=r"1 modules have no matching layer.*lora_unet_nowhere_to_q.*1 modules do not fit"):
        match_lora(lora, pipe)
    matched = match_lora(lora, pipe, strict=False)
    assert len(matched) == len(lora.modules) - 2


def test_sai_compvis_names_resolve_like_diffusers_names(tmp_path):
    pipe = tiny_pipeline("sd1")
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": a,
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": b}
    matched = match_lora(load_lora(_write(tmp_path / "sai.safetensors", sd, {"ss_base_model_version": "sd_v1"})), pipe)
    assert [v[1] for v in matched.values()] == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


def test_cli_inspect_and_convert(sd1, tmp_path, capsys):
    from sd_lora.cli import main

    _, net = sd1
    path = save_lora(tmp_path / "a.safetensors", net, _meta())
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["architecture"] == "sd1" and info["modules"] == len(net.targets)
    assert info["ranks"] == {"2": 26, "4": 103} and info["trigger_words"][0] == "sks" and info["nan_or_inf_modules"] == []
    # Civitai's hashes: AutoV2 = the file's SHA-256, 10 hex; AutoV3 = the tensor bytes' SHA-256, 12 hex
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert info["hashes"] == {"sha256": hashlib.sha256(data).hexdigest(), "autov2": hashlib.sha256(data).hexdigest()[:10],
                              "autov3": hashlib.sha256(data[header:]).hexdigest()[:12]}
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "trigger words: sks, red circle" in shown and f"AutoV3 {info['hashes']['autov3']}" in shown
    for to in ("diffusers", "peft", "kohya"):
        out = tmp_path / (f"{to}.safetensors" if to != "peft" else "peft")
        assert main(["convert", str(path), "--to", to, "--out", str(out), "--dtype", "fp32"]) == 0
        back = load_lora(out)
        assert back.format == to and set(back.modules) == set(load_lora(path).modules)
    assert main(["convert", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 1


def test_trigger_words_are_instance_tokens_and_short_frequent_tags_not_sentences():
    from sd_lora.formats.metadata import trigger_words

    def words(freq, **extra):
        return trigger_words({"ss_tag_frequency": json.dumps(freq), **{k: json.dumps(v) for k, v in extra.items()}})

    # Tag-style captions (WD14 / booru): the folder's name is a trained tag; a stray sentence is not a trigger.
    tags = {"5_mychar": {"mychar": 10, "1girl": 10, "long hair": 6, "smile": 4, "looking at viewer": 2,
                         "a girl with long hair smiling at the camera": 1}}
    assert words(tags) == ["mychar", "1girl", "long hair", "smile", "looking at viewer"]
    # Sentence-style captions (BLIP / Florence): no sentence is a trigger; the instance token
    # (`10_sks dog`, which the sentences contain) is.
    sentences = {"10_sks dog": {"a photo of sks dog on the grass": 1, "sks dog running through a park at noon": 1,
                                "A close-up of SKS DOG's face in the snow": 1}}
    assert words(sentences) == ["sks dog"]
    # A folder name the captions never mention was not trained: not a trigger (kohya keys are the folder names).
    assert words({"10_images": {"inkstyle": 3, "monochrome": 1}}) == ["inkstyle", "monochrome"]
    # Regularization folders (kohya counts their tags too) are left out.
    with_reg = {"10_sks dog": {"sks dog": 5}, "1_dog": {"dog": 200, "a dog": 50}}
    assert words(with_reg, ss_reg_dataset_dirs={"1_dog": {"n_repeats": 1, "img_count": 200}}) == ["sks dog"]
    # Case and spacing repeats collapse; damaged metadata gives no words instead of an error.
    assert words({"3_Ink Style": {"ink style": 3, "Ink  Style": 1}}) == ["Ink Style"]
    assert trigger_words({"ss_tag_frequency": "[1, 2"}) == [] and trigger_words({}) == []
    assert trigger_words({"ss_tag_frequency": '{"1_x": {"x": Infinity, "y": NaN, "z": 2}}'}) == ["x", "z"]
