"""`sd_lora.generate`: one set of rules behind the CLI and the web UI (same images, same PNG text, same
errors for the same inputs), and the API's own promises (the pipeline is put back, seeds, sweeps,
comparisons, validation before loading). Tiny SD1 / SD2-v models on the CPU, fixed seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import sd_lora
from sd_lora.cli import main
from sd_lora.stack import applied_stack
from sd_lora.testing import tiny_pipeline, write_random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(steps=2, width=64, height=64, seed=3)


def _trigger_meta(word: str) -> dict[str, str]:
    return {"ss_network_module": "networks.lora", "ss_tag_frequency": json.dumps({"1_x": {word: 5, "shape": 1}})}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A web UI workspace: the tiny SD1 model, an SD2-v one, and two LoRAs with trigger words."""
    root = tmp_path_factory.mktemp("gen_ws")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "models" / "tiny")
    tiny_pipeline("sd2-v").save_pretrained(root / "models" / "tiny-v")
    (root / "loras").mkdir()
    write_random_lora(root / "loras" / "ink.safetensors", pipe, seed=1, metadata=_trigger_meta("inkstyle"))
    write_random_lora(root / "loras" / "glow.safetensors", pipe, seed=2, metadata=_trigger_meta("glowstyle"))
    return root


@pytest.fixture(scope="module")
def app(ws):
    from webui.app import build_app

    demo = build_app(ws)
    yield demo
    demo.sd_lora_context.queue.shutdown()


@pytest.fixture(scope="module")
def ui(app):
    """The Generate tab's handler, as Gradio calls it (inputs in the order of the tab's `inputs`)."""
    (fn,) = [f.fn for f in app.fns.values() if f.api_name == "generate"]
    return fn


def ui_call(ui, model="models/tiny", prompt="a red circle", negative="", seed=3, steps=2, width=64, height=64,
            guidance=7.0, compare=False, rows=(), rescale=None, zero_snr=False, add_triggers=False, vae="", num_images=1):
    cells = []
    for i in range(4):
        cells += list(rows[i]) if i < len(rows) else ["", 1.0, None]
    return ui(model, prompt, negative, seed, steps, width, height, guidance, compare, *cells,
              rescale, zero_snr, add_triggers, vae, num_images)


def cli_call(ws, out: Path, *extra: str) -> int:
    return main(["generate", "--lora-dir", str(ws / "loras"), "--out", str(out), *extra])


def png(path) -> tuple[bytes, str]:
    im = Image.open(path)
    return im.convert("RGB").tobytes(), im.info["parameters"]


def test_cli_and_web_ui_give_the_same_images_and_png_text(ws, ui, tmp_path):
    prompt = "a red circle <lora:glow:0.5:0.8>"
    out, info = ui_call(ui, prompt=prompt, negative="blurry", guidance=5.0, rows=[("ink", 0.9, 0.4)],
                        add_triggers=True, num_images=2)
    assert cli_call(ws, tmp_path / "c.png", "--model", str(ws / "models" / "tiny"), "--prompt", prompt,
                    "--negative-prompt", "blurry", "--guidance", "5", "--lora", f"{ws / 'loras' / 'ink.safetensors'}:0.9:0.4",
                    "--add-triggers", "--num-images", "2", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64") == 0
    assert len(out) == 2
    for (path, caption), seed in zip(out, (3, 4)):
        ui_pixels, ui_text = png(path)
        cli_pixels, cli_text = png(tmp_path / f"c-{seed}.png")
        assert ui_pixels == cli_pixels and ui_text == cli_text
        assert caption == f"stack, seed {seed}"
    # the one parameters text: trigger words added in front of the prompt as written (tags kept), both LoRAs
    assert ui_text.splitlines()[0] == "inkstyle, shape, glowstyle, a red circle <lora:glow:0.5:0.8>"
    # (A1111's infotext layout since issue #21: Size and Model hash between Seed and Model, a quoted LoRAs value)
    assert "Seed: 4, Size: 64x64, Model hash: " in ui_text and ", Model: tiny, Lora hashes: " in ui_text
    assert 'LoRAs: "ink:0.9:0.4 glow:0.8:0.5"' in ui_text and "CFG scale: 5.0" in ui_text
    assert "Trigger words: inkstyle, shape, glowstyle (added to the prompt)" in info
    # the same call without the trigger words is a different image: they reached the text encoder
    plain, _ = ui_call(ui, prompt=prompt, negative="blurry", guidance=5.0, rows=[("ink", 0.9, 0.4)])
    assert png(plain[0][0])[0] != png(out[0][0])[0]


def test_cli_and_web_ui_share_the_guidance_rescale_default(ws, ui, tmp_path):
    """Zero terminal SNR without a guidance rescale: 0.7 from both front-ends (the UI once used 0)."""
    out, _ = ui_call(ui, model="models/tiny-v", zero_snr=True)
    assert cli_call(ws, tmp_path / "z.png", "--model", str(ws / "models" / "tiny-v"), "--prompt", "a red circle",
                    "--zero-terminal-snr", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64") == 0
    assert png(out[0][0]) == png(tmp_path / "z.png")
    assert "Guidance rescale: 0.7, Zero terminal SNR: True" in png(tmp_path / "z.png")[1]


@pytest.mark.parametrize("flag, ui_kw, message", [
    ("--width=100", {"width": 100}, "width 100: must be a multiple of 8, at least 64"),
    ("--height=56", {"height": 56}, "height 56: must be a multiple of 8, at least 64"),
    ("--steps=0", {"steps": 0}, "steps 0: must be a whole number from 1 to 1000"),
    ("--steps=1001", {"steps": 1001}, "steps 1001: must be a whole number from 1 to 1000"),
    ("--guidance-rescale=1.5", {"rescale": 1.5}, "guidance rescale 1.5: must be between 0 and 1"),
    ("--num-images=0", {"num_images": 0}, "number of images 0: must be a whole number, at least 1"),
])
def test_cli_and_web_ui_refuse_the_same_inputs_with_the_same_message(ws, app, ui, tmp_path, capsys, monkeypatch,
                                                                     flag, ui_kw, message):
    import sd_lora.generation

    # both must refuse before loading a model
    monkeypatch.setattr(sd_lora.generation, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for bad inputs"))
    app.sd_lora_context.extra.pop("pipe", None)
    assert cli_call(ws, tmp_path / "x.png", "--model", str(ws / "models" / "tiny"), "--prompt", "a red circle", flag) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    with pytest.raises(gr.Error, match=message):
        ui_call(ui, **ui_kw)


def test_sweep_and_comparison_are_the_single_stack_images(ws, ui, tmp_path):
    """A CLI weight sweep and a UI comparison are several stacks with the same seed: each column is the
    image a plain call with that stack gives."""
    ink = str(ws / "loras" / "ink.safetensors")
    assert cli_call(ws, tmp_path / "g.png", "--model", str(ws / "models" / "tiny"), "--prompt", "a red circle",
                    "--lora", f"{ink}:0.8", "--grid=0,0.8", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64") == 0
    compared, _ = ui_call(ui, compare=True, rows=[("ink", 0.8, None), ("glow", 0.5, None)])
    assert [c for _, c in compared] == ["base", "ink", "glow", "stack"]
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    assert "Grid: 0 | 0.8" in Image.open(tmp_path / "g.png").info["parameters"]
    top = grid.height - 4 - 64
    columns = [grid.crop((4 + i * 68, top, 68 + i * 68, top + 64)).tobytes() for i in range(2)]
    assert columns[0] == png(compared[0][0])[0]  # weight 0: the base
    assert columns[1] == png(compared[1][0])[0]  # weight 0.8: ink alone at 0.8
    stack, _ = ui_call(ui, rows=[("ink", 0.8, None), ("glow", 0.5, None)])
    assert png(stack[0][0])[0] == png(compared[3][0])[0]


# ---- the Python API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_and_files(ws):
    pipe = sd_lora.load_base(ws / "models" / "tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe, ws / "loras" / "ink.safetensors", ws / "loras" / "glow.safetensors"


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_a_loaded_pipeline_gets_back_its_stack_scheduler_and_vae(ws, pipe_and_files):
    pipe, ink, glow = pipe_and_files
    sd_lora.apply_loras(pipe, [(ink, 0.5)])
    before, scheduler, vae = _weights(pipe), pipe.scheduler, pipe.vae
    result = sd_lora.generate(pipe, "a red circle", [(glow, 1.0)], vae=ws / "models" / "tiny", **COMMON)
    assert pipe.scheduler is scheduler and pipe.vae is vae
    assert [s.path for s in applied_stack(pipe)] == [ink]
    after = _weights(pipe)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert result.images[0].settings["vae"] == "tiny" and "VAE: tiny" in result.images[0].parameters
    # keep_loras leaves this call's stack fused (the UI's fast switching)
    sd_lora.generate(pipe, "a red circle", [(glow, 1.0)], keep_loras=True, **COMMON)
    assert [s.path for s in applied_stack(pipe)] == [glow]
    sd_lora.remove_loras(pipe)
    assert not applied_stack(pipe)


def test_image_i_is_the_image_of_seed_plus_i(pipe_and_files):
    pipe, ink, _ = pipe_and_files
    three = sd_lora.generate(pipe, "a red circle", [(ink, 1.0)], num_images=3, **COMMON)
    assert [im.settings["seed"] for im in three.images] == [3, 4, 5]
    alone = sd_lora.generate(pipe, "a red circle", [(ink, 1.0)], **{**COMMON, "seed": 5})
    assert np.array_equal(np.asarray(three.images[2].image), np.asarray(alone.images[0].image))
    assert three.images[2].parameters == alone.images[0].parameters
    assert json.loads(json.dumps(alone.images[0].settings)) == alone.images[0].settings  # plain values
    assert not np.array_equal(np.asarray(three.images[0].image), np.asarray(three.images[1].image))


def test_comparison_prompts_are_the_same_for_every_variant(pipe_and_files):
    pipe, ink, glow = pipe_and_files
    result = sd_lora.generate(pipe, "a red circle", [(ink, 1.0), (glow, 0.0)], compare=True, add_trigger_words=True,
                              num_images=2, **COMMON)
    assert result.labels == ["base", "ink", "glow", "stack"] and len(result.images) == 8
    assert result.trigger_words == ["inkstyle", "shape"]  # glow is at weight 0 everywhere: none of its words
    assert {im.settings["encoded_prompt"] for im in result.images} == {"inkstyle, shape, a red circle"}
    assert [im.settings["loras"] for im in result.images[:2]] == [[], []]
    from sd_lora.stack.grid import label_grid

    line = label_grid([result.images[0].image], ["x"]).height - 64 - 4  # one label line
    grid = result.grid()  # 4 columns (variants) x 2 rows (seeds), each with a label line, and a title line
    assert grid.size == (4 + 4 * 68, 3 * line + 2 * 68)


def test_prompt_tags_and_trigger_words(ws, pipe_and_files):
    pipe, ink, _ = pipe_and_files
    result = sd_lora.generate(pipe, "<lora:ink:0.7>", lora_dir=ws / "loras", add_trigger_words=True, **COMMON)
    (im,) = result.images
    assert im.settings["encoded_prompt"] == "inkstyle, shape"  # the tag is not encoded, nor an empty part
    assert im.settings["prompt"] == "inkstyle, shape, <lora:ink:0.7>"  # the PNG keeps the prompt as written
    assert [(s.path, s.unet_weight) for s in result.stack] == [(ink, 0.7)]
    with pytest.raises(ValueError, match="no LoRA folder was given"):
        sd_lora.generate(pipe, "a cat <lora:ink:1>", **COMMON)


def test_bad_arguments_are_all_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    import sd_lora.generation as generation

    monkeypatch.setattr(generation, "load_pipeline", lambda *a, **k: pytest.fail("loaded despite bad arguments"))
    with pytest.raises(ValueError) as info:
        sd_lora.generate(tmp_path / "missing", " ", width=65, steps=2.5, seed=-1, guidance=float("nan"), dtype="fp8",
                         sweep_weights=[], compare=True)
    text = str(info.value)
    for part in ("prompt: empty", "width 65:", "steps 2.5:", "seed -1:", "guidance nan:", "dtype 'fp8'",
                 "weight sweep and compare: choose one", "weight sweep []", "base model"):
        assert part in text, part
    with pytest.raises(ValueError, match="weight sweep: it sweeps the first LoRA"):
        sd_lora.generate(tmp_path, "a cat", sweep_weights=[0, 1])
    pipe = tiny_pipeline("sd1")
    with pytest.raises(ValueError, match="dtype, device: only for a model path"):
        sd_lora.generate(pipe, "a cat", dtype="fp16", device="cpu")


def test_label_grid_rows():
    from sd_lora.stack.grid import label_grid

    cells = [Image.new("RGB", (16, 8), c) for c in ("red", "green", "blue", "black", "white")]
    one_row = label_grid(cells[:2], ["a", "b"])
    grid = label_grid(cells, list("abcde"), columns=2)
    assert grid.width == 2 * (16 + 4) + 4 and grid.height == 3 * one_row.height
    top = one_row.height  # the second row starts one row's height down
    assert grid.getpixel((4 + 20 + 1, top + one_row.height - 4 - 8 + 1)) == (0, 0, 0)  # "black": row 2, column 2


def test_command_module_imports_no_torch():
    """`sd-lora --help` imports the generate command, which reads generate()'s defaults from
    sd_lora.generation: neither may load torch (once `import sd_lora` itself is lazy)."""
    code = "import sys, sd_lora; print('torch' in sys.modules)"
    if subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True":
        pytest.skip("`import sd_lora` still loads torch eagerly (the lazy public API lands separately)")
    code = "import sys, sd_lora.commands.generate, sd_lora.generation; print(sorted({'torch', 'diffusers', 'PIL'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_small_unet_on_the_cpu_runs_on_one_thread_and_the_count_is_put_back(pipe_and_files):
    """Slow start (issue #20): torch's default threads made a 64 px tiny-base image take 12-86 s on a
    busy 2-core box instead of 2-4 s. generate() runs a small UNet on one thread, then restores the count."""
    from sd_lora.generation import generation_threads
    from sd_lora.testing import full_size_unet

    pipe, _, _ = pipe_and_files
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        sd_lora.generate(pipe, "a red circle", **COMMON)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        sd_lora.generate(pipe, "a red circle", cpu_threads=2, **COMMON)  # an explicit count wins
        assert set(seen) == {2}
    finally:
        hook.remove()
        torch.set_num_threads(1)
    assert generation_threads(pipe) == 1

    class FullSize:  # a full-size SD1 UNet (no storage) on the CPU keeps torch's own count
        unet, device = full_size_unet(), torch.device("cpu")

    assert generation_threads(FullSize()) is None
    with pytest.raises(ValueError, match="cpu threads 0: must be a whole number, at least 1"):
        sd_lora.generate(pipe, "a red circle", cpu_threads=0, **COMMON)


def test_sd_lora_generate_runs_without_bitsandbytes_and_main_from_python_keeps_it(ws, tmp_path):
    """Slow start (issue #20): as its own process `sd-lora generate` does without bitsandbytes (which
    diffusers imports, and with it torch's compiler stack, when it is installed); main([...]) called
    from Python leaves this process alone (the web UI and training need bitsandbytes)."""
    import importlib.util

    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed here")
    out = tmp_path / "p.png"
    argv = ["sd-lora", "generate", "--model", str(ws / "models" / "tiny"), "--prompt", "a red circle",
            "--steps", "1", "--width", "64", "--height", "64", "--out", str(out)]
    code = (f"import sys; sys.argv = {argv!r}\nfrom sd_lora.cli import main\nrc = main()\n"
            "print(rc, sys.modules.get('bitsandbytes', 'not imported'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.stdout.split() == ["0", "None"], run.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
    assert cli_call(ws, tmp_path / "q.png", "--model", str(ws / "models" / "tiny"), "--prompt", "a red circle",
                    "--steps", "1", "--width", "64", "--height", "64") == 0
    assert importlib.util.find_spec("bitsandbytes") is not None


# ---- the web UI's Generate tab: messages that stay, a symlinked model -----------------------------------


@pytest.fixture(scope="module")
def on_page(app):
    """The Generate button's handler (the page's; the API endpoint `generate` raises instead)."""
    (fn,) = [f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "generate_on_page"]
    return fn


def test_a_generate_error_stays_on_the_page_until_the_next_click(app, ui, on_page):
    """Messages (issue #20): a toast vanishes in seconds; the error goes into the box under the button."""
    cells = ["", 1.0, None] * 4
    args = ["models/tiny", "a red circle <lora:nosuch:1>", "", 3, 2, 64, 64, 7.0, False, *cells, None, False, False, "", 1]
    gallery, info, error = on_page(*args)
    assert error["visible"] is True and "no LoRA named &#x27;nosuch&#x27;" in error["value"]
    assert gallery == {"__type__": "update"} and info == {"__type__": "update"}  # the last images stay
    # the box is a component of the page, among the outputs of the button's event
    (event,) = [f for f in app.fns.values() if f.fn is on_page]
    assert event.outputs[2].elem_id == "generate-error" and isinstance(event.outputs[2], gr.HTML)
    args[1] = "a red circle"
    gallery, info, error = on_page(*args)
    assert len(gallery) == 1 and info.startswith("LoRAs: none") and error == {"__type__": "update", "value": "", "visible": False}
    with pytest.raises(gr.Error, match="no LoRA named"):  # API callers still get the error raised
        ui_call(ui, prompt="a red circle <lora:nosuch:1>")


def test_a_symlinked_model_says_its_target_is_outside_the_workspace(ws, ui, tmp_path):
    from webui.security import Workspace
    from webui.tabs.common import list_models

    outside = tmp_path / "elsewhere"
    tiny_pipeline("sd1").save_pretrained(outside)
    (ws / "models" / "linked").symlink_to(outside, target_is_directory=True)
    try:
        assert "models/linked" in list_models(Workspace(ws))
        with pytest.raises(gr.Error) as info:
            ui_call(ui, model="models/linked")
        text = str(info.value)
        assert "'models/linked' is a symbolic link (at models/linked) whose target" in text
        assert str(outside) in text and "Move or copy the files into the workspace" in text
    finally:
        (ws / "models" / "linked").unlink()


def test_a_lora_in_the_stack_and_in_a_prompt_tag_is_applied_once_with_the_tags_weights(ws, pipe_and_files, ui):
    """Smaller things (issue #20): a dropdown LoRA also written as a tag was applied twice, silently."""
    pipe, ink, glow = pipe_and_files
    both = sd_lora.generate(pipe, "a red circle <lora:ink:0.5>", [(ink, 1.0), (glow, 0.3)], lora_dir=ws / "loras", **COMMON)
    assert [(s.path, s.unet_weight) for s in both.stack] == [(ink, 0.5), (glow, 0.3)]  # first place, last weights
    assert both.notes == ["ink is named 2 times (stack x1, <lora:ink:0.5>): applied once, with the weights of the "
                          "last (<lora:ink:0.5>)"]
    once = sd_lora.generate(pipe, "a red circle", [(ink, 0.5), (glow, 0.3)], **COMMON)
    assert not once.notes
    a, b = (np.asarray(r.images[0].image) for r in (both, once))
    assert np.array_equal(a, b)  # ink applied once, at 0.5
    _, info = ui_call(ui, prompt="a red circle <lora:ink:0.5>", rows=[("ink", 1.0, None)])
    assert info.startswith("LoRAs: ink x0.5\n")
    assert "Note: ink is named 2 times (stack x1, &lt;lora:ink:0.5&gt;): applied once" in info


def test_the_stack_line_shows_only_the_weights_that_apply(ws, ui, pipe_and_files):
    """A UNet-only LoRA was shown as "(TE x0.8)"; a TE weight equal to the weight was shown too."""
    from sd_lora.generation import stack_line

    pipe, _, _ = pipe_and_files
    path = write_random_lora(ws / "loras" / "unet-only.safetensors", pipe, seed=4, text_encoder=False)
    try:
        _, info = ui_call(ui, rows=[("unet-only", 1.0, 0.8), ("ink", 0.5, 0.5), ("glow", 0.8, 0.4)])
        assert info.splitlines()[0] == "LoRAs: unet-only x1, ink x0.5, glow x0.8 (TE x0.4)"
        result = sd_lora.generate(pipe, "a red circle", [(path, 1.0, 0.8)], **COMMON)
        assert result.settings["loras"][0]["parts"] == ["unet"] and stack_line(result.settings["loras"]) == "unet-only x1"
        assert stack_line([{"name": "te", "weight": 1.0, "te_weight": 0.5, "parts": ["text_encoder"]}]) == "te TE x0.5"
    finally:
        path.unlink()


def test_grid_labels_and_titles_wrap_instead_of_being_cut():
    """Smaller things (issue #20): the demo's row titles were cut mid-word in two-cell rows."""
    from sd_lora.stack.grid import _wrap, label_grid

    cells = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    one = label_grid(cells, ["base", "ink"], title="short")
    title = "a large red circle on a blue background, striped, outlined"
    wrapped = label_grid(cells, ["base", "stripes + outline"], title=title)
    assert wrapped.width == one.width and wrapped.height > one.height  # more lines, not fewer letters
    lines = _wrap(title, len, 24)
    assert " ".join(lines) == title and all(len(x) <= 24 for x in lines)
    assert _wrap("ab supercalifragilistic", len, 8) == ["ab", "supercal", "ifragili", "stic"]
    # a row's labels share one band: the two-line label pushes both images down by the same amount
    image_top = [next(y for y in range(wrapped.height) if wrapped.getpixel((x, y)) == c) for x, c in ((36, (255, 0, 0)), (104, (0, 0, 255)))]
    assert image_top[0] == image_top[1] == wrapped.height - 4 - 64
