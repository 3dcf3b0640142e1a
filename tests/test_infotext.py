"""A1111 infotext in our PNGs (layout, AutoV2 model hash, A1111's LoRA hashes), reading it back
(`sd-lora generate --from-png` remakes the same pixels), and samplers by their A1111 names.
Tiny SD1 model on the CPU, fixed seeds."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
from PIL import Image

import sd_lora
from sd_lora.cli import main
from sd_lora.formats.metadata import data_sha256
from sd_lora.generation import settings_from_infotext
from sd_lora.infotext import format_infotext, lora_hash, model_hash, parse_infotext
from sd_lora.samplers import SAMPLERS, from_a1111, make_scheduler
from sd_lora.testing import tiny_pipeline, write_random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(steps=2, width=64, height=64, seed=3)
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None

# The example in the docstring of A1111's modules/infotext_utils.py parse_generation_parameters (a fact).
A1111_DOC_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
# A v1.10 line as create_infotext writes it: Schedule type after Sampler, a quoted "Lora hashes".
A1111_V110 = (
    "a cat <lora:ink:0.7>\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "ink: 0123456789ab, glow: ba9876543210", '
    "Version: v1.10.1"
)


def test_parse_reads_a1111s_own_examples():
    res = parse_infotext(A1111_DOC_EXAMPLE)
    assert res["Prompt"].startswith("girl with an artist's beret") and res["Prompt"].endswith("detailed, intricate")
    assert res["Negative prompt"].startswith("ugly, fat") and res["Negative prompt"].endswith("messy drawing")
    assert {k: res[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512",
        "Model hash": "45dee52b"}
    v110 = settings_from_infotext(A1111_V110)
    assert v110["sampler"] == "DPM++ 2M Karras" and (v110["width"], v110["height"]) == (512, 768)
    assert v110["lora_hashes"] == {"ink": "0123456789ab", "glow": "ba9876543210"}
    assert v110["prompt"] == "a cat <lora:ink:0.7>" and v110["negative_prompt"] == "" and v110["loras"] == []


def test_quoting_round_trips_commas_colons_and_newlines():
    # (A1111's key pattern needs two characters or more)
    text = format_infotext("p", "", {"Steps": 2, "Model": "a, b", "Key": "k: v", "Lines": "one\ntwo", "Gone": None})
    assert text == 'p\nSteps: 2, Model: "a, b", Key: "k: v", Lines: "one\\ntwo"'
    res = parse_infotext(text)
    assert (res["Model"], res["Key"], res["Lines"]) == ("a, b", "k: v", "one\ntwo") and "Gone" not in res
    # no parameter line (fewer than 3 pairs): the whole text is the prompt, as in A1111
    assert parse_infotext("just a prompt\nwith: two lines")["Prompt"] == "just a prompt\nwith: two lines"


def test_sampler_names_read_from_a1111_fields():
    assert from_a1111("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert from_a1111("DPM++ 2M", "Automatic") == "DPM++ 2M Karras"  # v1.10's default schedule for DPM++ 2M
    assert from_a1111("DPM++ 2M", "Uniform") == "DPM++ 2M"
    assert from_a1111("DPM++ 2M Karras") == "DPM++ 2M Karras"  # infotexts from before v1.9
    assert from_a1111("DPM++ SDE", "Karras") == "DPM++ SDE Karras"
    assert from_a1111("Euler a", "Automatic") == "Euler a"
    assert from_a1111("DDIMScheduler") is None and from_a1111("DPM adaptive", "Automatic") is None
    for name in SAMPLERS:  # what we write reads back as the same name
        assert from_a1111(SAMPLERS[name].a1111, SAMPLERS[name].schedule) == name


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("infotext_ws")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "models" / "tiny")
    (root / "loras").mkdir()
    write_random_lora(root / "loras" / "ink.safetensors", pipe, seed=1, metadata={"ss_network_module": "networks.lora"})
    write_random_lora(root / "loras" / "glow.safetensors", pipe, seed=2)
    return root


def test_hashes_are_the_ones_a1111_and_civitai_use(ws, tmp_path):
    ink = ws / "loras" / "ink.safetensors"
    # Lora hashes: 12 hex of the tensor bytes' sha256 (the addnet hash = a correct sshs_model_hash)
    assert lora_hash(ink) == data_sha256(ink)[:12]
    data = ink.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(ink) == hashlib.sha256(data[8 + n:]).hexdigest()[:12] != hashlib.sha256(data).hexdigest()[:12]
    # Model hash (AutoV2) of a single file: 10 hex of the whole file's sha256
    single = tmp_path / "base.safetensors"
    single.write_bytes(data)
    assert model_hash(single) == hashlib.sha256(data).hexdigest()[:10]
    # a diffusers folder: changes with any weight file
    folder = model_hash(ws / "models" / "tiny")
    assert len(folder) == 10 and int(folder, 16) >= 0
    copy = tmp_path / "tiny"
    import shutil

    shutil.copytree(ws / "models" / "tiny", copy)
    assert model_hash(copy) == folder
    vae_file = next((copy / "vae").glob("*.safetensors"))
    vae_file.write_bytes(vae_file.read_bytes()[:-4] + b"\0\0\0\1")
    assert model_hash(copy) != folder


def test_png_text_has_a1111s_layout_and_hashes(ws):
    ink = ws / "loras" / "ink.safetensors"
    result = sd_lora.generate(ws / "models" / "tiny", "a red circle <lora:glow:0.5:0.8>", [(ink, 0.85, 0.4)],
                              negative_prompt="blurry", sampler="DPM++ 2M Karras", lora_dir=ws / "loras", **COMMON)
    text = result.images[0].parameters
    prompt, negative, pairs = text.split("\n")
    assert prompt == "a red circle <lora:glow:0.5:0.8>" and negative == "Negative prompt: blurry"
    h = model_hash(ws / "models" / "tiny")
    glow = lora_hash(ws / "loras" / "glow.safetensors")
    assert pairs == (
        f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 3, Size: 64x64, Model hash: {h}, "
        f'Model: tiny, Lora hashes: "ink: {lora_hash(ink)}, glow: {glow}", LoRAs: "ink:0.85:0.4 glow:0.8:0.5", '
        f"Version: sd-lora {sd_lora.__version__}")
    back = settings_from_infotext(text)
    assert back["loras"] == [("ink", 0.85, 0.4), ("glow", 0.8, 0.5)] and back["sampler"] == "DPM++ 2M Karras"
    # a slider's 0.05 steps give weights like 0.8500000000000001: written in full, read back exactly
    odd = sd_lora.generate(ws / "models" / "tiny", "a red circle", [(ink, 0.05 * 17, 0.1 + 0.2)], guidance_rescale=0.1 + 0.2,
                           **COMMON).images[0].parameters
    assert settings_from_infotext(odd)["loras"] == [("ink", 0.05 * 17, 0.1 + 0.2)] and 0.05 * 17 != 0.85
    assert settings_from_infotext(odd)["guidance_rescale"] == 0.1 + 0.2
    # the model's own scheduler: named by its class; no empty Negative prompt line
    plain = sd_lora.generate(ws / "models" / "tiny", "a red circle", **COMMON).images[0].parameters
    assert plain.splitlines()[1].startswith("Steps: 2, Sampler: DDIMScheduler, CFG scale: 7.0, Seed: 3, Size: 64x64")
    assert "LoRAs" not in plain and "Lora hashes" not in plain and len(plain.splitlines()) == 2


def _png(path):
    im = Image.open(path)
    return im.convert("RGB").tobytes(), im.info["parameters"]


def test_from_png_remakes_the_same_pixels(ws, tmp_path, caplog):
    ink = ws / "loras" / "ink.safetensors"
    first = tmp_path / "first.png"
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--prompt", "a red circle <lora:glow:0.5:0.8>", "--lora", f"{ink}:0.85:0.4", "--negative-prompt", "blurry",
                 "--sampler", "Euler a", "--seed", "11", "--steps", "3", "--guidance", "6.5", "--width", "64",
                 "--height", "72", "--out", str(first)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--from-png", str(first), "--out", str(again)]) == 0
    (pixels, text), (pixels2, text2) = _png(first), _png(again)
    assert pixels == pixels2 and text == text2 and "Warning" not in caplog.text
    # the PNG's values really were used: another seed on top of them is another image
    other = tmp_path / "other.png"
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--from-png", str(first), "--seed", "12", "--out", str(other)]) == 0
    assert _png(other)[0] != pixels and "Seed: 12" in _png(other)[1] and "Sampler: Euler a" in _png(other)[1]


def test_from_png_says_what_is_missing(ws, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora", str(ws / "loras" / "ink.safetensors"),
                 "--prompt", "a red circle", "--steps", "1", "--width", "64", "--height", "64", "--out", str(first)]) == 0
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--from-png", str(first), "--out", str(tmp_path / "x.png")]) == 1
    assert "pass --lora-dir" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--from-png", str(tmp_path / "bare.png"),
                 "--out", str(tmp_path / "y.png")]) == 1
    assert "has no `parameters` text" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora", str(ws / "loras" / "ink.safetensors"),
                 "--prompt", "a red circle", "--steps", "1", "--width", "64", "--height", "64", "--grid", "0,1",
                 "--out", str(grid)]) == 0
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--from-png", str(grid), "--out", str(tmp_path / "z.png")]) == 1
    assert "is a grid (0 | 1); remake it with its own flags" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_runs_on_the_tiny_base(ws, name):
    pipe = sd_lora.load_base(ws / "models" / "tiny")
    own = pipe.scheduler
    needs = SAMPLERS[name].needs
    if needs and importlib.util.find_spec(needs) is None:
        with pytest.raises(ValueError, match=f"needs the '{needs}' package.*pip install {needs}"):
            sd_lora.generate(pipe, "a red circle", sampler=name, **COMMON)
        return
    result = sd_lora.generate(pipe, "a red circle", sampler=name, **COMMON)
    assert result.images[0].image.size == (64, 64) and pipe.scheduler is own  # the model's scheduler put back
    assert f"Sampler: {SAMPLERS[name].a1111}, Schedule type: {SAMPLERS[name].schedule}," in result.images[0].parameters


def test_sampler_options_are_set(ws):
    own = sd_lora.load_base(ws / "models" / "tiny").scheduler
    karras = make_scheduler("DPM++ 2M Karras", own)
    assert type(karras).__name__ == "DPMSolverMultistepScheduler" and karras.config.use_karras_sigmas
    assert karras.config.algorithm_type == "dpmsolver++" and karras.config.solver_order == 2
    assert not make_scheduler("DPM++ 2M", own).config.use_karras_sigmas
    assert type(make_scheduler("Euler a", own)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("Euler", own).config.beta_schedule == own.config.beta_schedule  # the model's betas kept
    if HAS_TORCHSDE:
        assert make_scheduler("DPM++ SDE Karras", own).config.use_karras_sigmas


def test_an_unknown_sampler_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="sampler 'Euler A': use one of 'Euler', 'Euler a'"):
        sd_lora.generate(tmp_path / "nothing", "a cat", sampler="Euler A")


def test_from_png_reads_an_a1111_infotext_with_prompt_tags(ws, tmp_path):
    text = ("a red circle <lora:ink:0.7>\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 3, "
            "Size: 64x64, Model hash: 0123456789, Model: tiny, Version: v1.10.1")
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--from-png", str(tmp_path / "a1111.png"), "--out", str(tmp_path / "remade.png")]) == 0
    # A1111's "Automatic" schedule for DPM++ 2M is Karras; the tag's LoRA is applied
    direct = sd_lora.generate(ws / "models" / "tiny", "a red circle <lora:ink:0.7>", sampler="DPM++ 2M Karras",
                              guidance=7.0, lora_dir=ws / "loras", **COMMON).images[0]
    pixels, remade = _png(tmp_path / "remade.png")
    assert pixels == direct.image.convert("RGB").tobytes() and remade == direct.parameters


def test_the_web_ui_sampler_dropdown_writes_the_same_png_as_the_cli(ws, tmp_path):
    from webui.app import build_app

    demo = build_app(ws)
    try:
        (ui,) = [f.fn for f in demo.fns.values() if f.api_name == "generate"]
        cells = ["", 1.0, None] * 4
        gallery, _ = ui("models/tiny", "a red circle", "", 3, 2, 64, 64, 7.0, False, *cells,
                        None, False, False, "", 1, "Euler a")
    finally:
        demo.sd_lora_context.queue.shutdown()
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--prompt", "a red circle", "--sampler", "Euler a",
                 "--seed", "3", "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "c.png")]) == 0
    ui_pixels, ui_text = _png(gallery[0][0])
    assert (ui_pixels, ui_text) == _png(tmp_path / "c.png") and "Sampler: Euler a, Schedule type: Automatic" in ui_text
