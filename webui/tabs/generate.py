"""Generate tab: a base model, a prompt (with `<lora:NAME:W>` tags if you like), and a stack of LoRAs
from the library with a weight each; optionally a compare grid (base, each LoRA alone, the stack).

The pipeline stays loaded between clicks (one model at a time); LoRAs are fused into its weights with
sd_lora.apply_loras and the base is restored exactly before the next image, so switching stacks is
cheap and never drifts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr

from ..security import PathError
from .common import guard, list_loras, list_models

LORA_ROWS = 4


def build(ctx, tab=None) -> None:
    ws = ctx.workspace
    lock = threading.Lock()  # one generation at a time: the pipeline's weights are shared state

    def pipeline(model: str):
        import torch

        import sd_lora

        path = ws.path(model, must_exist=True, kind="base model")
        cached = ctx.extra.get("pipe")
        if cached and cached[0] == path:
            return cached[1]
        ctx.extra.pop("pipe", None)  # drop the old model before loading the next (memory)
        cuda = torch.cuda.is_available()
        pipe = sd_lora.load_base(path, dtype=torch.float16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
        pipe.set_progress_bar_config(disable=True)
        ctx.extra["pipe"] = (path, pipe)
        return pipe

    def lora_file(name: str) -> Path:
        p = ws.path(Path("loras") / f"{name}.safetensors", must_exist=True, kind="LoRA")
        if not p.is_relative_to(ws.root / "loras"):
            raise PathError(f"LoRA: {name!r} is not in the library (loras/ of the workspace)")
        return p

    @guard
    def generate(model, prompt, negative, seed, steps, width, height, guidance, compare, *rest):
        import torch

        import sd_lora
        from sd_lora.stack import prompt_to_stack

        if not model:
            raise ValueError("base model: choose one (put diffusers folders or .safetensors files in models/)")
        if not (prompt or "").strip():
            raise ValueError("prompt: type what to draw")
        steps, seed = int(steps), int(seed)
        w = int(width) or None
        h = int(height) or None
        for dim in (w, h):
            if dim is not None and (dim < 64 or dim % 8):
                raise ValueError(f"width/height {dim}: use a multiple of 8, at least 64 (0 = the model's size)")
        if not 1 <= steps <= 150:
            raise ValueError("steps: between 1 and 150")
        # the LoRA rows (name, weight, TE weight), then the sampler options (last: older API calls still work)
        rows, (rescale, zero_snr) = rest[: 3 * LORA_ROWS], rest[3 * LORA_ROWS:]
        rescale = float(rescale or 0.0)
        if not 0 <= rescale <= 1:
            raise ValueError("guidance rescale: between 0 and 1 (0.7 for zero-terminal-SNR models)")
        specs = []
        for i in range(LORA_ROWS):
            name, weight, te_weight = rows[3 * i: 3 * i + 3]
            if name:
                specs.append(sd_lora.LoraSpec(lora_file(name), weight=float(weight),
                                              te_weight=None if te_weight in (None, "") else float(te_weight)))
        clean_prompt, tag_specs = prompt_to_stack(prompt, ws.root / "loras")
        specs += tag_specs

        with lock:
            pipe = pipeline(model)
            variants = [("stack", specs)]
            if compare:
                variants = [("base", [])] + [(Path(str(s.path)).stem, [s]) for s in specs] + ([("stack", specs)] if len(specs) > 1 else [])
            out, triggers = [], []
            stamp = time.strftime("%Y%m%d-%H%M%S")
            # the kept pipeline keeps its scheduler: the zero-SNR one is for this click only
            scheduler = sd_lora.use_zero_terminal_snr(pipe) if zero_snr else pipe.scheduler
            try:
                for i, (label, stack) in enumerate(variants):
                    info = sd_lora.apply_loras(pipe, stack)
                    triggers = triggers or list(getattr(info, "trigger_words", []) or [])
                    gen = torch.Generator("cpu").manual_seed(seed)  # a CPU generator: same image on any device
                    image = pipe(prompt=clean_prompt, negative_prompt=negative or None, num_inference_steps=steps,
                                 guidance_scale=float(guidance), guidance_rescale=rescale, width=w, height=h, generator=gen).images[0]
                    path = ws.root / "outputs" / f"{stamp}-{seed}-{i}-{label.replace('/', '_')}.png"
                    from sd_lora.io import atomic_path

                    with atomic_path(path) as tmp:
                        image.save(tmp, format="PNG")
                    out.append((str(path), label))
            finally:
                pipe.scheduler = scheduler
            sd_lora.remove_loras(pipe)
        stack_text = ", ".join(f"{Path(str(s.path)).stem} x{s.unet_weight:g} (TE x{s.text_encoder_weight:g})" for s in specs) or "none"
        info_md = f"LoRAs: {stack_text}" + (f"\n\nTrigger words: {', '.join(triggers)}" if triggers else "")
        return out, info_md

    def refresh():
        choices = list_loras(ws)
        return [gr.update(choices=list_models(ws))] + [gr.update(choices=[""] + choices) for _ in range(LORA_ROWS)]

    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                model = gr.Dropdown(list_models(ws), label="base model (models/ in the workspace)", allow_custom_value=True, scale=4)
                refresh_btn = gr.Button("Refresh", scale=0)
            prompt = gr.Textbox(label="prompt (<lora:NAME:WEIGHT> tags work too)", lines=2)
            negative = gr.Textbox(label="negative prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0)
                steps = gr.Number(25, label="steps", precision=0)
                width = gr.Number(0, label="width (0: model's)", precision=0)
                height = gr.Number(0, label="height (0: model's)", precision=0)
                guidance = gr.Number(7.0, label="guidance")
            with gr.Accordion("Advanced: v-prediction / zero-terminal-SNR models", open=False):
                with gr.Row():
                    rescale = gr.Number(0.0, label="guidance rescale (0-1; 0.7 for zero-terminal-SNR models)", minimum=0, maximum=1)
                    zero_snr = gr.Checkbox(label="zero terminal SNR (rescaled betas, trailing timesteps)")
            rows, names, te_rows = [], [], []
            gr.Markdown("**LoRA stack** (from loras/ of the workspace)")
            for i in range(LORA_ROWS):
                with gr.Row():
                    name = gr.Dropdown([""] + list_loras(ws), value="", label=f"LoRA {i + 1}", scale=3, allow_custom_value=True)
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=2)
                names.append(name)
                rows += [name, weight]
            with gr.Accordion("Advanced: text-encoder weights (empty: same as the weight)", open=False):
                with gr.Row():
                    for i in range(LORA_ROWS):
                        te_rows.append(gr.Number(None, label=f"LoRA {i + 1} TE weight"))
            compare = gr.Checkbox(label="compare grid: base, each LoRA alone, and the stack (same seed)")
            go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        with gr.Column(scale=2):
            images = gr.Gallery(label="images", columns=2, height=520)
            info = gr.Markdown()
    inputs = [model, prompt, negative, seed, steps, width, height, guidance, compare]
    for i in range(LORA_ROWS):
        inputs += [rows[2 * i], rows[2 * i + 1], te_rows[i]]
    inputs += [rescale, zero_snr]
    go.click(generate, inputs, [images, info], api_name="generate", concurrency_limit=1)
    refresh_btn.click(refresh, None, [model, *names], api_name=False)
    if tab is not None:
        tab.select(refresh, None, [model, *names], api_name=False)
