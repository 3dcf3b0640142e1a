"""Hostile inputs: every reader either reads the file or raises one of our documented errors.

Files come from strangers. For each reader we generate malformed and adversarial inputs with
hypothesis (derandomize=True: the same cases on every run, so CI is deterministic) and require:
a documented exception type whose message names the file, or a correct result; never another
exception type, never a hang, never an allocation sized by a hostile length field.

  safetensors  sd_lora.io.read_state_dict / load_safetensors    CheckpointError
  LoRA files   sd_lora.formats.read.load_lora                    LoraFormatError / CheckpointError
  base models  sd_lora.models.load_base (detection path), .ckpt  ModelLoadError / CheckpointError
  configs      sd_lora.config.load_config (TOML)                 ConfigError
  captions     sd_lora.data.captions / sd_lora.caption.edit      (non-UTF-8 is read, never a crash)
  images       sd_lora.data.images.open_image                    ImageProblem

The number of cases per test is in N below (>= 10,000 in total); the figures are in SECURITY.md.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sd_lora.config import ConfigError, load_config
from sd_lora.formats.read import LoraFormatError, load_lora
from sd_lora.io import CheckpointError, read_safetensors_header, read_state_dict
from sd_lora.models import ModelLoadError, load_base
from sd_lora.data.images import ImageProblem, open_image

REPO = Path(__file__).resolve().parents[1]
N = {"header": 2500, "lora": 1500, "ckpt": 600, "base": 300, "toml": 2500, "caption": 1000, "image": 1800}  # 10,200 cases
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _names_file(err: BaseException, path: Path) -> None:
    assert str(path) in str(err) or path.name in str(err), f"error does not name the file: {err}"


# ---- safetensors ------------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "I8", "F8_E4M3", "X9", "", "f32", 3, None]
ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "F64": 8, "I8": 1, "F8_E4M3": 1}


def _st_bytes(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    n = len(raw) if length is None else length
    return struct.pack("<Q", n % 2**64) + raw + data


shape_st = st.lists(st.one_of(st.integers(0, 6), st.integers(-3, -1), st.just(2**40), st.just("3"), st.just(1.5)), max_size=4)


@st.composite
def safetensors_files(draw):
    """Mostly-valid files with one or more things wrong (or nothing: then it must load)."""
    kind = draw(st.sampled_from(["tensors", "tensors", "tensors", "junk_json", "bad_length", "random_bytes"]))
    if kind == "random_bytes":
        return draw(st.binary(max_size=64))
    if kind == "junk_json":
        text = draw(st.one_of(st.text(max_size=40), st.sampled_from(["[]", "null", "1", '"x"', "{", '{"a": 1}',
                                                                      '{"__metadata__": {"a": 1}}', '{"__metadata__": []}',
                                                                      '{"t": {"dtype": "F32"}}', '{"t": []}'])))
        return _st_bytes(text, draw(st.binary(max_size=16)))
    header, offset, data = {}, 0, b""
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(shape_st)
        numel = 1
        for s in shape:
            numel *= s if isinstance(s, int) else 1
        size = max(numel, 0) * ITEM.get(dtype, 4) if numel < 4096 else 8
        start = offset + draw(st.sampled_from([0, 0, 0, 1, -1, 10**12]))
        end = start + size + draw(st.sampled_from([0, 0, 0, 0, 1, -2, 2**63]))
        header[f"lora_unet_m{i}.lora_down.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        if dtype in ITEM and 0 <= size < 4096:
            payload = draw(st.sampled_from(["zeros", "nan", "random"]))
            chunk = (np.full(size // 4, np.nan, np.float32).tobytes().ljust(size, b"\0") if payload == "nan"
                     else draw(st.binary(min_size=size, max_size=size)) if payload == "random" else b"\0" * size)
            data += chunk
        offset = end if isinstance(end, int) and 0 <= end < 10**6 else offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
                                                st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)))
    cut = draw(st.sampled_from([None, None, None, 0, 1, 7]))
    length = draw(st.sampled_from([None, None, None, None, 0, 1, 2**64 - 1, 2**62, 100 * 2**20 + 1]))
    blob = _st_bytes(header, data, length)
    return blob if cut is None else blob[: max(0, len(blob) - 1 - cut * 3)]


@settings(max_examples=N["header"], **FUZZ)
@given(blob=safetensors_files())
def test_fuzz_safetensors_reader(work, blob):
    path = work / "x.safetensors"
    path.write_bytes(blob)
    try:
        tensors, meta = read_state_dict(path)
    except CheckpointError as e:
        _names_file(e, path)
        return
    header, _ = read_safetensors_header(path)
    assert set(tensors) == set(header)  # what loads is exactly what the header declares
    assert all(isinstance(v, str) for v in meta.values())


def test_header_length_bomb_is_refused_without_reading(work):
    path = work / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="header says"):
        read_state_dict(path)


# ---- LoRA files ------------------------------------------------------------------------------------
MODULES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
           "lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "base_model.model.mid_block.attentions.0.proj_in",
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_unet_input_blocks_1_1_proj_in"]
SUFFIXES = ["lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "lora_mid.weight", "hada_w1_a", "hada_w1_b",
            "hada_w2_a", "hada_w2_b", "hada_t1", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "diff", "lora_A.weight",
            "lora_B.weight", "lora_magnitude_vector", "oft_blocks", "oft_diag", "rescale", "unknown_suffix"]
GROUPS = [["lora_down.weight", "lora_up.weight", "alpha"], ["lora_down.weight", "lora_up.weight", "alpha", "dora_scale"],
          ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"], ["lokr_w1", "lokr_w2"], ["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
          ["lora_A.weight", "lora_B.weight"], ["diff"], ["lora_down.weight", "lora_up.weight", "lora_mid.weight"],
          ["oft_blocks", "alpha"], ["oft_diag", "rescale"]]


@st.composite
def lora_state_dicts(draw):
    sd = {}
    for name in draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=3, unique=True)):
        suffixes = draw(st.one_of(st.sampled_from(GROUPS), st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=4, unique=True)))
        sep = "." if "." in name else "."
        for s in suffixes:
            if draw(st.integers(0, 9)) == 0:
                continue  # a factor missing
            shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8]), min_size=0 if s == "alpha" else 1, max_size=4)))
            value = draw(st.sampled_from(["randn", "randn", "randn", "nan", "inf", "int", "bool", "half"]))
            t = torch.randn(shape, generator=torch.Generator().manual_seed(len(sd)))
            t = {"nan": t * float("nan"), "inf": t / 0.0, "int": t.to(torch.int32), "bool": t > 0, "half": t.half()}.get(value, t)
            sd[f"{name}{sep}{s}"] = t
    return sd, draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["ss_base_model_version", "modelspec.architecture", "lora_adapter_metadata", "ss_tag_frequency"]),
                                                          st.sampled_from(["sdxl_base_v1-0", "sd_v1", "{", "{\"r\": 0}", "{\"unet.r\": \"x\"}", "[]", ""]), max_size=3)))


@settings(max_examples=N["lora"], **FUZZ)
@given(case=lora_state_dicts(), strict=st.booleans())
def test_fuzz_load_lora(work, case, strict):
    from safetensors.torch import save_file

    sd, metadata = case
    path = work / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    try:
        lora = load_lora(path, strict=strict)
    except (LoraFormatError, CheckpointError) as e:
        _names_file(e, path)
        return
    _ = lora.trigger_words
    for module in lora.modules.values():  # whatever loads must be usable: a delta of the size it declares
        out, numel = module.delta_shape()
        rest = numel // out if numel is not None else 3  # (None: the delta fits any input width, as OFT's)
        base = torch.randn(out, rest)
        delta = module.delta((out, rest), base_weight=base)
        assert delta.shape == (out, rest) and torch.isfinite(delta).all()


# ---- base checkpoints ------------------------------------------------------------------------------
BASE_KEYS = ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "cond_stage_model.model.ln_final.weight",
             "conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", "v_pred", "first_stage_model.encoder.conv_in.weight", "x"]


class _ReachedAssembly(Exception):
    pass


@settings(max_examples=N["base"], **FUZZ)
@given(keys=st.lists(st.sampled_from(BASE_KEYS), max_size=3, unique=True),
       shape=st.lists(st.sampled_from([0, 1, 320, 768, 1024, 7]), max_size=2))
def test_fuzz_base_model_detection(work, monkeypatch, keys, shape):
    """load_base on checkpoints with odd key sets and shapes: detection says which file and why, or hands over."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    def reached(*a, **k):
        raise _ReachedAssembly  # detection accepted the file; assembling it is diffusers' job (tested below)

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", reached)
    monkeypatch.setattr("sd_lora.models.shipped_tokenizer", lambda *a, **k: None)  # 0.2 s each; not under test
    path = work / "base.safetensors"
    save_file({k: torch.zeros(shape) for k in keys}, str(path))
    try:
        load_base(path)
    except (ModelLoadError, CheckpointError) as e:
        _names_file(e, path)
    except _ReachedAssembly:
        assert any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for k in keys)


def test_base_checkpoint_with_missing_components_is_a_model_load_error(work):
    from safetensors.torch import save_file

    path = work / "partial.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}, str(path))
    with pytest.raises(ModelLoadError, match="partial.safetensors"):
        load_base(path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@settings(max_examples=N["ckpt"], **FUZZ)
@given(kind=st.sampled_from(["evil", "random", "zip_junk", "truncated", "list", "good"]), junk=st.binary(max_size=200), cut=st.integers(1, 400))
def test_fuzz_pickle_checkpoints_never_execute(work, monkeypatch, kind, junk, cut):
    monkeypatch.chdir(work)
    path = work / "model.ckpt"
    buf = io.BytesIO()
    if kind == "evil":
        torch.save({"state_dict": {"w": torch.zeros(2), "x": _Evil()}}, buf)
    elif kind in ("truncated", "good"):
        torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(3)}}, buf)
    elif kind == "list":
        torch.save([torch.zeros(1)], buf)
    elif kind == "zip_junk":
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", junk)
            z.writestr("archive/version", b"3\n")
    else:
        buf.write(junk)
    blob = buf.getvalue()
    path.write_bytes(blob[:-cut] if kind == "truncated" else blob)
    try:
        sd, _ = read_state_dict(path)
        assert kind == "good" and torch.equal(sd["model.diffusion_model.w"], torch.ones(3))
    except CheckpointError as e:
        _names_file(e, path)
    assert not (work / "PWNED").exists()


def test_every_torch_load_is_weights_only():
    """No code path unpickles: every torch.load passes weights_only=True, and pickle.load is not used."""
    calls = []
    for f in [*REPO.glob("sd_lora/**/*.py"), *REPO.glob("webui/**/*.py"), *REPO.glob("bench/*.py")]:
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            line = text[text.rfind("\n", 0, m.start()) + 1: text.find("\n", m.start())]
            if line.lstrip().startswith("#") or "`torch.load(" in line or '"' in line[: line.find("torch.load")]:
                continue  # prose in a comment or docstring
            depth, i = 0, m.end() - 1
            while True:  # the full argument list, across lines
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            calls.append((f.relative_to(REPO), text[m.start(): i + 1]))
        assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", text), f"{f}: unpickling"
    assert len(calls) >= 2  # the checkpoint reader and the resume reader
    bad = [c for c in calls if "weights_only=True" not in c[1]]
    assert not bad, bad


# ---- TOML configs ---------------------------------------------------------------------------------
TOML_KEYS = ["model", "output", "lr", "steps", "epochs", "resume", "optimizer", "seed", "sample_prompts", "mixed_precision",
             "checkpoint_dir", "keep_checkpoints", "max_grad_norm", "text_encoder_lr", "bogus", "data", "network"]
SECTION_KEYS = {"data": ["path", "resolution", "caption_extension", "repeats", "flip", "cache_latents", "keep_tokens", "caption_dropout", "reg_path", "max_image_pixels"],
                "network": ["rank", "alpha", "method", "preset", "dropout", "train_text_encoder", "rank_pattern", "target_modules"]}
toml_scalar = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=12),
                        st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def toml_docs(draw):
    import tomli_w

    kind = draw(st.sampled_from(["doc", "doc", "doc", "text"]))
    if kind == "text":
        return draw(st.one_of(st.binary(max_size=60), st.sampled_from([b"[data", b"lr = ", b"\xff\xfe", b"a = 1\na = 2", b"[[data]]\n"])))
    doc = {}
    for key in draw(st.lists(st.sampled_from(TOML_KEYS), max_size=6, unique=True)):
        if key in SECTION_KEYS and draw(st.booleans()):
            doc[key] = {k: draw(toml_scalar) for k in draw(st.lists(st.sampled_from(SECTION_KEYS[key]), max_size=4, unique=True))}
        else:
            doc[key] = draw(toml_scalar)
    return tomli_w.dumps(doc).encode()


@settings(max_examples=N["toml"], **FUZZ)
@given(blob=toml_docs())
def test_fuzz_toml_config(work, blob):
    path = work / "train.toml"
    path.write_bytes(blob)
    try:
        cfg = load_config(path)
        cfg.validate()  # type-confused values are reported, never crash the validator
        cfg.check() if False else None
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) for m in e.errors)


# ---- captions ------------------------------------------------------------------------------------
@settings(max_examples=N["caption"], **FUZZ)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(lambda s: s.encode("utf-16")),
                     st.sampled_from([b"\xef\xbb\xbfsks, dog", b"\xff\xfe\x00", b"a\x00b", b"\r\n\r\n", b"x" * 5000])))
def test_fuzz_caption_files(work, raw):
    from sd_lora.caption import edit
    from sd_lora.data.captions import read_caption, shuffle_caption

    image = work / "cap" / "img.png"
    image.parent.mkdir(exist_ok=True)
    image.with_suffix(".txt").write_bytes(raw)
    text, ext = read_caption(image, (".txt", ".caption"))
    assert text is None or (ext == ".txt" and "\n" not in text and text == text.strip())
    got = edit.read_caption(image, ".txt")
    assert isinstance(got, str)
    tags = edit.split_tags(got)
    assert edit.dedupe_tags(edit.dedupe_tags(tags)) == edit.dedupe_tags(tags)
    import random

    assert sorted(edit.split_tags(shuffle_caption(got, 1, random.Random(0)))) == sorted(tags)
    edit.write_caption(image, got)  # writing back what was read works, whatever it was
    assert edit.read_caption(image, ".txt") == got.strip()


# ---- images --------------------------------------------------------------------------------------
def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(w, h):
    """A valid-looking PNG header claiming w x h pixels, with a tiny IDAT."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


SEEDS = {"png": _png(16, 16), "rgba": _png(16, 16, "RGBA"), "i16": _png(16, 16, "I;16"), "bomb": _bomb_png(100_000, 100_000),
         "bomb_tall": _bomb_png(10, 2**31 - 1), "tiny": _png(2, 2)}
for fmt in ("JPEG", "GIF", "WEBP", "BMP", "TIFF"):
    b = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(b, fmt)
    SEEDS[fmt.lower()] = b.getvalue()


@st.composite
def image_bytes(draw):
    seed = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    op = draw(st.sampled_from(["none", "flip", "flip", "truncate", "insert", "random"]))
    if op == "random":
        return draw(st.binary(max_size=100))
    if op == "truncate":
        return bytes(seed[: draw(st.integers(0, len(seed)))])
    if op == "insert":
        at = draw(st.integers(0, len(seed)))
        return bytes(seed[:at] + draw(st.binary(max_size=20)) + seed[at:])
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(seed) - 1))
            seed[i] = draw(st.integers(0, 255))
    return bytes(seed)


@settings(max_examples=N["image"], **FUZZ)
@given(blob=image_bytes())
def test_fuzz_images(work, blob):
    path = work / "img.png"
    path.write_bytes(blob)
    try:
        img = open_image(path, max_pixels=4_000_000)
    except ImageProblem as e:
        assert str(e)
        return
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 4_000_000


def test_decompression_bomb_is_refused_before_decoding(work):
    import resource
    import time

    path = work / "bomb.png"
    path.write_bytes(SEEDS["bomb"])
    before, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.process_time()  # CPU time, not the wall clock
    with pytest.raises(ImageProblem, match="too large"):
        open_image(path)
    assert time.process_time() - t < 1 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
