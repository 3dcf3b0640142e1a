"""The Generate tab's clip-skip field and its "load from PNG" (#21): clip skip reaches generate() and the
PNG; loading a PNG fills the fields so that Generate remakes the same pixels and text. Handlers called
directly (the browser test is the lead's); tiny SD1 model on the CPU."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_lora.testing import tiny_pipeline, write_random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the order of load_png's outputs (webui/tabs/generate.py png_fields), then the note
FIELDS = ["model", "prompt", "negative", "seed", "steps", "width", "height", "guidance", "sampler", "rescale", "zero_snr",
          "clip_skip", "compare", "num_images", "add_triggers"]
FIELDS += [f"{part}_{i}" for i in range(1, 5) for part in ("lora", "weight", "te_weight", "block_weights")]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from webui.app import build_app

    ws = tmp_path_factory.mktemp("load_png_ws")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(ws / "models" / "tiny")
    (ws / "loras" / "styles").mkdir(parents=True)
    write_random_lora(ws / "loras" / "styles" / "ink.safetensors", pipe, "sd1", seed=1)
    demo = build_app(ws)
    fns = {f.api_name: f.fn for f in demo.fns.values() if f.api_name in ("generate", "load_png")}
    yield ws, fns["generate"], fns["load_png"]
    demo.sd_lora_context.queue.shutdown()


def _ui_call(ui, f):
    """The generate endpoint called with the fields by name (its positional order)."""
    cells = [f[f"{part}_{i}"] for i in range(1, 5) for part in ("lora", "weight", "te_weight")]
    return ui(f["model"], f["prompt"], f["negative"], f["seed"], f["steps"], f["width"], f["height"], f["guidance"],
              f["compare"], *cells, f["rescale"], f["zero_snr"], f["add_triggers"], "", f["num_images"], f["sampler"],
              *[f[f"block_weights_{i}"] for i in range(1, 5)], f["clip_skip"])


def _png(path):
    with Image.open(path) as im:
        return im.convert("RGB").tobytes(), im.info["parameters"]


def _loaded(load, path) -> tuple[dict, str]:
    *values, note = load(str(path))
    values = [v.get("value") if isinstance(v, dict) else v for v in values]  # gr.update(...) for the model
    assert len(values) == len(FIELDS)
    return dict(zip(FIELDS, values)), note


def test_clip_skip_is_sent_and_load_from_png_remakes_the_image(app):
    ws, ui, load = app
    empty = {"lora": "", "weight": 1.0, "te_weight": None, "block_weights": ""}
    fields = {"model": "models/tiny", "prompt": "a red circle, sharp", "negative": "blurry", "seed": 5, "steps": 2,
              "width": 64, "height": 72, "guidance": 6.5, "sampler": "Euler a", "rescale": None, "zero_snr": False,
              "clip_skip": 2, "compare": False, "num_images": 1, "add_triggers": False,
              "lora_1": "styles/ink", "weight_1": 0.85, "te_weight_1": 0.4, "block_weights_1": "IN04=0",
              **{f"{k}_{i}": v for i in range(2, 5) for k, v in empty.items()}}
    gallery, _ = _ui_call(ui, fields)
    pixels, text = _png(gallery[0][0])
    assert "Clip skip: 2" in text.splitlines()[-1]
    # clip skip really reached the text encoder: 1 (the last layer) is another image, without the field in the text
    last_layer, last_text = _png(_ui_call(ui, {**fields, "clip_skip": 1})[0][0][0])
    assert last_layer != pixels and "Clip skip" not in last_text

    loaded, note = _loaded(load, gallery[0][0])
    assert note == "Loaded the PNG's settings."
    assert {k: loaded[k] for k in ("model", "clip_skip", "sampler", "lora_1", "weight_1", "te_weight_1", "block_weights_1",
                                   "lora_2")} == {"model": "models/tiny", "clip_skip": 2, "sampler": "Euler a",
                                                  "lora_1": "styles/ink", "weight_1": 0.85, "te_weight_1": 0.4,
                                                  "block_weights_1": "IN04=0", "lora_2": ""}
    again, _ = _ui_call(ui, loaded)
    assert _png(again[0][0]) == (pixels, text)  # the same pixels, the same text


def test_load_from_png_reads_a1111s_clip_skip_and_says_what_it_cannot_match(app, tmp_path):
    ws, ui, load = app

    def png(text, name):
        info = PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (64, 64)).save(tmp_path / name, pnginfo=info)
        return tmp_path / name

    a1111 = png("a cat <lora:ink:0.7>\nNegative prompt: dark\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
                "CFG scale: 7, Seed: 9, Size: 512x768, Model hash: 0123456789, Model: v1-5-pruned-emaonly, "
                "Clip skip: 2, Version: v1.10.1", "a1111.png")
    loaded, note = _loaded(load, a1111)
    assert {k: loaded[k] for k in ("prompt", "negative", "seed", "steps", "sampler", "width", "height", "clip_skip",
                                   "lora_1")} == {
        "prompt": "a cat <lora:ink:0.7>", "negative": "dark", "seed": 9, "steps": 20, "sampler": "DPM++ 2M Karras",
        "width": 512, "height": 768, "clip_skip": 2, "lora_1": ""}  # A1111's LoRAs are the prompt's tags
    assert "the model 'v1-5-pruned-emaonly' is not in models/" in note
    ours = png("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny, "
               'LoRAs: "glow:1:1", Version: sd-lora 0', "missing.png")
    with pytest.raises(gr.Error, match="the LoRA 'glow', which is not in loras/"):
        load(str(ours))
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(gr.Error, match="has no `parameters` text"):
        load(str(tmp_path / "bare.png"))


def test_two_images_made_in_the_same_second_are_both_kept(app, monkeypatch):
    import time

    ws, ui, _ = app
    empty = {"lora": "", "weight": 1.0, "te_weight": None, "block_weights": ""}
    fields = {"model": "models/tiny", "prompt": "a red circle", "negative": "", "seed": 1, "steps": 1, "width": 64,
              "height": 64, "guidance": 5.0, "sampler": "", "rescale": None, "zero_snr": False, "clip_skip": 1,
              "compare": False, "num_images": 1, "add_triggers": False, **{f"{k}_{i}": v for i in range(1, 5) for k, v in empty.items()}}
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261201-120000")  # both clicks in one second
    first = _ui_call(ui, fields)[0][0][0]
    second = _ui_call(ui, {**fields, "prompt": "a blue square"})[0][0][0]
    assert first != second and "a red circle" in _png(first)[1] and "a blue square" in _png(second)[1]
