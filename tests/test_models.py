"""Foundation: offline base-model loading, architecture detection, single-file conversion, safe reading.

Everything runs on tiny pipelines (or full-size models on the meta device, which have names and
shapes but no data), so the whole file takes seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import torch

from sd_lora.cli import build_parser, main
from sd_lora.convert_single_file import (
    V_PRED_KEY,
    components_to_single_file_state_dict,
    pipeline_to_single_file_state_dict,
    save_single_file,
)
from sd_lora.io import CheckpointError, read_safetensors_header
from sd_lora.models import (
    ModelLoadError,
    _checkpoint_shapes,
    architecture_of,
    detect_architecture,
    load_base,
    shipped_config_dir,
    shipped_tokenizer,
)
from sd_lora.testing import assert_same_tensors, full_size_text_encoders, full_size_unet, tiny_pipeline

REFUSED = (CheckpointError, ModelLoadError)


def image(pipe, seed: int = 0):
    # One step at 32 px is enough to run every component (text encoders, UNet, scheduler, VAE decoder).
    out = pipe("a red circle", num_inference_steps=1, height=32, width=32, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return torch.from_numpy(out.images)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per architecture: (tiny pipeline, its diffusers folder, its single file), built once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            pipe = tiny_pipeline(arch)
            pipe.save_pretrained(root / "diffusers")
            save_single_file(pipe, root / "model.safetensors")
            cache[arch] = (pipe, root / "diffusers", root / "model.safetensors")
        return cache[arch]

    return get


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_folder_and_single_file_give_the_same_image(saved, arch):
    pipe, folder, file = saved(arch)
    from_folder = load_base(folder)
    from_file = load_base(file, config_from=folder)
    assert architecture_of(from_folder).arch == arch
    assert architecture_of(from_file).arch == arch
    assert (image(from_file) - image(from_folder)).abs().max() < 1e-4
    # Not just close: every weight survives the trip to the original layout and back bit for bit
    # (so both images are also the original pipeline's image).
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        assert_same_tensors(getattr(pipe, name).state_dict(), getattr(from_file, name).state_dict(), name)


def test_random_weights_from_a_folder_keep_its_tokenizers(saved):
    # transformers 5 saves tokenizer.json only; the folder's own (tiny) tokenizer must be used, not
    # swapped for the 49,408-token shipped one, which would not fit the tiny text encoders.
    pipe, folder, _ = saved("sdxl")
    rebuilt = load_base(folder, random_weights=True, seed=1)
    assert len(rebuilt.tokenizer) == len(rebuilt.tokenizer_2) == len(pipe.tokenizer) < 49408
    assert rebuilt.unet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    assert not torch.equal(rebuilt.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert torch.isfinite(image(rebuilt)).all()


def test_single_file_records_v_prediction_and_detection_reads_it(saved):
    _, _, v_file = saved("sd2-v")
    _, eps_folder, eps_file = saved("sd2")
    assert V_PRED_KEY in read_safetensors_header(v_file)[0]
    assert detect_architecture(_checkpoint_shapes(v_file)) == "sd2-v"
    assert detect_architecture(_checkpoint_shapes(eps_file)) == "sd2"
    # An SD2 file without the marker can be told to load as v-prediction.
    pipe = load_base(eps_file, config_from=eps_folder, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert architecture_of(pipe).arch == "sd2-v"


def test_save_single_file_casts_dtype_without_touching_the_pipeline(saved, tmp_path):
    pipe, _, _ = saved("sd1")
    path = tmp_path / "half.safetensors"
    save_single_file(pipe, path, dtype=torch.float16)
    header, _ = read_safetensors_header(path)
    assert {v["dtype"] for v in header.values()} == {"F16"}
    assert pipe.unet.conv_in.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    assert not (tmp_path / "model.ckpt").exists()


def test_plain_tensor_ckpt_loads(saved, tmp_path):
    # A .ckpt that holds only tensors is read with torch.load(weights_only=True) and works.
    pipe, folder, _ = saved("sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_single_file_state_dict(pipe)}, path)
    loaded = load_base(path, config_from=folder)
    assert torch.equal(loaded.unet.conv_out.weight, pipe.unet.conv_out.weight)


# ------------------------------------------------------------- full-size architectures (meta)

# Names and shapes from the released checkpoints (v1-5-pruned, v2-1_768-ema-pruned, sd_xl_base_1.0).
KNOWN_ORIGINAL_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    },
}
# Parameter counts per component in those files (SD1.5 also stores position_ids, SDXL logit_scale; not weights).
KNOWN_COUNTS = {"sd1": (686, 248), "sd2": (686, 248), "sdxl": (1680, 248)}


@pytest.fixture(scope="module")
def full_size():
    from diffusers import AutoencoderKL

    cache = {}

    def get(arch):
        if arch not in cache:
            with torch.device("meta"):
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(shipped_config_dir(arch), subfolder="vae"))
            cache[arch] = (full_size_unet(arch), vae, full_size_text_encoders(arch))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_original_key_sets(full_size, arch):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    unet, vae, encoders = full_size(arch)
    sd = components_to_single_file_state_dict(arch, unet.state_dict(), vae.state_dict(), [e.state_dict() for e in encoders])
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert detect_architecture(shapes) == arch
    assert detect_architecture({**shapes, V_PRED_KEY: (0,)}) == ("sd2-v" if arch == "sd2" else arch)
    for key, shape in KNOWN_ORIGINAL_KEYS[arch].items():
        assert shapes.get(key) == shape, key
    n_unet, n_vae = KNOWN_COUNTS[arch]
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == n_unet
    assert sum(k.startswith("first_stage_model.") for k in sd) == n_vae
    # diffusers' own single-file reader recognises the file and maps it back to the same names and shapes.
    assert infer_diffusers_model_type(sd) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[arch]
    for back, model in ((convert_ldm_unet_checkpoint(sd, unet.config), unet), (convert_ldm_vae_checkpoint(sd, vae.config), vae)):
        ref = model.state_dict()
        assert back.keys() == ref.keys()
        assert all(back[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_diffusers_key_sets(full_size, arch):
    unet, _, _ = full_size(arch)
    assert detect_architecture({k: tuple(v.shape) for k, v in unet.state_dict().items()}) == arch
    assert architecture_of(unet).arch == arch


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_checkpoint_names_agree_with_kohya_lora_names(full_size, arch):
    # kohya's SDXL LoRA names use the same SGM block names as the checkpoint; the merge tool relies on
    # the two mappings (written separately) agreeing for every UNet parameter.
    from sd_lora.convert_single_file import unet_key_map
    from sd_lora.network.naming import unet_diffusers_to_sgm, unet_layout

    unet, _, _ = full_size(arch)
    layout = unet_layout(unet)
    for key, original in unet_key_map(unet.state_dict().keys()).items():
        module, param = key.rsplit(".", 1)
        assert original == f"{unet_diffusers_to_sgm(module, **layout)}.{param}", key


def test_detect_architecture_rejects_other_models():
    with pytest.raises(ModelLoadError, match="could not recognise"):
        detect_architecture({"transformer_blocks.0.attn.to_q.weight": (64, 64)})


# ------------------------------------------------------------------------- safety and errors


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_ckpt_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1), "x": _Payload(marker)}}, path)
    for load in (lambda: load_base(path), lambda: _checkpoint_shapes(path)):
        with pytest.raises(REFUSED, match="refused") as err:
            load()
        assert str(path) in str(err.value)
        assert not marker.exists()
    # The payload is live: an unrestricted unpickle runs it (proves the test above can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_safetensors_error_names_the_file(saved, tmp_path, capsys):
    _, _, good = saved("sd1")
    data = good.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) * 2 // 3])
    for load in (lambda: load_base(path), lambda: read_safetensors_header(path)):
        with pytest.raises(REFUSED, match="truncated") as err:
            load()
        assert str(path) in str(err.value)
    # The CLI prints the same message, without a traceback, and exits 1.
    assert main(["model-info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and str(path) in err and "Traceback" not in err


def test_header_length_bomb_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    t = time.process_time()  # CPU time: a loaded machine does not stretch it
    with pytest.raises(CheckpointError, match="damaged or truncated") as err:
        read_safetensors_header(path)
    assert time.process_time() - t < 1
    assert str(path) in str(err.value)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_base(tiny)


def test_missing_model_index_names_the_file(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        load_base(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_base(tmp_path / "missing.safetensors")


def test_missing_tokenizer_or_config_names_the_file(saved, tmp_path):
    _, folder, file = saved("sd1")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer")
    (broken / "tokenizer").mkdir()
    with pytest.raises(ModelLoadError, match=r"tokenizer/tokenizer\.json") as err:
        load_base(broken)
    assert str(broken) in str(err.value)
    # Same folder as config_from for a single file: an incomplete tokenizer is reported, not guessed at.
    with pytest.raises(ModelLoadError, match=r"tokenizer/tokenizer\.json"):
        load_base(file, config_from=broken)
    # Without a tokenizer folder at all, the CLIP tokenizer shipped with sd-lora is used instead.
    shutil.rmtree(broken / "tokenizer")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"unet/config\.json"):
        load_base(file, config_from=broken)


def test_single_file_with_missing_tokenizer_uses_the_shipped_one(saved, tmp_path):
    _, folder, file = saved("sd1")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(folder, no_tok, ignore=shutil.ignore_patterns("tokenizer"))
    pipe = load_base(file, config_from=no_tok)
    assert len(pipe.tokenizer) == 49408


# ------------------------------------------------------------------------- CLI and helpers


def test_model_info_cli(saved, capsys):
    _, folder, file = saved("sdxl")
    assert main(["model-info", str(file)]) == 0
    out = capsys.readouterr().out
    assert "architecture: sdxl" in out and str(file) in out
    assert main(["model-info", "--json", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "sdxl" and info["prediction_type"] == "epsilon"
    assert main(["model-info", str(folder.parent / "nothing-here")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "model-info" in sub.choices
    for name in sub.choices:
        assert name in out


def test_tiny_pipelines_build_fast():
    tiny_pipeline("sdxl")  # first call pays one-off import and tokenizer set-up costs
    for arch in ("sd1", "sd2", "sd2-v", "sdxl"):
        # this process's CPU time, not the wall clock: other processes on a loaded CI box (two pytest
        # workers, a browser) stretched the wall time of a 0.3 s build past the bound
        t = time.process_time()
        pipe = tiny_pipeline(arch)
        assert time.process_time() - t < 1.0, arch
        assert architecture_of(pipe).arch == arch


def test_shipped_clip_tokenizer_gives_the_real_ids():
    tok = shipped_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_single_file_refuses_pipelines_with_injected_adapters(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="fuse them"):
        save_single_file(pipe, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_reload_in_dtype_reads_each_weight_once_in_the_new_dtype(saved, tmp_path):
    """Frozen weights read straight into bf16 equal the loaded fp32 weights converted; a single-file
    model (other key names) is left as it was; a truncated file is an error naming it."""
    from sd_lora.io import CheckpointError, stream_safetensors
    from sd_lora.models import reload_in_dtype

    _, folder, single = saved("sdxl")
    pipe, reference = load_base(folder), load_base(folder)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert reload_in_dtype(getattr(pipe, name), torch.bfloat16), name
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys()
        for k in got:
            expected = want[k].to(torch.bfloat16) if want[k].is_floating_point() else want[k]
            assert got[k].dtype == expected.dtype and torch.equal(got[k], expected), (name, k)

    from_file = load_base(single, config_from=folder)
    assert not reload_in_dtype(from_file.unet, torch.bfloat16)
    assert from_file.unet.conv_in.weight.dtype == torch.float32

    weights = next((folder / "unet").glob("*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        list(stream_safetensors(cut))
