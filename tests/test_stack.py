"""Weighted LoRA stacks: fused result vs diffusers, exact restore, declarative switching, atomic failure."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd_lora.formats.lora_file import LoraFile, LoraModule
from sd_lora.network.naming import module_index
from sd_lora.stack import LoraCache, LoraSpec, applied_stack, apply_loras, loras, remove_loras
from sd_lora.testing import lora_target_layers, random_kohya_lora, tiny_pipeline, write_random_lora

def _layers(pipe, arch, conv=False, te=True):
    return lora_target_layers(pipe, arch, conv, te)


def kohya_state_dict(pipe, arch, seed, rank=4, alpha=2.0, conv=False, te=True):
    return random_kohya_lora(pipe, arch, seed, rank=rank, alpha=alpha, conv=conv, text_encoder=te)


def write_kohya(path, pipe, arch="sd1", seed=0, dtype=torch.float16, conv=False, te=True):
    return write_random_lora(path, pipe, arch, seed, dtype=dtype, conv=conv, text_encoder=te)


def weights(pipe):
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            out.update({f"{comp}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def assert_bitwise(a, b):
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture
def pipe():
    return tiny_pipeline("sd1")


@pytest.fixture
def files(pipe, tmp_path):
    return [write_kohya(tmp_path / f"l{i}.safetensors", pipe, seed=i, conv=(i == 1)) for i in range(3)]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fused_lora_and_locon_equal_diffusers_fuse(arch, tmp_path):
    """Our fused weights equal diffusers' `load_lora_weights` + `fuse_lora` (UNet and text encoders;
    SD1 with LoCon conv layers, SDXL with kohya's SGM block names and te1/te2)."""
    pipe = tiny_pipeline(arch)
    f = write_kohya(tmp_path / "locon.safetensors", pipe, arch=arch, seed=3, conv=arch == "sd1", dtype=torch.float32)
    ref = tiny_pipeline(arch)
    ref.load_lora_weights(str(f), adapter_name="x")
    ref.fuse_lora(lora_scale=0.7)
    ref.unload_lora_weights()
    expected = weights(ref)
    base = weights(pipe)

    apply_loras(pipe, [(f, 0.7)])
    got = weights(pipe)
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert any(k.startswith("text_encoder.") for k in changed)
    assert arch != "sdxl" or any(k.startswith("text_encoder_2.") for k in changed)
    assert arch != "sd1" or any("conv1" in k for k in changed)
    assert [k for k in expected if not torch.equal(expected[k], base[k])] == changed  # same weights touched
    for k in changed:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_weight_zero_is_base_and_remove_restores_bitwise(pipe, files):
    base = weights(pipe)
    apply_loras(pipe, [(files[0], 0.0), (files[1], 0.0, 0.0)])
    assert_bitwise(weights(pipe), base)

    apply_loras(pipe, [(files[0], 0.8), (files[1], -0.5, 0.3), LoraSpec(files[2], 1.2)])
    assert not torch.equal(weights(pipe)["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           base["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    remove_loras(pipe)
    assert_bitwise(weights(pipe), base)
    assert applied_stack(pipe) == []


def test_backup_memory_is_reused_and_never_restores_a_stale_base(pipe, files):
    """remove_loras keeps the backup memory; the next apply backs up the weights as they are then."""
    import sd_lora.stack.fuse as fuse

    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    apply_loras(pipe, [(files[0], 0.8)])
    remove_loras(pipe)
    st = fuse._state(pipe)
    assert st.spare and not st.targets
    spare_ptrs = {b.data_ptr() for b in st.spare.values()}
    with torch.no_grad():  # the user edits the base between two stacks
        pipe.unet.get_parameter(name.removeprefix("unet.")).add_(1.0)
    edited = weights(pipe)
    apply_loras(pipe, [(files[0], 0.8)])
    assert {t.backup.data_ptr() for t in st.targets.values()} <= spare_ptrs  # same memory, no new block
    remove_loras(pipe, free_memory=True)
    assert_bitwise(weights(pipe), edited)  # the edit survives: the backup was taken afresh
    assert not st.spare and not st.targets
    with torch.no_grad():
        pipe.unet.get_parameter(name.removeprefix("unet.")).sub_(1.0)


def test_stack_is_the_sum_of_its_parts(pipe, files):
    """W = base + sum_i w_i * delta_i, with separate UNet / text-encoder weights."""
    base = weights(pipe)
    parts = []
    for f, w, tw in ((files[0], 0.8, 0.8), (files[2], -0.5, 0.25)):
        apply_loras(pipe, [LoraSpec(f, weight=w, te_weight=tw)])
        parts.append({k: v - base[k] for k, v in weights(pipe).items()})
    apply_loras(pipe, [(files[0], 0.8), (files[2], -0.5, 0.25)])
    got = weights(pipe)
    for k in got:
        torch.testing.assert_close(got[k], base[k] + parts[0][k] + parts[1][k], rtol=1e-5, atol=1e-5)


def test_switching_is_declarative_and_touches_only_what_changes(pipe, files):
    cache = LoraCache()
    apply_loras(pipe, [(files[0], 0.5)], cache=cache)
    fresh = weights(pipe)
    remove_loras(pipe)

    apply_loras(pipe, [(files[1], 1.0), (files[2], 0.7)], cache=cache)
    info = apply_loras(pipe, [(files[0], 0.5)], cache=cache)  # not on top of the previous stack
    assert_bitwise(weights(pipe), fresh)
    assert info.changed > 0

    again = apply_loras(pipe, [(files[0], 0.5)], cache=cache)
    assert again.changed == 0  # same stack: nothing written

    te_only = apply_loras(pipe, [(files[0], 0.5, 0.9)], cache=cache)
    n_te = sum(1 for c, p, m in _layers(pipe, "sd1") if c == "text_encoder")
    assert te_only.changed == n_te  # only the text-encoder weights were rewritten
    assert cache.misses == 3 and cache.hits >= 3


def test_context_manager_restores_previous_stack_bitwise(pipe, files):
    base = weights(pipe)
    with loras(pipe, [(files[0], 1.0)]):
        assert not torch.equal(weights(pipe)["text_encoder.encoder.layers.0.self_attn.q_proj.weight"],
                               base["text_encoder.encoder.layers.0.self_attn.q_proj.weight"])
    assert_bitwise(weights(pipe), base)

    apply_loras(pipe, [(files[1], 0.6)])
    outer = weights(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with loras(pipe, [(files[2], 1.0)]):
            raise RuntimeError("boom")
    assert_bitwise(weights(pipe), outer)


def test_failing_file_leaves_pipeline_untouched(pipe, files, tmp_path):
    apply_loras(pipe, [(files[0], 0.8)])
    before = weights(pipe)

    sd = kohya_state_dict(pipe, "sd1", seed=9)
    bad_key = next(k for k in sd if "attn2_to_k.lora_down" in k)
    sd[bad_key] = torch.randn(4, 17)  # wrong input width
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*attn2_to_k"):
        apply_loras(pipe, [(files[1], 1.0), (bad, 1.0)])
    assert_bitwise(weights(pipe), before)

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        apply_loras(pipe, [(files[2], 1.0), (tmp_path / "missing.safetensors", 1.0)])
    assert_bitwise(weights(pipe), before)
    assert [s.path for s in applied_stack(pipe)] == [files[0]]


def test_other_architecture_is_an_error_naming_the_file(pipe, tmp_path):
    xl = write_kohya(tmp_path / "xl.safetensors", tiny_pipeline("sdxl"), arch="sdxl", seed=1)
    before = weights(pipe)
    with pytest.raises(ValueError, match=r"xl\.safetensors"):
        apply_loras(pipe, [(xl, 1.0)])
    assert_bitwise(weights(pipe), before)


def _ref_modules(pipe, seed=0):
    """In-memory LoHa, LoKr and DoRA modules with a direct reference delta for each (no library math)."""
    g = torch.Generator().manual_seed(seed)
    idx = module_index(pipe, "sd1")
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"   # 64 x 64
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"   # 64 x 32
    conv = "lora_unet_up_blocks_0_resnets_0_conv1"                               # 64 x 128 x 3 x 3
    Wq, Wk = idx[q][2].weight.detach(), idx[k][2].weight.detach()
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w1a, w1b, w2a, w2b = r(64, 4), r(4, 64), r(64, 4), r(4, 64)
    loha = LoraModule(q, "loha", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)})
    loha_ref = (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4)
    k1, k2a, k2b = r(4, 2), r(16, 3), r(3, 16)
    lokr = LoraModule(k, "lokr", {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(1.5)})
    lokr_ref = torch.kron(k1, k2a @ k2b) * (1.5 / 3)
    cw = idx[conv][2].weight.detach()
    t1a, t1b, t2a, t2b = r(64, 2), r(2, 128 * 9), r(64, 2), r(2, 128 * 9)
    loha_conv = LoraModule(conv, "loha", {"hada_w1_a": t1a, "hada_w1_b": t1b, "hada_w2_a": t2a, "hada_w2_b": t2b})
    conv_ref = ((t1a @ t1b) * (t2a @ t2b)).reshape(cw.shape)
    up, down = r(64, 4) * 0.1, r(4, 64)
    mag = r(64).abs() + 1
    dora = LoraModule(q.replace("attn1_to_q", "attn1_to_v"), "lora",
                      {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(4.0), "dora_scale": mag.reshape(64, 1)})
    Wv = idx[dora.name][2].weight.detach()
    merged = Wv + up @ down * (4.0 / 4)
    dora_ref = mag.reshape(64, 1) * merged / merged.norm(dim=1, keepdim=True) - Wv
    return [(loha, Wq, loha_ref), (lokr, Wk, lokr_ref), (loha_conv, cw, conv_ref), (dora, Wv, dora_ref)], idx


def test_loha_lokr_dora_deltas_match_direct_reference(pipe):
    cases, idx = _ref_modules(pipe)
    lora = LoraFile({m.name: m for m, _, _ in cases})
    base = {m.name: w.clone() for m, w, _ in cases}
    apply_loras(pipe, [(lora, 0.6)])
    for m, _, ref in cases:
        torch.testing.assert_close(idx[m.name][2].weight.detach(), base[m.name] + 0.6 * ref, rtol=1e-5, atol=1e-5, msg=m.name)
    remove_loras(pipe)
    for m, _, _ in cases:
        assert torch.equal(idx[m.name][2].weight.detach(), base[m.name])


def test_dense_delta_cache_for_lycoris_files(pipe, tmp_path):
    """With dense_bytes, LoHa/LoKr deltas are kept and reused (same bits), within their bound; DoRA never."""
    from sd_lora.formats.kohya import save_lora

    paths = []
    for seed in (0, 1):
        cases, _ = _ref_modules(pipe, seed)
        sd = {f"{m.name}.{k}": v for m, _, _ in cases for k, v in m.tensors.items()}
        paths.append(save_lora(tmp_path / f"ly{seed}.safetensors", sd, dtype=torch.float32))
    stack = [(paths[0], 0.7), (paths[1], -0.4)]
    apply_loras(pipe, stack, cache=LoraCache())
    expected = weights(pipe)
    remove_loras(pipe)

    cache = LoraCache(dense_bytes=10 * 2**20)
    for _ in range(2):  # the second round finds every dense delta in the cache
        apply_loras(pipe, stack, cache=cache)
        assert_bitwise(weights(pipe), expected)
        apply_loras(pipe, [(paths[1], 1.0)], cache=cache)
    # LoHa (64x64), LoKr (64x32) and the LoHa conv (64x128x3x3) of each file, fp32; not the DoRA module
    assert len(cache._dense) == 6 and cache.dense_num_bytes == 2 * 4 * (64 * 64 + 64 * 32 + 64 * 128 * 9)
    assert cache.dense_hits >= 6
    remove_loras(pipe)

    small = LoraCache(dense_bytes=30_000)  # fits the two linear deltas of one file, never a conv delta
    for stack in ([(paths[0], 1.0)], [(paths[1], 1.0)], stack):
        apply_loras(pipe, stack, cache=small)
        assert 0 < small.dense_num_bytes <= 30_000
    assert_bitwise(weights(pipe), expected)
    remove_loras(pipe)


def _image(pipe, seed=0):
    return pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_model_cpu_offload_pipeline_gets_the_same_stack(files):
    """enable_model_cpu_offload (accelerate hooks; device="cpu" stands in for CUDA here): the stack is
    fused into the hooked modules, images equal the plain pipeline's, remove restores bitwise."""
    plain, offloaded = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hasattr(offloaded.unet, "_hf_hook")
    base = weights(offloaded)
    stack = [(files[0], 0.8), (files[1], 0.5, 0.3)]
    apply_loras(plain, stack)
    apply_loras(offloaded, stack)
    assert_bitwise(weights(offloaded), weights(plain))
    assert (_image(offloaded) == _image(plain)).all()
    remove_loras(offloaded)
    assert_bitwise(weights(offloaded), base)


def test_sequential_offload_is_refused_with_advice(files):
    pipe = tiny_pipeline("sd1")
    pipe.enable_sequential_cpu_offload(device="cpu")  # weights live on the meta device between calls
    with pytest.raises(ValueError, match="enable_model_cpu_offload"):
        apply_loras(pipe, [(files[0], 1.0)])


def test_block_weights_and_text_encoder_weight(pipe, files):
    base = weights(pipe)
    # 26-value list: BASE, IN00..IN11, M00, OUT00..OUT11. Only OUT03-05 on: in the tiny UNet that is
    # up_blocks.1, which has no attention layers, so nothing changes.
    blocks = [0] * 26
    blocks[15 + 3: 15 + 6] = [1, 1, 1]
    apply_loras(pipe, [LoraSpec(files[0], weight=1.0, block_weights=blocks)])
    got = weights(pipe)
    assert all(torch.equal(got[k], base[k]) for k in got)
    apply_loras(pipe, [LoraSpec(files[0], weight=1.0, block_weights={"IN04": 1, "IN05": 0, "BASE": 0, "OUT00": 0, "OUT01": 0, "OUT02": 0, "M00": 0})])
    got = weights(pipe)
    changed = sorted(k for k in got if not torch.equal(got[k], base[k]))
    assert changed and all(k.startswith("unet.down_blocks.1.attentions.0.") for k in changed)  # IN04 only
    apply_loras(pipe, [LoraSpec(files[0], weight=0.0, te_weight=1.0)])
    got = weights(pipe)
    assert {k.split(".")[0] for k in got if not torch.equal(got[k], base[k])} == {"text_encoder"}
    with pytest.raises(ValueError, match="17 or 26"):
        apply_loras(pipe, [LoraSpec(files[0], block_weights=[1, 2, 3])])


def test_fp16_base_accumulates_in_fp32_and_restores(tmp_path):
    pipe = tiny_pipeline("sd1").to(torch.float16)
    f = write_kohya(tmp_path / "a.safetensors", pipe, seed=0)
    base = weights(pipe)
    apply_loras(pipe, [(f, 0.75)])
    ref32 = tiny_pipeline("sd1").to(torch.float16).to(torch.float32)  # same base, widened exactly
    apply_loras(ref32, [(f, 0.75)])
    got, want = weights(pipe), weights(ref32)
    for k in got:
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k], want[k].to(torch.float16)), k  # one rounding of the fp32 result
    remove_loras(pipe)
    assert_bitwise(weights(pipe), base)


def test_components_shared_by_img2img_share_the_stack(pipe, files):
    from diffusers import StableDiffusionImg2ImgPipeline

    base = weights(pipe)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    apply_loras(img2img, [(files[0], 1.0)])
    assert [s.path for s in applied_stack(pipe)] == [files[0]]
    apply_loras(pipe, [])  # empty stack = base
    assert_bitwise(weights(img2img), base)


def test_cache_stays_within_its_byte_bound(pipe, tmp_path):
    fs = [write_kohya(tmp_path / f"c{i}.safetensors", pipe, seed=i, te=False) for i in range(4)]
    from sd_lora.formats.read import load_lora

    size = load_lora(fs[0]).num_bytes()  # the factors' bytes, as the cache counts them
    cache = LoraCache(max_bytes=int(size * 2.5))
    for f in fs + fs:
        apply_loras(pipe, [(f, 1.0)], cache=cache)
        assert cache.num_bytes <= cache.max_bytes and len(cache) <= 2
    assert cache.misses == 8  # LRU of 2 cycling over 4 files: every read misses
    apply_loras(pipe, [(fs[-1], 1.0)], cache=cache)
    assert cache.hits == 1
    # An edited file (new size/mtime) is read again, not served stale from the cache.
    write_kohya(fs[-1], pipe, seed=99, te=False, dtype=torch.float32)
    before = weights(pipe)
    apply_loras(pipe, [(fs[-1], 1.0)], cache=cache)
    assert cache.misses == 9 and not all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_bad_stack_entries_are_refused_up_front(pipe, files):
    with pytest.raises(TypeError, match="stack entry"):
        apply_loras(pipe, [(files[0], 1.0, 1.0, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        apply_loras(pipe, [(files[0], float("nan"))])
    with pytest.raises(ValueError, match="unknown block"):
        apply_loras(pipe, [LoraSpec(files[0], block_weights={"IN99x": 1})])


def test_generate_cli_with_prompt_tags_and_weight_grid(tmp_path):
    from PIL import Image

    from sd_lora.cli import main
    from sd_lora.commands.generate import parse_lora_arg

    assert parse_lora_arg("C:/x/ink.safetensors:0.5:-1") == ("C:/x/ink.safetensors", 0.5, -1.0)
    assert parse_lora_arg("ink") == ("ink", 1.0, None)
    base_dir = tmp_path / "base"
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(base_dir)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write_kohya(lora_dir / "ink.safetensors", pipe, seed=1)
    common = ["generate", "--model", str(base_dir), "--steps", "1", "--width", "64", "--height", "64", "--seed", "3"]

    assert main(common + ["--prompt", "a red circle <lora:ink:0.8>", "--lora-dir", str(lora_dir), "--out", str(tmp_path / "ink.png")]) == 0
    assert main(common + ["--prompt", "a red circle", "--lora", f"{lora_dir / 'ink.safetensors'}:0.8",
                          "--grid", "0,0.8", "--out", str(tmp_path / "grid.png")]) == 0
    inked, grid = Image.open(tmp_path / "ink.png"), Image.open(tmp_path / "grid.png")
    assert inked.size == (64, 64) and "Seed: 3" in inked.info["parameters"]
    # Columns are the same seed at weights 0 and 0.8: the 0.8 column is the tagged prompt's image.
    top = grid.height - 4 - 64
    zero, full = grid.crop((4, top, 68, top + 64)).tobytes(), grid.crop((72, top, 136, top + 64)).tobytes()
    assert full == inked.convert("RGB").tobytes() and zero != full

    assert main(common + ["--prompt", "a <lora:inc:1>", "--lora-dir", str(lora_dir), "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()


def test_failure_while_writing_puts_back_the_previous_stack(pipe, files, monkeypatch):
    """An error half-way through writing (e.g. out of memory) rolls back to the previous stack."""
    import sd_lora.stack.fuse as fuse

    apply_loras(pipe, [(files[0], 0.8)])
    before = weights(pipe)
    real, calls = fuse._write, []

    def flaky(st, t, contributions, all_files, *rest):
        calls.append(t)
        if len(calls) == 10 and contributions:
            raise MemoryError("simulated out of memory")
        return real(st, t, contributions, all_files, *rest)

    monkeypatch.setattr(fuse, "_write", flaky)
    with pytest.raises(MemoryError):
        apply_loras(pipe, [(files[1], 1.0), (files[2], 0.5)])
    monkeypatch.setattr(fuse, "_write", real)
    assert_bitwise(weights(pipe), before)
    st = fuse._state(pipe)
    assert set(st.targets) == set(st.applied)  # no backups of weights the failed call never kept
    assert apply_loras(pipe, [(files[0], 0.8)]).changed == 0  # the state agrees with the weights


def test_failure_while_backing_up_changes_nothing(pipe, files, monkeypatch):

    apply_loras(pipe, [(files[0], 0.8)])
    before = weights(pipe)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (_ for _ in ()).throw(MemoryError("simulated")))
    with pytest.raises(MemoryError) as info:
        apply_loras(pipe, [(files[0], 0.8), (files[1], 1.0)])
    monkeypatch.undo()
    assert any(entry.name == "_back_up" for entry in info.traceback)  # (the file was read and matched before)
    assert_bitwise(weights(pipe), before)
    assert apply_loras(pipe, [(files[0], 0.8)]).changed == 0
    remove_loras(pipe)


def test_trigger_words_of_the_applied_stack(pipe):
    import json

    def with_tags(seed, tags):
        sd = kohya_state_dict(pipe, "sd1", seed, te=False)
        mods = {}
        for key, t in sd.items():
            name, _, suffix = key.partition(".")
            mods.setdefault(name, LoraModule(name, "lora", {})).tensors[suffix] = t
        return LoraFile(mods, metadata={"ss_tag_frequency": json.dumps({"10_set": tags})})

    ink = with_tags(0, {"inkstyle": 40, "monochrome": 12, "1girl": 3})
    film = with_tags(1, {"filmgrain": 20, "monochrome": 5})
    info = apply_loras(pipe, [(ink, 0.8), (film, 0.5)])
    assert info.trigger_words == ["inkstyle", "monochrome", "1girl", "filmgrain"]
    assert apply_loras(pipe, [(ink, 0.0), (film, 0.5)]).trigger_words == ["filmgrain", "monochrome"]


def test_lora_for_another_base_says_what_to_do_and_skip_mismatched_applies_the_rest(tmp_path, capsys):
    """A full-size SD1.5 module (text encoder q_proj 768x768) in a file for the tiny SD1 base: the error
    gives the delta's shape as the method computes it (not (out, numel)), the base weight's, the
    model the metadata names, and a flag a CLI user can pass; --skip-mismatched applies the rest."""
    from PIL import Image

    from sd_lora.cli import main

    base_dir = tmp_path / "base"
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(base_dir)
    width = pipe.text_encoder.config.hidden_size
    sd = kohya_state_dict(pipe, "sd1", seed=1)
    meta = {"ss_network_module": "networks.lora", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}
    save_file(sd, str(tmp_path / "fits.safetensors"), metadata=meta)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert f"{key}.lora_down.weight" in sd  # the module replaced below is one the base has
    sd = {**sd, f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(768, 4)}
    save_file(sd, str(tmp_path / "full_size.safetensors"), metadata=meta)
    common = ["generate", "--model", str(base_dir), "--steps", "1", "--width", "64", "--height", "64", "--prompt", "a red circle"]

    assert main(common + ["--lora", str(tmp_path / "full_size.safetensors"), "--out", str(tmp_path / "no.png")]) == 1
    err = capsys.readouterr().err
    assert f"{key} (the file's delta is (768, 768), the base weight is ({width}, {width}))" in err
    assert "589824" not in err
    assert "'v1-5-pruned-emaonly.safetensors'" in err and "--skip-mismatched" in err
    assert not (tmp_path / "no.png").exists()

    assert main(common + ["--lora", str(tmp_path / "full_size.safetensors"), "--skip-mismatched", "--out", str(tmp_path / "rest.png")]) == 0
    assert main(common + ["--lora", str(tmp_path / "fits.safetensors"), "--out", str(tmp_path / "fits.png")]) == 0
    fits_sd = {k: v for k, v in sd.items() if not k.startswith(key)}
    save_file(fits_sd, str(tmp_path / "rest_only.safetensors"), metadata=meta)
    assert main(common + ["--lora", str(tmp_path / "rest_only.safetensors"), "--out", str(tmp_path / "rest_only.png")]) == 0
    rest = Image.open(tmp_path / "rest.png").tobytes()
    assert rest == Image.open(tmp_path / "rest_only.png").tobytes()  # exactly the modules that fit
    assert rest != Image.open(tmp_path / "fits.png").tobytes()  # and not the file's (skipped) q_proj module


def test_generate_api_takes_strict(tmp_path):
    import sd_lora

    pipe = tiny_pipeline("sd1")
    sd = kohya_state_dict(pipe, "sd1", seed=1)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {**sd, f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(768, 4)}
    save_file(sd, str(tmp_path / "full_size.safetensors"))
    before = weights(pipe)
    with pytest.raises(ValueError, match=r"--skip-mismatched`, strict=False in Python"):
        sd_lora.generate(pipe, "a red circle", [tmp_path / "full_size.safetensors"], steps=1, width=64, height=64)
    result = sd_lora.generate(pipe, "a red circle", [tmp_path / "full_size.safetensors"], steps=1, width=64, height=64, strict=False)
    assert len(result.images) == 1
    assert_bitwise(weights(pipe), before)  # the call's non-strict stack is taken out again
