"""Generate tab: a base model, a prompt (with `<lora:NAME:W>` tags if you like), and a stack of LoRAs
from the library with a weight and optional block weights (LoRA Block Weight's `lbw=` text: a preset
such as OUTD or a vector) each; optionally a compare grid (base, each LoRA alone, the stack). A sampler
and A1111's clip skip; "load from PNG" fills every field from a PNG's `parameters` text (ours, A1111's,
Forge's) so that Generate remakes the image.

The tab only collects the inputs (confining paths to the workspace) and calls sd_lora.generate, the
function behind `sd-lora generate` too, so both follow the same rules and write the same PNG text.
The pipeline stays loaded between clicks (one model at a time) with the last stack fused
(keep_loras=True): the next click rewrites only the weights that differ, computed from the exact
base backup, so switching stacks is cheap and never drifts.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import gradio as gr

from sd_lora.generation import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_STEPS, ZERO_SNR_GUIDANCE_RESCALE, stack_line
from sd_lora.samplers import SAMPLERS

from ..security import PathError
from .common import guard, list_loras, list_models

LORA_ROWS = 4  # the generate handler names its four rows' parameters


def _unused(path: Path) -> Path:
    """`path`, or NAME-2.png, NAME-3.png ... when it is taken: two clicks in the same second (same
    seed) must not overwrite the first image. Called under the generation lock, so no race here."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def error_html(message: str) -> str:
    """An error as the box under the Generate button shows it: plain text (a `<lora:...>` in the
    message must show, not be read as a tag), red, on its own line."""
    return f'<div style="color: #b91c1c; white-space: pre-wrap"><b>Error:</b> {html.escape(str(message))}</div>'


def build(ctx, tab=None) -> None:
    ws = ctx.workspace
    lock = threading.Lock()  # one generation at a time: the pipeline's weights are shared state

    def pipeline(model: str):
        from sd_lora.generation import load_pipeline

        path = ws.path(model, must_exist=True, kind="base model")
        cached = ctx.extra.get("pipe")
        if cached and cached[0] == path:
            return cached[1]
        ctx.extra.pop("pipe", None)  # drop the old model before loading the next (memory)
        pipe = load_pipeline(path)  # generate()'s device and dtype defaults, as the CLI's
        ctx.extra["pipe"] = (path, pipe)
        return pipe

    def lora_file(name: str) -> Path:
        p = ws.path(Path("loras") / f"{name}.safetensors", must_exist=True, kind="LoRA")
        if not p.is_relative_to(ws.root / "loras"):
            raise PathError(f"LoRA: {name!r} is not in the library (loras/ of the workspace)")
        return p

    # Named parameters (not *rows) so the API page names them, and the options after the LoRA rows
    # (added later, last so that older API calls still work) have defaults: an empty number box
    # (rescale) or text box (vae, block weights) would otherwise be a required API parameter (Gradio
    # makes a parameter optional for a component without a value only when its default is None).
    @guard
    def generate(model, prompt, negative, seed, steps, width, height, guidance, compare,
                 lora_1, weight_1, te_weight_1, lora_2, weight_2, te_weight_2,
                 lora_3, weight_3, te_weight_3, lora_4, weight_4, te_weight_4,
                 guidance_rescale=None, zero_terminal_snr=False, add_trigger_words=False, vae=None, num_images=1,
                 sampler=None, block_weights_1=None, block_weights_2=None, block_weights_3=None, block_weights_4=None,
                 clip_skip=None):
        import sd_lora

        if not model:
            raise ValueError("base model: choose one (put diffusers folders or .safetensors files in models/)")
        rows = [(lora_1, weight_1, te_weight_1, block_weights_1), (lora_2, weight_2, te_weight_2, block_weights_2),
                (lora_3, weight_3, te_weight_3, block_weights_3), (lora_4, weight_4, te_weight_4, block_weights_4)]
        specs = []
        for i, (name, weight, te_weight, blocks) in enumerate(rows, 1):
            if name:
                specs.append(sd_lora.LoraSpec(lora_file(name), weight=float(weight),
                                              te_weight=None if te_weight in (None, "") else float(te_weight),
                                              block_weights=(blocks or "").strip() or None))
            elif (blocks or "").strip():
                raise ValueError(f"LoRA {i} block weights: choose a LoRA in that row, or empty the field")
        vae_path = ws.path(vae, must_exist=True, kind="VAE") if (vae or "").strip() else None
        with lock:
            result = sd_lora.generate(
                lambda: pipeline(model), prompt or "", specs, negative_prompt=negative or "", seed=seed, width=width or None,
                height=height or None, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                zero_terminal_snr=bool(zero_terminal_snr), sampler=sampler or None, vae=vae_path, lora_dir=ws.root / "loras",
                clip_skip=None if clip_skip in (None, "") else clip_skip,
                add_trigger_words=bool(add_trigger_words), num_images=1 if num_images in (None, "") else num_images,
                compare=bool(compare), keep_loras=True,  # the next click rewrites only what differs
            )
            out = []
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for i, im in enumerate(result.images):
                label = im.label or "stack"
                path = _unused(ws.root / "outputs" / f"{stamp}-{im.settings['seed']}-{i}-{label.replace('/', '_')}.png")
                im.save(path)  # with the same `parameters` text as the CLI's PNGs
                out.append((str(path), label if len(result.images) == len(result.labels) else f"{label}, seed {im.settings['seed']}"))
        info_md = f"LoRAs: {stack_line(result.settings['loras'])}"
        for note in result.notes:  # escaped: a <lora:...> tag in a note must show, not vanish as HTML
            info_md += f"\n\nNote: {html.escape(note)}"
        if result.trigger_words:
            info_md += f"\n\nTrigger words: {', '.join(result.trigger_words)}" + (" (added to the prompt)" if add_trigger_words else "")
        return out, info_md

    @guard
    def load_png(file):
        """The fields as a PNG's `parameters` text says (ours, A1111's or Forge's: sd_lora's
        settings_from_infotext, the reader behind `sd-lora generate --from-png`), so that Generate
        remakes the image: its model and LoRAs are found by name in models/ and loras/ and checked
        against the hashes it recorded. Returns the fields' updates and a note on what could not be
        matched."""
        from sd_lora.generation import model_name, settings_from_infotext
        from sd_lora.infotext import lora_hash, lora_hash_name, model_hash, read_png_infotext

        if not file:
            raise ValueError("load from PNG: choose a PNG written by sd-lora, A1111 or Forge")
        png = settings_from_infotext(read_png_infotext(file))
        if png["grid"]:
            raise ValueError(f"load from PNG: this is a grid ({png['grid']}); load one of its images' PNGs")
        if len(png["loras"]) > LORA_ROWS:
            raise ValueError(f"load from PNG: the image used {len(png['loras'])} LoRAs and the tab has {LORA_ROWS} rows; "
                             "remake it with `sd-lora generate --from-png`")
        notes = []
        model_update = gr.update()  # unmatched: the chosen model stays
        if png["model"]:
            named = [m for m in list_models(ws) if model_name(m) == png["model"]]
            if not named:
                notes.append(f"the model {png['model']!r} is not in models/: choose it (the image will differ otherwise)")
            else:
                model_update = gr.update(value=named[0])
                if png["model_hash"] and model_hash(ws.root / named[0]) != png["model_hash"]:
                    notes.append(f"{named[0]} has another hash than the PNG's model ({png['model_hash']}): the image will differ")
        library = list_loras(ws)
        rows = []
        for (name, weight, te_weight), blocks in zip(png["loras"], png["lora_block_weights"]):
            found = [x for x in library if x.rsplit("/", 1)[-1] == name]  # the PNG names a file by its stem
            if not found:
                raise ValueError(f"load from PNG: the image used the LoRA {name!r}, which is not in loras/ of the workspace")
            recorded = png["lora_hashes"].get(lora_hash_name(name))
            same = [x for x in found if not recorded or lora_hash(lora_file(x)) == recorded]
            if not same:
                notes.append(f"LoRA {found[0]} has another hash than the PNG's ({recorded}): the image will differ")
            rows.append(((same or found)[0], weight, None if te_weight == weight else te_weight, blocks or ""))
        rows += [("", 1.0, None, "")] * (LORA_ROWS - len(rows))
        if png["vae"]:
            notes.append(f"the image was made with the VAE {png['vae']!r}: enter its path under Advanced")
        if png["training"]:
            notes.append(f"a training sample ({png['training']}): its LoRA was the adapters in memory at that step; "
                         "choose the LoRA file saved at that step to come close")
        fields = [png["prompt"], png["negative_prompt"], png["seed"], png["steps"], png["width"] or 0, png["height"] or 0,
                  png["guidance"], png["sampler"] or "", png["guidance_rescale"], png["zero_terminal_snr"],
                  png["clip_skip"] or 1, False, 1, False]  # ..., clip skip, compare, images, trigger words (in the prompt already)
        cells = [value for row in rows for value in row]
        note = "Loaded the PNG's settings." + "".join(f"\n\nNote: {html.escape(n, quote=False)}" for n in notes)
        return [model_update, *fields, *cells, note]

    def generate_on_page(*inputs):
        """The Generate button's handler: `generate` with its error written into the box under the
        button, where it stays until the next click (a toast is gone in seconds). API calls go to
        `generate` itself (hidden button below), which raises, so scripts still get an error."""
        try:
            gallery, info_md = generate(*inputs)
        except gr.Error as e:
            return gr.update(), gr.update(), gr.update(value=error_html(e.message), visible=True)
        return gallery, info_md, gr.update(value="", visible=False)

    def refresh(current_model: str | None):
        """The lists as the workspace is now; the first model is chosen while none is (the lists start
        empty: webui/tabs/common.py says why)."""
        choices, models = list_loras(ws), list_models(ws)
        model_value = current_model or (models[0] if models else None)
        return [gr.update(choices=models, value=model_value)] + [gr.update(choices=[""] + choices) for _ in range(LORA_ROWS)]

    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                # choices start empty and are filled on load (common.py: the login page shows the initial ones)
                model = gr.Dropdown([], label="base model (models/ in the workspace)", allow_custom_value=True, scale=4)
                refresh_btn = gr.Button("Refresh", scale=0)
            with gr.Row():
                png_file = gr.File(label="load from PNG: its settings into the fields (sd-lora, A1111, Forge)",
                                   file_types=[".png"], type="filepath", height=90, scale=2, elem_id="generate-png")
                png_note = gr.Markdown(elem_id="generate-png-note")
            prompt = gr.Textbox(label="prompt (<lora:NAME:WEIGHT> and <lora:NAME:WEIGHT:lbw=OUTD> tags work too)", lines=2)
            negative = gr.Textbox(label="negative prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0)
                steps = gr.Number(DEFAULT_STEPS, label=f"steps (1-{MAX_STEPS})", precision=0)
                width = gr.Number(0, label="width (0: model's)", precision=0)
                height = gr.Number(0, label="height (0: model's)", precision=0)
                guidance = gr.Number(DEFAULT_GUIDANCE, label="guidance")
                sampler = gr.Dropdown([("model's own", "")] + [(n, n) for n in SAMPLERS], value="", label="sampler")
                # A1111's "Clip skip"; SDXL ignores it (generate() notes that)
                clip_skip = gr.Number(1, label="clip skip (1: last layer; 2 for many anime SD1 models)", precision=0,
                                      minimum=1, elem_id="generate-clip-skip")
            with gr.Row():
                num_images = gr.Number(1, label="images per stack (seeds: seed, seed+1, ...)", precision=0, minimum=1)
                add_triggers = gr.Checkbox(label="add the LoRAs' trigger words to the prompt")
            with gr.Accordion("Advanced: VAE, v-prediction / zero-terminal-SNR models", open=False):
                with gr.Row():
                    rescale = gr.Number(None, label=f"guidance rescale (0-1; empty: {ZERO_SNR_GUIDANCE_RESCALE} with zero terminal SNR, else 0)",
                                        minimum=0, maximum=1)
                    zero_snr = gr.Checkbox(label="zero terminal SNR (rescaled betas, trailing timesteps)")
                vae = gr.Textbox(label="replacement VAE (a VAE folder or .safetensors file in the workspace; empty: the model's)")
            rows, names, te_rows, block_rows = [], [], [], []
            gr.Markdown("**LoRA stack** (from loras/ of the workspace)")
            for i in range(LORA_ROWS):
                with gr.Row():
                    name = gr.Dropdown([""], value="", label=f"LoRA {i + 1}", scale=3, allow_custom_value=True)
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=2)
                    block_rows.append(gr.Textbox(label="block weights (lbw: OUTD, 1,0,0,... ; empty: all 1)", scale=2,
                                                 placeholder="e.g. OUTD or IN04=0.5,M00=0", elem_id=f"generate-lbw-{i + 1}"))
                names.append(name)
                rows += [name, weight]
            with gr.Accordion("Advanced: text-encoder weights (empty: same as the weight)", open=False):
                with gr.Row():
                    for i in range(LORA_ROWS):
                        te_rows.append(gr.Number(None, label=f"LoRA {i + 1} TE weight"))
            compare = gr.Checkbox(label="compare grid: base, each LoRA alone, and the stack (same seed)")
            go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            error = gr.HTML(visible=False, elem_id="generate-error")
            api_go = gr.Button(visible=False)  # the API's `generate` endpoint (errors raised, not shown)
        with gr.Column(scale=2):
            images = gr.Gallery(label="images", columns=2, height=520)
            info = gr.Markdown()
    inputs = [model, prompt, negative, seed, steps, width, height, guidance, compare]
    for i in range(LORA_ROWS):
        inputs += [rows[2 * i], rows[2 * i + 1], te_rows[i]]
    inputs += [rescale, zero_snr, add_triggers, vae, num_images, sampler, *block_rows, clip_skip]
    # what load_png fills, in its order
    png_fields = [model, prompt, negative, seed, steps, width, height, guidance, sampler, rescale, zero_snr, clip_skip,
                  compare, num_images, add_triggers]
    for i in range(LORA_ROWS):
        png_fields += [rows[2 * i], rows[2 * i + 1], te_rows[i], block_rows[i]]
    png_file.upload(load_png, png_file, [*png_fields, png_note], api_name="load_png")
    # the error box is emptied at the click, then filled again only if this run fails
    go.click(lambda: gr.update(value="", visible=False), None, error, api_name=False, queue=False).then(
        generate_on_page, inputs, [images, info, error], api_name=False, concurrency_limit=1, concurrency_id="generate")
    api_go.click(generate, inputs, [images, info], api_name="generate", concurrency_limit=1, concurrency_id="generate")
    refresh_btn.click(refresh, model, [model, *names], api_name=False)
    gr.context.Context.root_block.load(refresh, model, [model, *names], api_name=False)
    if tab is not None:
        tab.select(refresh, model, [model, *names], api_name=False)
