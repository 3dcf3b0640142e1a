"""Train tab: presets, a form for the common settings and the full config as TOML (each edit shows in
the other), validation, Start / Stop / Resume, and a live view of the selected job.

The live view is rebuilt from the job's files on the server at every tick (gr.Timer), so a refresh,
a second browser or a closed tab changes nothing: the page asks "what is the job doing?" each second.
"""

from __future__ import annotations

import html
import tomllib
from pathlib import Path

import gradio as gr

from sd_lora.config import ConfigError, TrainConfig, config_from_dict, config_key, config_keys, dump_config
from sd_lora.fields import assign

from ..jobs import ACTIVE
from ..security import PathError, confine_config, safe_name
from .common import guard, list_dirs, list_models

# Presets by GPU memory. Each sets only memory-relevant keys; the comment says why.
GPU_PRESETS: dict[str, dict] = {
    "CPU only (slow; small tests)": {"mixed_precision": "no", "optimizer": "adamw", "gradient_checkpointing": False, "batch_size": 1},
    # 6 GB: fp16 + 8-bit Adam + checkpointing + frozen text encoder keeps SD1.5 at 512 px under ~5.5 GB
    "6 GB - SD1.5 512 px": {"mixed_precision": "fp16", "optimizer": "adamw8bit", "gradient_checkpointing": True, "batch_size": 1,
                             "data.resolution": 512, "network.train_text_encoder": False, "data.cache_latents": "disk"},
    "8 GB - SD1.5 512 px": {"mixed_precision": "fp16", "optimizer": "adamw8bit", "gradient_checkpointing": True, "batch_size": 2,
                             "data.resolution": 512, "network.train_text_encoder": True},
    "12 GB - SD1.5 512 px": {"mixed_precision": "fp16", "optimizer": "adamw8bit", "gradient_checkpointing": False, "batch_size": 4,
                              "data.resolution": 512, "network.train_text_encoder": True},
    # SDXL's UNet alone is 5 GB in fp16: checkpointing and a frozen text encoder are needed on 12 GB
    "12 GB - SDXL 1024 px": {"mixed_precision": "fp16", "optimizer": "adamw8bit", "gradient_checkpointing": True, "batch_size": 1,
                              "data.resolution": 1024, "network.train_text_encoder": False, "data.cache_latents": "disk"},
    "24 GB - SD1.5 768 px": {"mixed_precision": "bf16", "optimizer": "adamw", "gradient_checkpointing": False, "batch_size": 8,
                              "data.resolution": 768, "network.train_text_encoder": True},
    "24 GB - SDXL 1024 px": {"mixed_precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": True, "batch_size": 2,
                              "data.resolution": 1024, "network.train_text_encoder": True},
}
# Presets by target file size (fp16 file, kohya default targets; see the size table in the docs).
SIZE_PRESETS: dict[str, dict] = {
    "~10 MB SD1.5 / ~57 MB SDXL (rank 8)": {"network.rank": 8, "network.alpha": 4.0, "network.preset": "kohya"},
    "~19 MB SD1.5 / ~114 MB SDXL (rank 16)": {"network.rank": 16, "network.alpha": 8.0, "network.preset": "kohya"},
    "~38 MB SD1.5 / ~228 MB SDXL (rank 32)": {"network.rank": 32, "network.alpha": 16.0, "network.preset": "kohya"},
    "~75 MB SD1.5 / ~456 MB SDXL (rank 64)": {"network.rank": 64, "network.alpha": 32.0, "network.preset": "kohya"},
    "~4 MB SD1.5 (attention only, rank 8)": {"network.rank": 8, "network.alpha": 4.0, "network.preset": "attention"},
}

# The form's config keys, in the order of its components. Types, choices and help come from the keys.
FORM_KEYS = [
    "model", "data.path", "output", "steps", "batch_size", "lr", "network.method", "network.preset", "network.rank",
    "network.alpha", "data.resolution", "optimizer", "mixed_precision", "gradient_checkpointing",
    "network.train_text_encoder", "save_every", "sample_every", "sample_prompts", "seed",
]


def default_config() -> TrainConfig:
    return TrainConfig(output="loras/my_lora.safetensors", steps=500, save_every=100, sample_every=100,
                       sample_prompts=["a photo of sks"])


def parse_toml(text: str) -> TrainConfig:
    """The config in the TOML box (paths as typed: workspace-relative). Raises ConfigError on bad TOML/keys."""
    try:
        values = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML: {e}"]) from e
    return config_from_dict(values)


def form_values(cfg: TrainConfig) -> list:
    out = []
    for name in FORM_KEYS:
        v = config_key(name).get(cfg)
        if name == "output":
            v = Path(v).stem if v else ""
        elif name == "sample_prompts":
            v = "\n".join(v) if isinstance(v, list) else (v or "")
        out.append(v)
    return out


def apply_form(cfg: TrainConfig, values: list) -> TrainConfig:
    """The form's values into `cfg`, each read as its key's type. The form trains by steps, so a
    steps value clears an epochs key from the TOML (as a --steps flag does)."""
    given = {}
    for name, v in zip(FORM_KEYS, values):
        if name == "output":
            stem = (v or "").strip()
            v = f"loras/{safe_name(stem, 'output name')}.safetensors" if stem else ""
        elif name == "sample_prompts":
            v = [x.strip() for x in (v or "").splitlines() if x.strip()] or None
        else:
            v = config_key(name).coerce(v)
        given[name] = v
    assign(cfg, config_keys(), given)
    return cfg


def apply_presets(cfg: TrainConfig, *presets: dict) -> TrainConfig:
    for preset in presets:
        for name, v in preset.items():
            config_key(name).set(cfg, v)
    return cfg


def confine(ctx, cfg: TrainConfig) -> TrainConfig:
    """Every path of a browser-given config resolved inside the workspace (absolute), or PathError."""
    return confine_config(ctx.workspace, cfg)


def _field(name: str, label: str, **kw):
    """The form component for a config key: a dropdown of its choices, a checkbox, or a number box,
    with the key's help as the hint under it."""
    key = config_key(name)
    if key.choices is not None:
        return gr.Dropdown(list(key.choices), label=label, info=key.help, **kw)
    if key.kind == "bool":
        return gr.Checkbox(label=label, info=key.help, **kw)
    if key.kind in ("int", "float"):
        return gr.Number(label=label, info=key.help, precision=0 if key.kind == "int" else None, **kw)
    return gr.Textbox(label=label, info=key.help, **kw)


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(state: dict, p) -> str:
    total = p.total_steps or 0
    frac = min(1.0, p.step / total) if total else (1.0 if state["status"] == "done" else 0.0)
    bits = [f"<b>{html.escape(state.get('name', ''))}</b> &middot; {html.escape(state['status'])}"]
    bits.append(f"step {p.step}/{total or '?'} ({frac:.0%})")
    if state["status"] in ACTIVE:
        bits.append(f"{p.it_per_s:.2f} it/s" if p.it_per_s else "- it/s")
        bits.append(f"ETA {_fmt_s(p.eta_s)}")
    if p.epoch is not None:
        bits.append(f"epoch {p.epoch}")
    if p.loss is not None:
        bits.append(f"loss {p.loss:.4f}")
    if p.stage and state["status"] in ACTIVE:
        bits.append(html.escape(p.stage))
    msg = html.escape(state.get("message") or "")
    return (
        f'<div class="sd-status" id="job-status" data-status="{html.escape(state["status"])}" data-step="{p.step}">'
        f'<div class="sd-progress"><div style="width:{frac * 100:.1f}%"></div></div>'
        f'<p>{" &middot; ".join(bits)}</p><p><small>{msg}</small></p></div>'
    )


def loss_svg(losses: list[tuple[int, float]], smoothing: float, width: int = 560, height: int = 240) -> str:
    """The loss curve (raw and exponentially smoothed) as inline SVG: no chart library, nothing to load,
    cheap to redraw every second. The smoothing sees every step; each line gets <= ~600 points."""
    if not losses:
        return '<div class="sd-loss"><small>loss: no steps yet</small></div>'
    smooth, ema = [], None
    for _, loss in losses:
        ema = loss if ema is None else smoothing * ema + (1 - smoothing) * loss
        smooth.append(ema)
    stride = max(1, len(losses) // 600)
    idx = sorted(set(range(0, len(losses), stride)) | {len(losses) - 1})
    steps = [losses[i][0] for i in idx]
    raw = [losses[i][1] for i in idx]
    sm = [smooth[i] for i in idx]
    lo, hi = min(raw + sm), max(raw + sm)
    hi = hi if hi > lo else lo + 1e-6
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    left, right, top, bottom = 52, 10, 10, 26

    def pts(values):
        return " ".join(
            f"{left + (st - x0) / (x1 - x0) * (width - left - right):.1f},"
            f"{top + (hi - v) / (hi - lo) * (height - top - bottom):.1f}" for st, v in zip(steps, values))

    ticks = "".join(
        f'<text x="{left - 4}" y="{top + f * (height - top - bottom) + 4:.1f}" text-anchor="end">{hi - f * (hi - lo):.4g}</text>'
        for f in (0, 0.5, 1))
    return (
        f'<div class="sd-loss"><svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="loss curve"'
        f' font-size="11" fill="currentColor">{ticks}'
        f'<text x="{left}" y="{height - 6}">step {x0}</text><text x="{width - right}" y="{height - 6}" text-anchor="end">step {x1}</text>'
        f'<polyline points="{pts(raw)}" fill="none" stroke="#9ca3af" stroke-width="1"/>'
        f'<polyline points="{pts(sm)}" fill="none" stroke="#ea580c" stroke-width="2"/></svg>'
        f'<small><span style="color:#9ca3af">&#9644; loss</span> &nbsp; <span style="color:#ea580c">&#9644; smoothed</span>'
        f' &nbsp; last {losses[-1][1]:.4f}, smoothed {smooth[-1]:.4f}</small></div>'
    )


def build(ctx, timer_s: float = 1.0) -> None:
    queue = ctx.queue
    ws = ctx.workspace

    def job_choices() -> list[tuple[str, str]]:
        return [(f"{j.get('name', '')} - {j['status']} ({j['id']})", j["id"]) for j in reversed(queue.jobs())]

    def default_job() -> str | None:
        active = queue.active_job()
        if active:
            return active["id"]
        ids = queue.job_ids()
        return ids[-1] if ids else None

    # ---- form <-> TOML ----------------------------------------------------------------------------
    @guard
    def form_to_toml(text: str, *values):
        try:
            cfg = parse_toml(text)
        except ConfigError:
            cfg = default_config()
        return dump_config(apply_form(cfg, list(values)))

    @guard
    def toml_to_form(text: str):
        try:
            cfg = parse_toml(text)
        except ConfigError as e:
            return [gr.skip()] * len(FORM_KEYS) + [f"**TOML not applied:**\n\n{_md_errors(e.errors)}"]
        return form_values(cfg) + [""]

    @guard
    def apply_preset(text: str, gpu: str, size: str):
        try:
            cfg = parse_toml(text)
        except ConfigError:
            cfg = default_config()
        apply_presets(cfg, GPU_PRESETS.get(gpu, {}), SIZE_PRESETS.get(size, {}))
        return [dump_config(cfg)] + form_values(cfg)

    # ---- validate / start / stop / resume ---------------------------------------------------------
    def checked_config(text: str) -> tuple[TrainConfig | None, list[str]]:
        try:
            cfg = confine(ctx, parse_toml(text))
        except ConfigError as e:
            return None, e.errors
        except PathError as e:
            return None, [str(e)]
        return cfg, cfg.validate()

    @guard
    def validate(text: str):
        _cfg, errors = checked_config(text)
        return "**Config OK.** Start it when ready." if not errors else f"**{len(errors)} problem(s):**\n\n{_md_errors(errors)}"

    @guard
    def start(text: str):
        cfg, errors = checked_config(text)
        if errors:
            return gr.update(), f"**Not started, {len(errors)} problem(s):**\n\n{_md_errors(errors)}"
        job_id = queue.submit(cfg)
        return gr.update(choices=job_choices(), value=job_id), f"Queued job `{job_id}`."

    @guard
    def stop(job_id: str):
        if not job_id:
            raise ValueError("stop: select a job first")
        st = queue.stop(job_id)
        return gr.update(choices=job_choices(), value=job_id), st.get("message", "")

    @guard
    def resume(job_id: str):
        if not job_id:
            raise ValueError("resume: select a stopped job first")
        new_id = queue.resume(job_id)
        return gr.update(choices=job_choices(), value=new_id), f"Queued job `{new_id}`, resuming `{job_id}`."

    # ---- the live view ----------------------------------------------------------------------------
    @guard
    def job_status(job_id: str) -> dict:
        """The selected job as JSON (what the page shows; handy for scripts)."""
        job_id = job_id or default_job()
        if not job_id:
            return {"jobs": queue.jobs()}
        st = queue.state(job_id)
        p = queue.progress(job_id)
        return {
            **st, "step": p.step, "total_steps": p.total_steps, "loss": p.loss, "it_per_s": p.it_per_s,
            "eta_s": p.eta_s, "epoch": p.epoch, "stage": p.stage, "samples": p.samples, "checkpoints": p.checkpoints,
            "warnings": p.warnings, "error": p.error, "output_file": p.output,
        }

    def view(job_id: str, smoothing: float):
        job_id = job_id or default_job()
        if not job_id:
            return gr.update(), "<p>No jobs yet: fill in the form and press Start.</p>", loss_svg([], 0), [], "", _jobs_table()
        try:
            st = queue.state(job_id)
        except ValueError:
            return gr.update(value=None), "<p>That job is gone.</p>", loss_svg([], 0), [], "", _jobs_table()
        p = queue.progress(job_id)
        samples = [(s, Path(s).stem) for s in p.samples if Path(s).is_file()][-24:]
        return (gr.update(choices=job_choices(), value=job_id), progress_html(st, p),
                loss_svg(p.losses, float(smoothing or 0)), samples, "\n".join(queue.log_tail(job_id, 8000).splitlines()[-12:]), _jobs_table())

    def _jobs_table():
        import pandas as pd

        rows = [(j["id"], j.get("name", ""), j["status"], j.get("message", "")) for j in reversed(queue.jobs())]
        return pd.DataFrame(rows or [("", "", "", "")], columns=["id", "name", "status", "message"])

    # ---- layout -----------------------------------------------------------------------------------
    cfg0 = default_config()
    gr.Markdown("### Jobs (the running one is shown after a reload too)")
    with gr.Row():
        # allow_custom_value: jobs appear after the page was built; the queue checks every id it is given
        job = gr.Dropdown(job_choices(), label="job", value=None, scale=3, allow_custom_value=True)
        stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", scale=1)
        resume_btn = gr.Button("Resume", scale=1)
    status_html = gr.HTML()
    with gr.Row():
        with gr.Column():
            smoothing = gr.Slider(0, 0.99, value=0.8, step=0.01, label="loss smoothing")
            plot = gr.HTML(loss_svg([], 0), elem_id="loss-chart")
        samples = gr.Gallery(label="samples", columns=4, height=300, elem_id="samples")
    log = gr.Textbox(label="log (last lines)", lines=12, max_lines=12, autoscroll=True, interactive=False)
    jobs_table = gr.Dataframe(label="queue", interactive=False, wrap=True)
    with gr.Accordion("New job", open=True):
        with gr.Row():
            gpu = gr.Dropdown(list(GPU_PRESETS), label="preset by GPU memory", value=None)
            size = gr.Dropdown(list(SIZE_PRESETS), label="preset by file size", value=None)
            preset_btn = gr.Button("Apply presets", scale=0)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    f_model = gr.Dropdown(list_models(ws), label="base model (models/ in the workspace)", allow_custom_value=True)
                    f_data = gr.Dropdown(list_dirs(ws, "datasets"), label="dataset folder", allow_custom_value=True)
                    f_output = gr.Textbox(label="output name (loras/NAME.safetensors)")
                with gr.Row():
                    f_steps = _field("steps", "steps")
                    f_batch = _field("batch_size", "batch size")
                    f_lr = _field("lr", "learning rate")
                    f_seed = _field("seed", "seed")
                with gr.Row():
                    f_method = _field("network.method", "method")
                    f_preset = _field("network.preset", "targets")
                    f_rank = _field("network.rank", "rank")
                    f_alpha = _field("network.alpha", "alpha")
                with gr.Row():
                    f_res = _field("data.resolution", "resolution")
                    f_opt = _field("optimizer", "optimizer")
                    f_mp = _field("mixed_precision", "mixed precision")
                    f_gc = _field("gradient_checkpointing", "gradient checkpointing")
                    f_te = _field("network.train_text_encoder", "train text encoder")
                with gr.Row():
                    f_save = _field("save_every", "save + checkpoint every N steps (0: end only)")
                    f_sample_every = _field("sample_every", "sample every N steps (0: never)")
                f_prompts = gr.Textbox(label="sample prompts (one a line; --n --w --h --s --d --l options)", lines=2)
            with gr.Column(scale=2):
                toml_box = gr.Code(dump_config(cfg0), language=None, label="config (TOML): edit here or in the form",
                                   lines=22, max_lines=34, interactive=True, elem_id="train-toml")
                toml_note = gr.Markdown()
        form = [f_model, f_data, f_output, f_steps, f_batch, f_lr, f_method, f_preset, f_rank, f_alpha, f_res, f_opt, f_mp,
                f_gc, f_te, f_save, f_sample_every, f_prompts, f_seed]
        assert len(form) == len(FORM_KEYS)
        with gr.Row():
            validate_btn = gr.Button("Validate")
            start_btn = gr.Button("Start", variant="primary", elem_id="start")
        message = gr.Markdown()

    # ---- wiring -------------------------------------------------------------------------------------
    for comp in form:
        comp.input(form_to_toml, [toml_box, *form], toml_box, api_name=False, show_progress="hidden")
    toml_box.blur(toml_to_form, toml_box, [*form, toml_note], api_name=False, show_progress="hidden")
    preset_btn.click(apply_preset, [toml_box, gpu, size], [toml_box, *form], api_name="apply_preset")
    validate_btn.click(validate, toml_box, message, api_name="validate_config")
    start_btn.click(start, toml_box, [job, message], api_name="start_job")
    stop_btn.click(stop, job, [job, message], api_name="stop_job")
    resume_btn.click(resume, job, [job, message], api_name="resume_job")
    outputs = [job, status_html, plot, samples, log, jobs_table]
    job.input(view, [job, smoothing], outputs, api_name=False)
    smoothing.release(view, [job, smoothing], outputs, api_name=False)
    timer = gr.Timer(timer_s)
    timer.tick(view, [job, smoothing], outputs, api_name=False, show_progress="hidden", queue=False)
    gr.api(job_status, api_name="job_status")
    # a page load picks the running job (or the newest) and fills the form from the default TOML
    demo = gr.context.Context.root_block
    demo.load(lambda: gr.update(choices=job_choices(), value=default_job()), None, job, api_name=False)
    demo.load(lambda: form_values(cfg0), None, form, api_name=False)


def _md_errors(errors: list[str]) -> str:
    return "\n".join(f"- {html.escape(e)}" for e in errors)

