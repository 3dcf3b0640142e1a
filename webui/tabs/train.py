"""Train tab: presets, a form for the common settings and the full config as TOML (each edit shows in
the other), validation, Start / Stop / Resume, and a live view of the selected job.

The live view is rebuilt from the job's files on the server at every tick (gr.Timer), so a refresh,
a second browser or a closed tab changes nothing: the page asks "what is the job doing?" each second.
The New-job form lives in the browser (gr.BrowserState holds its TOML), so a reload keeps what was
typed; configs can also be saved to and loaded from `configs/` of the workspace. Every list of
workspace files follows the workspace: it is read again on page load and when the tab is opened.
"""

from __future__ import annotations

import functools
import hashlib
import html
import inspect
import json
import os
import tomllib
from pathlib import Path

import gradio as gr

from sd_lora.training.events import rate_text
from sd_lora.config import ConfigError, TrainConfig, config_from_dict, config_key, config_keys, dump_config, load_config
from sd_lora.fields import assign
from sd_lora.io import atomic_write

from ..jobs import ACTIVE, STOPPED, FAILED
from ..security import MAX_DATASET_CONFIG_BYTES, PathError, Workspace, confine_config, map_config_paths, safe_name
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

# The form's first part: the settings most runs change, in the order of its components.
BASIC_KEYS = [
    "model", "data.path", "output", "steps", "batch_size", "lr", "network.method", "network.preset", "network.rank",
    "network.alpha", "data.resolution", "optimizer", "mixed_precision", "gradient_checkpointing",
    "network.train_text_encoder", "save_every", "sample_every", "sample_prompts", "seed", "data.repeats",
    "data.dataset_config_path",
]
# Keys the page sets another way, so they get no form field.
NOT_ON_FORM = {"resume": "the Resume button continues a stopped job",
               "data.subsets": "[[data.subsets]] tables are written in the TOML box"}
# Every other key, in the config's order: the "Advanced" part of the form is built from these, so a new
# setting appears there with its help and type without an edit here.
ADVANCED_KEYS = [k.name for k in config_keys() if k.name not in BASIC_KEYS and k.name not in NOT_ON_FORM]
FORM_KEYS = BASIC_KEYS + ADVANCED_KEYS  # the order of the form's components (and of form_values)
CONFIGS = "configs"  # the workspace folder the page saves configs to and loads them from
KOHYA_CONFIGS = "configs/kohya"  # uploaded kohya dataset configs (their folders are checked: webui/security.py)


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


def toml_or_default(text: str) -> TrainConfig:
    """The TOML box's config, or the page's default config when the box does not parse (an edit of
    the form, a preset or an upload still applies; the TOML's problems show when it is used)."""
    try:
        return parse_toml(text)
    except ConfigError:
        return default_config()


def form_value(cfg: TrainConfig, name: str):
    """What the form field of key `name` shows for `cfg`."""
    key = config_key(name)
    v = key.get(cfg)
    if name == "output":
        return Path(v).stem if v else ""
    if name == "sample_prompts":
        return "\n".join(v) if isinstance(v, list) else (v or "")
    if key.kind in ("dict", "list"):
        return json.dumps(v) if v is not None else ""  # a JSON box (block ranks ...)
    if key.kind == "str":
        return v if v is not None else ""  # "" is an optional dropdown's "default" entry too
    if _text_number(key):
        return "" if v is None else str(v)  # a text box (_field): empty is unset
    return v


def form_values(cfg: TrainConfig) -> list:
    return [form_value(cfg, name) for name in FORM_KEYS]


def apply_form(cfg: TrainConfig, values: list) -> TrainConfig:
    """The form's values into `cfg`, each read as its key's type. Only values that differ from `cfg` are
    applied, as flags are: a changed `steps` clears an `epochs` from the TOML (and the other way round),
    so the field just edited wins over its partner."""
    given = {}
    for name, v in zip(FORM_KEYS, values):
        key = config_key(name)
        if name == "output":
            stem = (v or "").strip()
            v = f"loras/{safe_name(stem, 'output name')}.safetensors" if stem else ""
        elif name == "sample_prompts":
            v = [x.strip() for x in (v or "").splitlines() if x.strip()] or None
        else:
            raw, v = v, key.coerce(v)
            if raw == "" and key.kind == "str" and not key.optional:
                v = ""  # an emptied text box: the empty string (an empty dropdown sends None: unset)
        if v != key.get(cfg):  # equal values of another type (0 and 0.0) are no edit
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


# ---- saved configs (configs/ of the workspace) ---------------------------------------------------------


def list_configs(ws: Workspace) -> list[str]:
    """The saved configs, as workspace-relative paths (configs/NAME.toml)."""
    base = ws.root / CONFIGS
    return [f"{CONFIGS}/{p.name}" for p in sorted(base.glob("*.toml")) if not p.name.startswith(".")] if base.is_dir() else []


def save_config_file(ws: Workspace, text: str, name: str) -> Path:
    """The TOML box's config written to configs/NAME.toml, its paths relative to that file.

    Relative paths in a config file are read relative to the file (sd_lora.config.load_config), so the
    saved file trains the same with `sd-lora train configs/NAME.toml` from any folder.
    Refuses TOML that does not parse or names unknown keys (ConfigError); other problems are kept, so
    a half-done config can be saved too.
    """
    stem = (name or "").strip()
    stem = stem[: -len(".toml")] if stem.lower().endswith(".toml") else stem
    dest = ws.child(ws.root / CONFIGS, f"{safe_name(stem, 'config name')}.toml", kind="config name")
    cfg = confine_config(ws, parse_toml(text), snapshot=False)
    map_config_paths(cfg, lambda path, _name: os.path.relpath(path, dest.parent))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest, "w", encoding="utf-8") as f:
        f.write("# saved from the sd-lora web UI; relative paths are relative to this file\n" + dump_config(cfg))
    return dest


def load_config_file(ws: Workspace, user_path: str) -> TrainConfig:
    """A saved config read as `sd-lora train` reads it, with its paths shown workspace-relative.

    Raises PathError for a file outside configs/ or a path in it that leads out of the workspace,
    ConfigError for a file with unknown keys or wrong types.
    """
    if not (user_path or "").strip():
        raise PathError("load config: choose a saved config from the list (configs/ of the workspace)")
    path = ws.path(user_path, must_exist=True, kind="config file")
    if path.suffix.lower() != ".toml" or not path.is_relative_to(ws.root / CONFIGS):
        raise PathError(f"config file: {user_path!r} is not a .toml file in {CONFIGS}/ of the workspace")
    cfg = confine_config(ws, load_config(path), snapshot=False)
    return map_config_paths(cfg, lambda p, _name: ws.relative(p))


def list_dataset_configs(ws: Workspace) -> list[str]:
    """kohya dataset configs to pick: the uploaded ones (configs/kohya/) and TOML files in datasets/."""
    found = []
    for base, patterns in ((ws.root / KOHYA_CONFIGS, ("*.toml", "*.json")), (ws.root / "datasets", ("**/*.toml",))):
        for pattern in patterns:
            found += [p for p in base.glob(pattern) if p.is_file() and not any(x.startswith(".") for x in p.relative_to(ws.root).parts)]
    return sorted(ws.relative(p) for p in found)


def save_dataset_config(ws: Workspace, upload: str) -> str:
    """An uploaded kohya dataset config copied to configs/kohya/ (its name made plain); its workspace path.
    Its folders are checked when the config is validated or started (confine_dataset_config)."""
    src = Path(upload)
    if src.suffix.lower() not in (".toml", ".json"):
        raise PathError(f"kohya dataset config: {src.name!r} is not a .toml or .json file")
    dest = ws.child(ws.root / KOHYA_CONFIGS, safe_name(src.name, "uploaded file name"), kind="uploaded file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as f:
        f.write(src.read_bytes()[: MAX_DATASET_CONFIG_BYTES + 1])
    return ws.relative(dest)


# ---- what the page shows -------------------------------------------------------------------------------


def message_html(text: str = "", problems: list[str] | None = None, title: str = "") -> str:
    """The tab's message box: a note, or a list of problems in a red box that stays until the next action."""
    if problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
        head = html.escape(title or f"{len(problems)} problem(s):")
        # inline style: the box must look like an error with or without the app's CSS
        return (f'<div class="sd-message sd-problems" id="train-message" role="alert" data-kind="error" style="border: 2px solid '
                f'#dc2626; border-radius: 6px; padding: 6px 12px; background: rgba(220, 38, 38, 0.08)">'
                f"<b>{head}</b><ul>{items}</ul></div>")
    if not text:
        return '<div class="sd-message" id="train-message" data-kind="empty"></div>'
    return f'<div class="sd-message" id="train-message" data-kind="ok">{text}</div>'


def error_lines(exc: BaseException) -> list[str]:
    """The problems an exception carries: a ConfigError's list, else its message's lines."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return [str(e) for e in errors]
    lines = [x.strip(" -") for x in str(getattr(exc, "message", None) or exc).splitlines() if x.strip(" -")]
    return lines or [type(exc).__name__]


class Problems:
    """Keeps the Train tab's errors on the page, not only in a toast that fades after a few seconds.

    A handler wrapped by `guard` still raises (a toast for the page, an error for API callers such as
    gradio_client), and remembers the error for its browser session; the `.failure()` listener that
    follows each event (`show`) puts the same text in the message box, where it stays until the next
    action replaces it.
    """

    KEEP = 256  # errors not shown yet (an API caller's never are): the oldest are dropped

    def __init__(self):
        self._last: dict[str, list[str]] = {}

    def guard(self, fn):
        inner = guard(fn)  # our user-facing errors become gr.Error with their message

        @functools.wraps(fn)
        def wrapper(request: gr.Request, *args):
            try:
                return inner(*args)
            except gr.Error as e:
                self._remember(request, error_lines(e.__cause__ or e))  # guard raises `from` ours
                raise
            except Exception as e:
                self._remember(request, [f"{type(e).__name__}: {e} (the server's log has the details)"])
                raise

        # Gradio passes the request to a parameter annotated gr.Request: declare it in front of fn's own.
        sig = inspect.signature(fn)
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
        wrapper.__signature__ = sig.replace(parameters=[request, *sig.parameters.values()])
        wrapper.__annotations__ = {"request": gr.Request, **getattr(fn, "__annotations__", {})}
        return wrapper

    def _remember(self, request, lines: list[str]) -> None:
        key = getattr(request, "session_hash", None)
        if key is None:
            return
        self._last.pop(key, None)
        self._last[key] = lines
        while len(self._last) > self.KEEP:
            self._last.pop(next(iter(self._last)))

    def show(self, request: gr.Request) -> str:
        lines = self._last.pop(getattr(request, "session_hash", None), None) or ["the last action failed (the server's log has the details)"]
        return message_html(problems=lines, title="Not done:")


def _text_number(key) -> bool:
    """An optional number gets a text box (_field). `steps` stays a Number box: as a text box the browser
    test's edits of it raced (CI, 2026-12-01). It is empty (None) only when epochs is set, and then the
    epochs field's edits write it (form_to_toml_and_partner), so its None is never a stale 0."""
    return key.kind in ("int", "float") and key.optional and key.choices is None and key.name != "steps"


def _field(name: str, label: str, **kw):
    """The form component for a config key: a dropdown of its choices, a checkbox, or a number box,
    with the key's help as the hint under it."""
    key = config_key(name)
    if key.choices is not None:
        choices = [(str(c), c) for c in key.choices]
        if key.optional:  # unset is a choice too: "the model's", "the mixed-precision dtype" ...
            choices.insert(0, (f"default ({key.default_words() or 'unset'})", ""))
        return gr.Dropdown(choices, label=label, info=key.help, **kw)
    if key.kind == "bool":
        return gr.Checkbox(label=label, info=key.help, **kw)
    if key.kind in ("int", "float"):
        if _text_number(key):
            # Gradio's Number shows None as 0 and sends 0 on the next edit of any field, which would set
            # the key (lr = 0, max_timestep = 0 ...): a text box stays empty, and empty is unset.
            return gr.Textbox(label=label, info=key.help, placeholder=f"default: {key.default_words() or 'unset'}", **kw)
        return gr.Number(label=label, info=key.help, precision=0 if key.kind == "int" else None, **kw)
    if key.kind in ("dict", "list"):
        return gr.Textbox(label=label, info=f"{key.help} (JSON)", **kw)
    return gr.Textbox(label=label, info=key.help, **kw)


def _advanced_label(name: str) -> str:
    """An advanced field is labelled with its key as a TOML file writes it (what the docs table lists)."""
    key = config_key(name)
    words = key.default_words()
    return f"{name}" + (f" (default: {words})" if words and key.default is None else "")


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
        bits.append(rate_text(p.it_per_s))
        bits.append(f"ETA {_fmt_s(p.eta_s)}")
    if p.epoch is not None:
        bits.append(f"epoch {p.epoch}")
    if p.loss is not None:
        bits.append(f"loss {p.loss:.4f}")
    if p.val_losses:
        step, loss = p.val_losses[-1]
        bits.append(f"validation loss {loss:.4f} (step {step})")
    if p.stage and state["status"] in ACTIVE:
        bits.append(html.escape(p.stage))
    msg = html.escape(state.get("message") or "")
    return (
        f'<div class="sd-status" id="job-status" data-status="{html.escape(state["status"])}" data-step="{p.step}">'
        f'<div class="sd-progress"><div style="width:{frac * 100:.1f}%"></div></div>'
        f'<p>{" &middot; ".join(bits)}</p><p><small>{msg}</small></p></div>'
    )


def loss_svg(losses: list[tuple[int, float]], smoothing: float, width: int = 560, height: int = 240,
             validation: list[tuple[int, float]] | None = None) -> str:
    """The loss curve (raw and exponentially smoothed) as inline SVG: no chart library, nothing to load,
    cheap to redraw every second. The smoothing sees every step; each line gets <= ~600 points.
    `validation` ("val" events: (step, loss)) is a second line, with a dot per value, in the legend too."""
    if not losses:
        return '<div class="sd-loss"><small>loss: no steps yet</small></div>'
    validation = list(validation or [])
    smooth, ema = [], None
    for _, loss in losses:
        ema = loss if ema is None else smoothing * ema + (1 - smoothing) * loss
        smooth.append(ema)
    stride = max(1, len(losses) // 600)
    idx = sorted(set(range(0, len(losses), stride)) | {len(losses) - 1})
    steps = [losses[i][0] for i in idx]
    raw = [losses[i][1] for i in idx]
    sm = [smooth[i] for i in idx]
    val = validation[:: max(1, len(validation) // 600)]
    if validation and val[-1] != validation[-1]:
        val.append(validation[-1])
    lo, hi = min(raw + sm + [v for _, v in val]), max(raw + sm + [v for _, v in val])
    hi = hi if hi > lo else lo + 1e-6
    all_steps = steps + [st for st, _ in val]
    x0, x1 = min(all_steps), max(all_steps) if max(all_steps) > min(all_steps) else min(all_steps) + 1
    left, right, top, bottom = 52, 10, 10, 26

    def xy(st, v):
        return (f"{left + (st - x0) / (x1 - x0) * (width - left - right):.1f}",
                f"{top + (hi - v) / (hi - lo) * (height - top - bottom):.1f}")

    def pts(st_values, values):
        return " ".join(",".join(xy(st, v)) for st, v in zip(st_values, values))

    ticks = "".join(
        f'<text x="{left - 4}" y="{top + f * (height - top - bottom) + 4:.1f}" text-anchor="end">{hi - f * (hi - lo):.4g}</text>'
        for f in (0, 0.5, 1))
    val_svg = val_legend = ""
    if val:
        val_svg = (f'<polyline class="sd-val" points="{pts([st for st, _ in val], [v for _, v in val])}" fill="none" '
                   f'stroke="#2563eb" stroke-width="2"/>'
                   + "".join(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#2563eb"/>' for x, y in (xy(st, v) for st, v in val)))
        val_legend = f' &nbsp; <span style="color:#2563eb">&#9644; validation</span> {validation[-1][1]:.4f}'
    return (
        f'<div class="sd-loss"><svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="loss curve"'
        f' font-size="11" fill="currentColor">{ticks}'
        f'<text x="{left}" y="{height - 6}">step {x0}</text><text x="{width - right}" y="{height - 6}" text-anchor="end">step {x1}</text>'
        f'<polyline points="{pts(steps, raw)}" fill="none" stroke="#9ca3af" stroke-width="1"/>'
        f'<polyline points="{pts(steps, sm)}" fill="none" stroke="#ea580c" stroke-width="2"/>{val_svg}</svg>'
        f'<small><span style="color:#9ca3af">&#9644; loss</span> &nbsp; <span style="color:#ea580c">&#9644; smoothed</span>'
        f' &nbsp; last {losses[-1][1]:.4f}, smoothed {smooth[-1]:.4f}{val_legend}</small></div>'
    )


def storage_key(ws: Workspace) -> str:
    """The browser-storage key of a workspace's New-job form: stable across server restarts (so the form
    survives those too), different per workspace (so two workspaces on one host do not share forms)."""
    return "sd-lora-train-form-" + hashlib.sha256(str(ws.root).encode()).hexdigest()[:16]


def build(ctx, tab=None, timer_s: float = 1.0) -> None:
    queue = ctx.queue
    ws = ctx.workspace
    problems = Problems()
    shown = problems.guard

    def job_choices() -> list[tuple[str, str]]:
        return [(f"{j.get('name', '')} - {j['status']} ({j['id']})", j["id"]) for j in reversed(queue.jobs())]

    def default_job() -> str | None:
        active = queue.active_job()
        if active:
            return active["id"]
        ids = queue.job_ids()
        return ids[-1] if ids else None

    def workspace_lists():
        """Every list of workspace files in the tab, read now (a dataset uploaded a minute ago is in it)."""
        return [gr.update(choices=list_models(ws)), gr.update(choices=list_dirs(ws, "datasets")),
                gr.update(choices=list_configs(ws)), gr.update(choices=list_dataset_configs(ws))]

    # ---- form <-> TOML ----------------------------------------------------------------------------
    @shown
    def form_to_toml(text: str, *values):
        return dump_config(apply_form(toml_or_default(text), list(values)))

    def form_to_toml_and_partner(partner: str):
        """form_to_toml for a field that replaces another (steps <-> epochs): the other field's box is
        updated too (emptied when the edit cleared it), so it does not send its old number with the next
        edit and take its key back. Only the partner is written: the field being typed in is left alone."""
        @shown
        def handler(text: str, *values):
            cfg = apply_form(toml_or_default(text), list(values))
            return dump_config(cfg), form_value(cfg, partner)
        return handler

    @shown
    def toml_to_form(text: str):
        try:
            cfg = parse_toml(text)
        except ConfigError as e:
            return [gr.skip()] * len(FORM_KEYS) + [f"**TOML not applied:**\n\n{_md_errors(e.errors)}"]
        return form_values(cfg) + [""]

    @shown
    def apply_preset(text: str, gpu: str, size: str):
        cfg = toml_or_default(text)
        apply_presets(cfg, GPU_PRESETS.get(gpu, {}), SIZE_PRESETS.get(size, {}))
        return [dump_config(cfg)] + form_values(cfg)

    def restore(saved):
        """The form as this browser left it (its TOML); nothing changes when the browser has none.

        Runs when the tab is opened: Gradio mounts (and reads the browser storage of) a tab's components
        only when the tab is first shown, so on the page load itself the stored value is not there yet.
        """
        if not (isinstance(saved, str) and saved.strip()):
            return [gr.skip()] * (1 + len(FORM_KEYS))
        try:
            values = form_values(parse_toml(saved))
        except ConfigError:
            values = [gr.skip()] * len(FORM_KEYS)  # the TOML as typed; its problems show when it is used
        return [saved, *values]

    # ---- save / load a config file ----------------------------------------------------------------
    @shown
    def save_config(text: str, name: str):
        dest = save_config_file(ws, text, name)
        rel = ws.relative(dest)
        return gr.update(choices=list_configs(ws), value=rel), message_html(
            f"Saved <code>{html.escape(rel)}</code>. Train it from a shell with "
            f"<code>sd-lora train {html.escape(str(dest))}</code>.")

    @shown
    def load_saved(name: str):
        cfg = load_config_file(ws, name)
        return [dump_config(cfg), *form_values(cfg), message_html(f"Loaded <code>{html.escape(name)}</code>.")]

    @shown
    def upload_dataset_config(text: str, upload):
        """An uploaded kohya dataset config saved to configs/kohya/ and set as data.dataset_config_path."""
        if not upload:
            raise PathError("kohya dataset config: choose a .toml file to upload")
        rel = save_dataset_config(ws, upload if isinstance(upload, str) else upload.name)
        cfg = toml_or_default(text)
        cfg.data.dataset_config_path = rel
        return (gr.update(choices=list_dataset_configs(ws), value=rel), dump_config(cfg),
                message_html(f"Uploaded <code>{html.escape(rel)}</code>; its folders are checked when you validate or start."))

    # ---- validate / start / stop / resume ---------------------------------------------------------
    def checked_config(text: str) -> tuple[TrainConfig | None, list[str]]:
        try:
            cfg = confine(ctx, parse_toml(text))
        except ConfigError as e:
            return None, e.errors
        except PathError as e:
            return None, str(e).splitlines()  # a kohya dataset config: one line per folder refused
        return cfg, cfg.validate()

    @shown
    def validate(text: str):
        _cfg, errors = checked_config(text)
        if errors:
            return message_html(problems=errors, title=f"{len(errors)} problem(s):")
        return message_html("<b>Config OK.</b> Start it when ready.")

    @shown
    def start(text: str):
        cfg, errors = checked_config(text)
        if errors:
            return gr.update(), message_html(problems=errors, title=f"Not started, {len(errors)} problem(s):")
        job_id = queue.submit(cfg)
        return gr.update(choices=job_choices(), value=job_id), message_html(f"Queued job <code>{job_id}</code>.")

    @shown
    def stop(job_id: str):
        if not job_id:
            raise ValueError("stop: select a job first")
        st = queue.stop(job_id)
        return gr.update(choices=job_choices(), value=job_id), message_html(html.escape(st.get("message", "")))

    @shown
    def resume(job_id: str):
        if not job_id:
            raise ValueError("resume: select a stopped job first")
        new_id = queue.resume(job_id)
        return gr.update(choices=job_choices(), value=new_id), message_html(f"Queued job <code>{new_id}</code>, resuming <code>{job_id}</code>.")

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

    def buttons(st: dict | None, p=None):
        """Stop only for a job that can stop (queued, running, stopping); Resume only for a stopped or
        failed job that left a checkpoint. With no job selected, neither."""
        status = st["status"] if st else None
        can_resume = status in (STOPPED, FAILED) and bool(p and p.checkpoints)
        return gr.update(interactive=status in ACTIVE), gr.update(interactive=can_resume)

    def view(job_id: str, smoothing: float):
        job_id = job_id or default_job()
        if not job_id:
            return (gr.update(), "<p>No jobs yet: fill in the form and press Start.</p>", loss_svg([], 0), [], "", _jobs_table(),
                    *buttons(None))
        try:
            st = queue.state(job_id)
        except ValueError:
            return (gr.update(value=None), "<p>That job is gone.</p>", loss_svg([], 0), [], "", _jobs_table(), *buttons(None))
        p = queue.progress(job_id)
        samples = [(s, Path(s).stem) for s in p.samples if Path(s).is_file()][-24:]
        return (gr.update(choices=job_choices(), value=job_id), progress_html(st, p),
                loss_svg(p.losses, float(smoothing or 0), validation=p.val_losses), samples, "\n".join(queue.log_tail(job_id, 8000).splitlines()[-12:]),
                _jobs_table(), *buttons(st, p))

    def _jobs_table():
        import pandas as pd

        rows = [(j["id"], j.get("name", ""), j["status"], j.get("message", "")) for j in reversed(queue.jobs())]
        return pd.DataFrame(rows or [("", "", "", "")], columns=["id", "name", "status", "message"])

    # ---- layout -----------------------------------------------------------------------------------
    cfg0 = default_config()
    # The form starts with the default config's values (the TOML box shows the same config). Set at
    # construction, not by a load event: an event would also overwrite the form this browser stored.
    start_values = dict(zip(FORM_KEYS, form_values(cfg0)))

    def field(name: str, label: str, **kw):
        return _field(name, label, value=start_values[name], **kw)

    gr.Markdown("### Jobs (the running one is shown after a reload too)")
    with gr.Row():
        # allow_custom_value: jobs appear after the page was built; the queue checks every id it is given
        job = gr.Dropdown([], label="job", value=None, scale=3, allow_custom_value=True)
        # off until a job that can stop (or resume) is selected: the view turns them on
        stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", scale=1, interactive=False, elem_id="stop")
        resume_btn = gr.Button("Resume", scale=1, interactive=False, elem_id="resume")
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
                    f_model = gr.Dropdown([], label="base model (models/ in the workspace)", allow_custom_value=True,
                                          value=start_values["model"] or None, elem_id="train-model")
                    f_data = gr.Dropdown([], label="dataset folder", allow_custom_value=True,
                                         value=start_values["data.path"] or None, elem_id="train-data")
                    f_output = gr.Textbox(start_values["output"], label="output name (loras/NAME.safetensors)")
                with gr.Row():
                    f_steps = field("steps", "steps")
                    f_batch = field("batch_size", "batch size")
                    f_lr = field("lr", "learning rate")
                    f_seed = field("seed", "seed")
                    f_repeats = field("data.repeats", "repeats")
                with gr.Row():
                    f_method = field("network.method", "method")
                    f_preset = field("network.preset", "targets")
                    f_rank = field("network.rank", "rank")
                    f_alpha = field("network.alpha", "alpha")
                with gr.Row():
                    f_res = field("data.resolution", "resolution")
                    f_opt = field("optimizer", "optimizer")
                    f_mp = field("mixed_precision", "mixed precision")
                    f_gc = field("gradient_checkpointing", "gradient checkpointing")
                    f_te = field("network.train_text_encoder", "train text encoder")
                with gr.Row():
                    f_save = field("save_every", "save + checkpoint every N steps (0: end only)")
                    f_sample_every = field("sample_every", "sample every N steps (0: never)")
                with gr.Row():
                    # a kohya sd-scripts dataset config instead of the dataset folder: every folder it names must
                    # be an absolute path inside the workspace (checked on validate / start, webui/security.py)
                    f_kohya = gr.Dropdown([], label="kohya dataset config (instead of the dataset folder)",
                                          info=config_key("data.dataset_config_path").help, allow_custom_value=True,
                                          value=start_values["data.dataset_config_path"], scale=3,
                                          elem_id="train-dataset-config")
                    kohya_upload = gr.UploadButton("Upload kohya config", file_types=[".toml", ".json"], scale=1,
                                                   elem_id="upload-dataset-config")
                f_prompts = gr.Textbox(start_values["sample_prompts"], label="sample prompts (one a line; --n --w --h --s --d --l options)", lines=2)
            with gr.Column(scale=2):
                toml_box = gr.Code(dump_config(cfg0), language=None, label="config (TOML): edit here or in the form",
                                   lines=22, max_lines=34, interactive=True, elem_id="train-toml")
                toml_note = gr.Markdown()
                with gr.Row():
                    cfg_name = gr.Textbox(label=f"save as ({CONFIGS}/NAME.toml)", scale=3, elem_id="config-name")
                    save_btn = gr.Button("Save config", scale=1, elem_id="save-config")
                with gr.Row():
                    cfg_file = gr.Dropdown([], label=f"saved configs ({CONFIGS}/)", value=None, scale=3,
                                           allow_custom_value=True, elem_id="config-file")
                    load_btn = gr.Button("Load config", scale=1, elem_id="load-config")
        basic = [f_model, f_data, f_output, f_steps, f_batch, f_lr, f_method, f_preset, f_rank, f_alpha, f_res, f_opt, f_mp,
                 f_gc, f_te, f_save, f_sample_every, f_prompts, f_seed, f_repeats, f_kohya]
        assert len(basic) == len(BASIC_KEYS)
        advanced = []
        with gr.Accordion(f"Advanced: every other setting ({len(ADVANCED_KEYS)})", open=False, elem_id="train-advanced"):
            gr.Markdown("Each field is a config key (docs/training.md lists them all); an empty box means the default.")
            for section in (None, "data", "network"):
                names = [n for n in ADVANCED_KEYS if config_key(n).section == section]
                gr.Markdown(f"**{section or 'training'}**")
                for i in range(0, len(names), 4):
                    with gr.Row():
                        advanced += [field(n, _advanced_label(n), elem_id="adv-" + n.replace(".", "-")) for n in names[i:i + 4]]
        form = basic + advanced
        assert len(form) == len(FORM_KEYS)
        with gr.Row():
            validate_btn = gr.Button("Validate")
            start_btn = gr.Button("Start", variant="primary", elem_id="start")
        message = gr.HTML(message_html(), elem_id="train-message-box")
    # the form's TOML in this browser's storage: a reload (or a restarted server) shows it as it was left
    saved = gr.BrowserState(None, storage_key=storage_key(ws), secret=storage_key(ws))

    # ---- wiring -------------------------------------------------------------------------------------
    def failing(event):
        """After an event: its error (if any) stays in the message box."""
        event.failure(problems.show, None, message, api_name=False, show_progress="hidden", queue=False)

    for name, comp in zip(FORM_KEYS, form):
        # always_last: keys typed while the previous edit is on its way are not dropped (Gradio's default);
        # one queue for all fields: edits are applied in the order they were made
        partner = config_key(name).partner
        fn, outputs = ((form_to_toml_and_partner(partner), [toml_box, form[FORM_KEYS.index(partner)]]) if partner in FORM_KEYS
                       else (form_to_toml, toml_box))
        failing(comp.input(fn, [toml_box, *form], outputs, api_name=False, show_progress="hidden",
                           trigger_mode="always_last", concurrency_limit=1, concurrency_id="train-form"))
    failing(toml_box.blur(toml_to_form, toml_box, [*form, toml_note], api_name=False, show_progress="hidden"))
    # every change of the TOML (typed, from the form, a preset, a load) is kept in the browser, by the browser
    # alone (no round trip to the server that a reload right after an edit would cut off)
    toml_box.change(None, toml_box, saved, js="(text) => text", api_name=False, queue=False, show_progress="hidden")
    failing(preset_btn.click(apply_preset, [toml_box, gpu, size], [toml_box, *form], api_name="apply_preset"))
    failing(save_btn.click(save_config, [toml_box, cfg_name], [cfg_file, message], api_name="save_config"))
    failing(load_btn.click(load_saved, cfg_file, [toml_box, *form, message], api_name="load_config"))
    failing(kohya_upload.upload(upload_dataset_config, [toml_box, kohya_upload], [f_kohya, toml_box, message],
                                api_name="upload_dataset_config"))
    failing(validate_btn.click(validate, toml_box, message, api_name="validate_config"))
    failing(start_btn.click(start, toml_box, [job, message], api_name="start_job"))
    failing(stop_btn.click(stop, job, [job, message], api_name="stop_job"))
    failing(resume_btn.click(resume, job, [job, message], api_name="resume_job"))
    outputs = [job, status_html, plot, samples, log, jobs_table, stop_btn, resume_btn]
    job.input(view, [job, smoothing], outputs, api_name=False)
    smoothing.release(view, [job, smoothing], outputs, api_name=False)
    timer = gr.Timer(timer_s)
    timer.tick(view, [job, smoothing], outputs, api_name=False, show_progress="hidden", queue=False)
    gr.api(job_status, api_name="job_status")
    # a page load picks the running job (or the newest), reads the workspace's lists again and puts
    # back this browser's form; opening the tab reads the lists again too (like Generate and Library)
    demo = gr.context.Context.root_block
    demo.load(lambda: gr.update(choices=job_choices(), value=default_job()), None, job, api_name=False)
    demo.load(workspace_lists, None, [f_model, f_data, cfg_file, f_kohya], api_name=False)
    demo.load(restore, saved, [toml_box, *form], api_name=False)
    if tab is not None:
        tab.select(workspace_lists, None, [f_model, f_data, cfg_file, f_kohya], api_name=False)
        # the stored form is readable once the tab is shown (see restore); it equals the form after that
        tab.select(restore, saved, [toml_box, *form], api_name=False)


def _md_errors(errors: list[str]) -> str:
    return "\n".join(f"- {html.escape(e)}" for e in errors)
