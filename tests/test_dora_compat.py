"""DoRA files apply the same here, in A1111 1.10 and in ComfyUI (issue #21 item 6).

sd-lora trains and writes DoRA with one magnitude per input column (`dora_scale` (1, in[, 1, 1])), the
form both UIs apply correctly (sd_lora/methods/dora.py says why). The references below are the math
of their sources, written out here (not their code):

A1111 v1.10.x, extensions-builtin/Lora/network.py: finalize_updown (L196-216) scales the LoRA product
by alpha / rank (L211), apply_weight_decompose (L175-194) adds the base weight (L181), divides by the
norm over the output dimension(s) per input column (L182-188), multiplies by dora_scale (L190-192) and
subtracts the base (L193); the result is multiplied by the strength (L216), and networks.py's
network_apply_weights adds it to the weight (`self.weight += updown`).

ComfyUI a125cd84, comfy/weight_adapter/lora.py: calculate_weight takes alpha / rank (L174-177) and the
LoRA product (L194-196) into base.py's weight_decompose (L62-90): W + alpha * product (L64-65), the
axis from dora_scale's shape (L67), for the input axis the per-column norm (L74-81) plus the dtype's
eps (L82), times dora_scale / norm (L84); at strength s != 1, W + s * (that - W) (L85-87).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sd_lora.formats.kohya import save_lora
from sd_lora.formats.read import load_lora
from sd_lora.io import load_safetensors
from sd_lora.network.naming import module_index
from sd_lora.stack import apply_loras, remove_loras
from sd_lora.testing import assert_same_tensors, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # 64 x 32 (out != in)
CONV = "lora_unet_up_blocks_0_resnets_0_conv1"                                   # 64 x 128 x 3 x 3


def _column_norm(w):
    """sqrt of the sum of squares over every dimension but the input one: shape (1, in[, 1, 1])."""
    dims = (0,) + tuple(range(2, w.dim()))
    return w.pow(2).sum(dim=dims, keepdim=True).sqrt()


def a1111(W, up, down, alpha, dora_scale, s):
    rank = down.shape[0]
    updown = (up.flatten(1) @ down.flatten(1)).reshape(W.shape) * (alpha / rank)
    merged = updown + W
    updown = merged * (dora_scale / _column_norm(merged)) - W
    return W + updown * s


def comfyui(W, up, down, alpha, dora_scale, s):
    rank = down.shape[0]
    calc = W + (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
    assert dora_scale.shape[0] != W.shape[0]  # its input-axis branch
    calc = calc * (dora_scale / (_column_norm(calc) + torch.finfo(W.dtype).eps))
    return calc if s == 1.0 else W + s * (calc - W)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def _dora_file(pipe, tmp_path, axis="input", seed=0):
    """A kohya DoRA file for LINEAR and CONV, magnitudes on `axis`; returns (path, base weights, tensors)."""
    g = torch.Generator().manual_seed(seed)
    idx = module_index(pipe, "sd1")
    sd, bases, parts = {}, {}, {}
    for name, rank in ((LINEAR, 4), (CONV, 3)):
        W = idx[name][2].weight.detach().clone()
        down = torch.randn(rank, *W.shape[1:], generator=g) * 0.3
        up = torch.randn(W.shape[0], rank, *[1] * (W.dim() - 2), generator=g) * 0.3
        shape = (1, W.shape[1], *[1] * (W.dim() - 2)) if axis == "input" else (W.shape[0], *[1] * (W.dim() - 1))
        mag = torch.rand(shape, generator=g) + 0.5
        t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(rank) / 2), "dora_scale": mag}
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        bases[name], parts[name] = W, t
    return save_lora(tmp_path / f"dora_{axis}.safetensors", sd, {"ss_network_module": "lycoris.kohya"}, dtype=torch.float32), bases, parts


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_fused_input_axis_dora_is_what_a1111_and_comfyui_compute(pipe, tmp_path, strength):
    path, bases, parts = _dora_file(pipe, tmp_path)
    idx = module_index(pipe, "sd1")
    apply_loras(pipe, [(path, strength)])
    try:
        for name in (LINEAR, CONV):
            t = parts[name]
            args = (bases[name], t["lora_up.weight"], t["lora_down.weight"], float(t["alpha"]), t["dora_scale"], strength)
            ours = idx[name][2].weight.detach()
            assert not torch.allclose(ours, bases[name], atol=1e-3)  # (the file does change the layer)
            torch.testing.assert_close(ours, a1111(*args), rtol=1e-5, atol=1e-6, msg=f"A1111 {name}")
            torch.testing.assert_close(ours, comfyui(*args), rtol=1e-5, atol=1e-6, msg=f"ComfyUI {name}")
    finally:
        remove_loras(pipe)


def test_output_axis_file_is_where_the_uis_differ(pipe, tmp_path):
    """Why we write the input axis: on an (out, 1) scale A1111's formula broadcasts to another weight and
    ComfyUI's output branch (L68-73: the norm of W alone) gives a third; ours follows PEFT."""
    path, bases, parts = _dora_file(pipe, tmp_path, axis="output")
    idx = module_index(pipe, "sd1")
    apply_loras(pipe, [(path, 1.0)])
    try:
        t, W = parts[LINEAR], bases[LINEAR]
        merged = W + t["lora_up.weight"] @ t["lora_down.weight"] * (float(t["alpha"]) / 4)
        peft = merged * t["dora_scale"] / merged.norm(dim=1, keepdim=True)  # PEFT: per output row of W + dW
        ours = idx[LINEAR][2].weight.detach()
        torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-6)
        comfy_out = merged * t["dora_scale"] / (W.norm(dim=1, keepdim=True) + torch.finfo(W.dtype).eps)
        a1111_out = a1111(W, t["lora_up.weight"], t["lora_down.weight"], float(t["alpha"]), t["dora_scale"], 1.0)
        assert (ours - comfy_out).abs().max() > 1e-3 and (ours - a1111_out).abs().max() > 1e-3
    finally:
        remove_loras(pipe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step DoRA run (preset full: Linear, 1x1 and 3x3 convs) and the same run stopped at 2 and resumed."""
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.testing import write_noise_images
    from sd_lora.training import train

    from test_resume import stop_at_step

    root = tmp_path_factory.mktemp("dora_train")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "1_thing", 2)

    def config(out, **kw):
        data = DataConfig(path=str(root / "data"), resolution=64, flip=True)
        return TrainConfig(model=str(root / "model"), output=str(out), data=data, steps=4, batch_size=1, lr=1e-2, seed=3,
                           network={"method": "dora", "preset": "full", "rank": 2, "alpha": 1, "dropout": 0.1}, **kw)

    full = root / "full" / "lora.safetensors"
    train(config(full))
    parts = root / "parts" / "lora.safetensors"
    assert stop_at_step(config(parts), 2).step == 2
    train(config(parts, resume="latest"))
    return root, full, parts


def test_trained_dora_file_is_input_axis_and_resumes_exactly(trained):
    root, full, parts = trained
    a, md = load_safetensors(full)
    assert_same_tensors(a, parts)  # 2 + 2 steps == 4 steps
    scales = {k: v for k, v in a.items() if k.endswith(".dora_scale")}
    downs = {k[: -len(".dora_scale")]: a[k.replace(".dora_scale", ".lora_down.weight")] for k in scales}
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in downs.values())  # 3x3 convs among them
    for k, v in scales.items():
        down = downs[k[: -len(".dora_scale")]]
        assert tuple(v.shape) == (1, down.shape[1], *[1] * (down.dim() - 2)), k  # (1, in[, 1, 1])
    assert json.loads(md["ss_network_args"])["wd_on_output"] == "False"  # LyCORIS's name for this axis
    # the magnitudes trained (they start at the base weight's column norms)
    pipe = tiny_pipeline("sd1")
    idx = module_index(pipe, "sd1")
    moved = [k for k, v in scales.items() if not torch.allclose(v.float().flatten(), idx[k[: -len(".dora_scale")]][2].weight.detach()
                                                                  .transpose(0, 1).flatten(1).norm(dim=1), atol=1e-3)]
    assert len(moved) > len(scales) // 2


def test_fused_trained_file_gives_the_trained_model(trained):
    """The PEFT-free fused pipeline computes what the trained network (PEFT's LoRA layers + our input-axis
    magnitude) computes, on the UNet and the text encoder."""
    from sd_lora.network import NetworkConfig, inject_network

    _, full, _ = trained
    model = tiny_pipeline("sd1")
    net = inject_network(model, NetworkConfig(method="dora", preset="full", rank=2, alpha=1))
    net.load_kohya_state_dict(load_safetensors(full)[0])
    fused = tiny_pipeline("sd1")
    apply_loras(fused, [(full, 1.0)])
    torch.manual_seed(0)
    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        outs = [(p.text_encoder(ids)[0], None) for p in (model, fused)]
        outs = [(h, p.unet(latents, t, h).sample) for (h, _), p in zip(outs, (model, fused))]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)
    plain = tiny_pipeline("sd1")
    with torch.no_grad():
        assert (plain.unet(latents, t, outs[0][0]).sample - outs[0][1]).abs().max() > 1e-4  # (the file matters)


def test_output_axis_writes_warn_and_inspect_says_so(pipe, tmp_path, caplog, capsys):
    from sd_lora.cli import main
    from sd_lora.formats.convert import convert_lora

    with caplog.at_level(logging.WARNING, logger="sd_lora"):
        path_in, _, _ = _dora_file(pipe, tmp_path, axis="input")
    assert "DoRA" not in caplog.text  # our own form: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="sd_lora"):
        path_out, _, _ = _dora_file(pipe, tmp_path, axis="output")
    assert "2 DoRA modules" in caplog.text and "A1111" in caplog.text and "ComfyUI divides by ||W||" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_lora"):
        convert_lora(path_out, tmp_path / "d.safetensors", to="diffusers", dtype="fp32")
    assert "d.safetensors: 2 DoRA modules" in caplog.text
    with pytest.raises(ValueError, match="per input column"):  # no PEFT form for ours: refused, not bent
        convert_lora(path_in, tmp_path / "e.safetensors", to="diffusers", dtype="fp32")
    capsys.readouterr()
    assert main(["inspect", str(path_out)]) == 0
    out = capsys.readouterr().out
    assert "DoRA magnitudes: 0 modules per input column, 2 per output row" in out and "A1111" in out
    assert main(["inspect", str(path_in), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dora_axes"] == {"input": 2, "output": 0} and info["dora_note"] is None


def test_continuing_needs_the_files_axis(pipe, tmp_path):
    """init_lora: an input-axis file continues a default DoRA network; a per-output-row one is refused
    with the setting that fits it (a silent reshape would load row magnitudes as column ones)."""
    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.network.init_lora import InitLoraError

    src = tiny_pipeline("sd1")
    cfg = dict(method="dora", preset="attention", rank=2, alpha=1, train_text_encoder=False)
    net = inject_network(src, NetworkConfig(**cfg))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_lora(tmp_path / "in.safetensors", net, dtype=torch.float32)
    net.remove()
    again = inject_network(src, NetworkConfig(**cfg, init_lora=str(path)))
    assert all(torch.equal(v, again.kohya_state_dict()[k]) for k, v in load_safetensors(path)[0].items())
    again.remove()
    # the same file with every square layer's magnitude laid out per output row
    lora = load_lora(path)
    for m in lora.modules.values():
        m.tensors["dora_scale"] = m.tensors["dora_scale"].reshape(-1, *[1] * (m.tensors["dora_scale"].dim() - 1))
    rows = save_lora(tmp_path / "rows.safetensors", lora, dtype=torch.float32)
    with pytest.raises(InitLoraError, match=r"dora_scale \(\d+, 1\) is per output row.*network.dora_axis = \"output\""):
        inject_network(src, NetworkConfig(**cfg, init_lora=str(rows)))
