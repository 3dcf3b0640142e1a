"""LoRA tools on tiny models: merge (exact / SVD / into a checkpoint), resize, extract, convert, CLI."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from sd_lora.cli import main
from sd_lora.formats import load_lora
from sd_lora.formats.metadata import data_sha256
from sd_lora.models import load_base
from sd_lora.network.naming import module_index
from sd_lora.stack import LoraSpec, apply_loras, remove_loras
from sd_lora.testing import tiny_pipeline, write_random_lora
from sd_lora.tools import convert_lora, extract_lora, merge_into_model, merge_loras, resize_lora
from sd_lora.tools.svd import choose_rank

def write_lora(path, pipe, arch="sd1", seed=0, rank=4, alpha=2.0, conv=False, kind="lora", metadata=None):
    """A random kohya LoRA / LoCon (kind="lora") or LyCORIS LoHa (kind="loha") file for `pipe`, fp32."""
    return write_random_lora(path, pipe, arch, seed, metadata=metadata, rank=rank, alpha=alpha, conv=conv, kind=kind)


def weights(pipe):
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            out.update({f"{comp}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def applied_weights(pipe, stack):
    apply_loras(pipe, stack)
    try:
        return weights(pipe)
    finally:
        remove_loras(pipe)


def rel_diff(a, b, base):
    """||a - b|| / ||b - base|| over all tensors."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float((b[k].double() - base[k].double()).pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def file_deltas(lora, pipe, arch="sd1"):
    index = module_index(pipe, arch)
    return {n: m.delta(index[n][2].weight.shape) for n, m in lora.modules.items()}


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return write_lora(d / "a.safetensors", sd1, seed=0), write_lora(d / "b.safetensors", sd1, seed=1, conv=True, alpha=4.0)


STACK_WEIGHTS = ((0.7, None), (0.3, -0.5))


def _stack(files):
    return [LoraSpec(f, w, te) for f, (w, te) in zip(files, STACK_WEIGHTS)]


def test_exact_merge_equals_applying_the_stack(sd1, files, tmp_path):
    base = weights(sd1)
    want = applied_weights(sd1, _stack(files))
    report = merge_loras(_stack(files), tmp_path / "ab.safetensors", dtype="fp32")
    assert report.rel_error == 0 and report.path.endswith("ab.safetensors")
    got = applied_weights(sd1, [tmp_path / "ab.safetensors"])
    assert rel_diff(got, want, base) < 1e-6
    # Shared modules carry both ranks (4 + 4); modules only b has (the LoCon convs) keep rank 4.
    merged = load_lora(tmp_path / "ab.safetensors")
    assert {m.rank for m in merged.modules.values()} == {4, 8}
    md = merged.metadata
    assert md["ss_network_dim"] == "Dynamic" and md["sshs_model_hash"] == data_sha256(tmp_path / "ab.safetensors")
    sources = json.loads(md["sd_lora_merged_from"])
    assert [s["file"] for s in sources] == ["a.safetensors", "b.safetensors"]
    assert sources[1]["te_weight"] == -0.5 and sources[0]["sshs_model_hash"] == data_sha256(files[0])


def test_svd_merge_reports_its_error_and_it_falls_with_rank(sd1, files, tmp_path):
    base = weights(sd1)
    want = applied_weights(sd1, _stack(files))
    errors = []
    for rank in (1, 3, 8):
        report = merge_loras(_stack(files), tmp_path / f"r{rank}.safetensors", rank=rank, dtype="fp32")
        got = applied_weights(sd1, [tmp_path / f"r{rank}.safetensors"])
        measured = rel_diff(got, want, base)
        assert abs(measured - report.rel_error) < 1e-4, (rank, measured, report.rel_error)
        assert load_lora(tmp_path / f"r{rank}.safetensors").metadata["ss_network_dim"] == str(min(rank, 8)) or rank == 8
        errors.append(report.rel_error)
    assert errors[0] > errors[1] > 0.05 and errors[2] < 1e-5  # rank 8 = 4 + 4 holds it all
    per_module = {m.name: m for m in report.modules}
    assert all(0 <= m.rel_error <= 1 and abs(m.kept_energy + m.rel_error ** 2 - 1) < 1e-9 for m in per_module.values())


def test_resize_error_kohya_alpha_and_size(sd1, files, tmp_path):
    src = files[0]
    report = resize_lora(src, tmp_path / "r2.safetensors", rank=2)
    small, orig = load_lora(tmp_path / "r2.safetensors"), load_lora(src)
    assert {m.rank for m in small.modules.values()} == {2}
    # kohya keeps the scale: alpha_new / 2 == alpha_old / 4.
    assert all(abs(small.modules[n].scale - orig.modules[n].scale) < 1e-3 for n in orig.modules)
    true, approx = file_deltas(orig, sd1), file_deltas(small, sd1)
    for m in report.modules:
        measured = float((approx[m.name] - true[m.name]).norm() / true[m.name].norm())
        assert abs(measured - m.rel_error) < 2e-3  # fp16 file
    assert 0.2 < report.rel_error < 0.9 and report.bytes_after < 0.7 * report.bytes_before
    md = small.metadata
    assert md["ss_network_dim"] == "2" and md["sd_lora_resized_from"] == "a.safetensors"
    assert md["sd_lora_resized_from_hash"] == data_sha256(src) and md["sshs_model_hash"] == data_sha256(tmp_path / "r2.safetensors")


def test_resize_to_full_rank_reproduces_the_deltas(sd1, files, tmp_path):
    # LoCon (linear + 3x3 conv) through the SVD path (dynamic, nothing dropped) ...
    report = resize_lora(files[1], tmp_path / "full.safetensors", dynamic="sv_fro", param=1.0, dtype="fp32")
    assert report.rel_error < 1e-6
    a, b = file_deltas(load_lora(files[1]), sd1), file_deltas(load_lora(tmp_path / "full.safetensors"), sd1)
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    # ... and a LoHa (rank 4 x rank 4 = up to rank 16) becomes a LoRA with the same deltas at full rank.
    loha = write_lora(tmp_path / "loha.safetensors", sd1, kind="loha", seed=3)
    report = resize_lora(loha, tmp_path / "loha-lora.safetensors", rank=16, dtype="fp32")
    assert report.rel_error < 1e-5 and any("became plain LoRA" in n for n in report.notes)
    a, b = file_deltas(load_lora(loha), sd1), file_deltas(load_lora(tmp_path / "loha-lora.safetensors"), sd1)
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)


def test_dynamic_rank_rules_match_kohya():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, None, "sv_ratio", 4) == 2  # keeps S > 10 / 4
    assert choose_rank(s, None, "sv_cumulative", 0.9) == 3  # cumulative 0.54, 0.81, 0.92
    assert choose_rank(s, None, "sv_fro", 0.9) == 2  # sqrt energy 0.876, 0.980
    assert choose_rank(s, 1, "sv_cumulative", 0.9) == 1  # rank caps a dynamic choice
    assert choose_rank(torch.zeros(3), 2) == 1  # an all-zero delta keeps rank 1
    with pytest.raises(ValueError, match="param must be in"):
        resize_lora("unused.safetensors", dynamic="sv_fro", param=2.0)  # checked before any file is read


def test_extract_recovers_a_fused_lora(sd1, files, tmp_path):
    tuned = tiny_pipeline("sd1")
    apply_loras(tuned, [(files[0], 0.8)])  # attention LoRA, UNet + text encoder
    report = extract_lora(sd1, tuned, tmp_path / "x.safetensors", rank=4, dtype="fp32")
    assert report.rel_error < 1e-5 and report.untargeted < 1e-3
    want = {n: d * 0.8 for n, d in file_deltas(load_lora(files[0]), sd1).items()}
    got = file_deltas(load_lora(tmp_path / "x.safetensors"), sd1)
    assert set(got) == set(want)  # unchanged kohya-preset modules (MLPs, proj_in/out) are left out
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)
    # A lower rank: the error left in the file is the one reported, per module.
    report = extract_lora(sd1, tuned, None, rank=2)
    got = file_deltas(report.lora, sd1)
    for m in report.modules:
        measured = float((got[m.name] - want[m.name]).norm() / want[m.name].norm())
        assert abs(measured - m.rel_error) < 1e-4
    assert 0.2 < report.rel_error < 0.9


def test_extract_all_targets_gets_locon_convs_and_reports_untargeted(sd1, files, tmp_path):
    tuned = tiny_pipeline("sd1")
    apply_loras(tuned, [files[1]])  # LoCon: 3x3 ResNet convs too
    with torch.no_grad():
        tuned.unet.conv_in.bias.add_(0.5)  # a change no LoRA module can carry
    kohya = extract_lora(sd1, tuned, None, rank=4)
    assert not any("resnets" in m.name for m in kohya.modules)
    report = extract_lora(sd1, tuned, None, rank=4, targets="all")
    want = file_deltas(load_lora(files[1]), sd1)
    got = file_deltas(report.lora, sd1)
    assert set(want) <= set(got) and report.rel_error < 1e-5
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)
    assert 0.01 < report.untargeted < 1 and "outside the targeted weights" in report.notes[0]


def test_convert_round_trips_preserve_deltas(sd1, files, tmp_path):
    src = load_lora(files[1])
    for fmt, name in (("diffusers", "d.safetensors"), ("peft", "peft_dir")):
        convert_lora(files[1], tmp_path / name, to=fmt, dtype="fp32")
        back = convert_lora(tmp_path / name, tmp_path / f"{fmt}-back.safetensors", to="kohya", dtype="fp32")
        a, b = file_deltas(src, sd1), file_deltas(load_lora(back), sd1)
        assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), fmt


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merged_checkpoint_loads_and_renders_like_the_stack(arch, tmp_path):
    """Single file and diffusers folder for SD1; the single file for SDXL (SGM names, two encoders)."""
    pipe = tiny_pipeline(arch)
    pipe.save_pretrained(tmp_path / "base")
    lora = write_lora(tmp_path / "l.safetensors", pipe, arch=arch, conv=True)
    stack = [LoraSpec(lora, 0.8, 0.5)]
    before = weights(pipe)
    one_file = merge_into_model(tmp_path / "base", stack, tmp_path / "merged.safetensors")
    loaded = [load_base(one_file, config_from=tmp_path / "base")]
    if arch == "sd1":
        folder = merge_into_model(pipe, stack, tmp_path / "merged-diffusers")
        assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())  # the pipeline passed in is restored
        loaded.append(load_base(folder))
        md = json.loads((folder / "sd_lora_merge.json").read_text())
        assert json.loads(md["sd_lora_merged_loras"])[0]["weight"] == 0.8
        # Permissions under the test's umask, not mkdtemp's 0700 / safetensors' 0600.
        umask = os.umask(0)
        os.umask(umask)
        for item in [folder, *folder.rglob("*"), one_file]:
            assert stat.S_IMODE(item.stat().st_mode) == (0o777 if item.is_dir() else 0o666) & ~umask, item

    def render(p):
        return p("a cat", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]

    want_w = applied_weights(pipe, stack)
    if arch == "sd1":
        apply_loras(pipe, stack)
        want = render(pipe)
        remove_loras(pipe)
    for p in loaded:
        got_w = weights(p)
        assert set(got_w) == set(want_w) and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
        if arch == "sd1":  # equal weights give equal images; render once per layout to show it end to end
            assert (render(p) == want).all()


def test_merge_refusals(sd1, files, tmp_path):
    xl = tiny_pipeline("sdxl")
    xl_file = write_lora(tmp_path / "xl.safetensors", xl, arch="sdxl")
    with pytest.raises(ValueError, match="different model families"):
        merge_loras([files[0], xl_file], tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="block weights"):
        merge_loras([LoraSpec(files[0], 1.0, block_weights={"IN04": 0.5})], tmp_path / "bad.safetensors")
    # DoRA's effect is not linear in its weight: refused at 0.5, copied exactly at 1.0.
    src = load_lora(files[0])
    name = next(iter(src.modules))
    src.modules[name].tensors["dora_scale"] = torch.ones(src.modules[name].tensors["lora_up.weight"].shape[0], 1)
    with pytest.raises(ValueError, match="DoRA"):
        merge_loras([(src, 0.5)], None)
    assert merge_loras([(src, 1.0)], None).lora.modules[name].has_dora
    assert not (tmp_path / "bad.safetensors").exists()


def test_cli_merge_resize_extract(sd1, files, tmp_path, capsys):
    assert main(["merge", "--lora", f"{files[0]}:0.5", "--lora", str(files[1]).removesuffix(".safetensors"),
                 "--out", str(tmp_path / "m.safetensors"), "--rank", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rel_error"] > 0 and out["modules"][0]["new_rank"] == 2 and out["bytes_after"] > 0
    assert main(["resize", str(tmp_path / "m.safetensors"), "--dynamic", "sv_ratio", "--param", "2"]) == 0
    text = capsys.readouterr().out
    assert "relative delta error" in text and (tmp_path / "m-sv_ratio-2.safetensors").is_file()
    assert main(["resize", str(files[0])]) == 1
    assert "--rank" in capsys.readouterr().err
    # extract from two single-file checkpoints (loaded with load_base)
    sd1.save_pretrained(tmp_path / "base")
    main(["merge", "--into-model", str(tmp_path / "base"), "--lora", f"{files[0]}:1", "--out", str(tmp_path / "t.safetensors")])
    main(["merge", "--into-model", str(tmp_path / "base"), "--lora", f"{files[0]}:0", "--out", str(tmp_path / "b.safetensors")])
    capsys.readouterr()
    assert main(["extract", "--base", str(tmp_path / "b.safetensors"), "--tuned", str(tmp_path / "t.safetensors"),
                 "--config-from", str(tmp_path / "base"), "--rank", "4", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert "extract (rank 4" in capsys.readouterr().out
    want, got = file_deltas(load_lora(files[0]), sd1), file_deltas(load_lora(tmp_path / "x.safetensors"), sd1)
    assert all(torch.allclose(got[n], want[n], atol=2e-3) for n in want)  # fp16 file
