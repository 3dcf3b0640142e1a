"""Helpers shared by the tabs: error reporting, folder listings, and the thin calls into sd_lora's
captioning API (kept here so the tab modules stay about layout and wiring)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import gradio as gr

from sd_lora import artifacts

from ..jobs import JobError
from ..security import PathError, Workspace


# Lists of workspace files (models, datasets, LoRAs, configs, jobs) start EMPTY and are filled by the
# page's load (and tab-select) events. Gradio 6 embeds the app's API description, with every dropdown's
# choices and default, even in the login page it serves to a visitor who has not logged in
# (gradio/routes.py `main`: `gradio_api_info` in the template context whatever the auth state), so
# choices given at construction would show the workspace's file names to anyone who can reach the port.


def guard(fn):
    """Show our user-facing errors (bad path, bad config, ...) as a red toast / API error, not a traceback.

    Gradio reads the wrapped function's signature (gr.SelectData, gr.Progress), which functools.wraps keeps.
    """
    user_errors = (PathError, JobError, ValueError, FileNotFoundError, PermissionError)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except user_errors as e:
                raise gr.Error(str(e), print_exception=False) from e
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors as e:
            raise gr.Error(str(e), print_exception=False) from e
    return wrapper


def list_dirs(ws: Workspace, sub: str) -> list[str]:
    """Folders directly under `<workspace>/<sub>`, as workspace-relative paths (hidden ones skipped)."""
    base = ws.root / sub
    if not base.is_dir():
        return []
    return [f"{sub}/{p.name}" for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def list_models(ws: Workspace) -> list[str]:
    """Base models in `<workspace>/models`: diffusers folders (model_index.json) and single files."""
    base = ws.root / "models"
    out = []
    for p in sorted(base.iterdir()) if base.is_dir() else []:
        if p.name.startswith("."):
            continue
        if (p.is_dir() and (p / "model_index.json").is_file()) or p.suffix.lower() in (".safetensors", ".ckpt"):
            out.append(f"models/{p.name}")
    return out


def list_loras(ws: Workspace) -> list[str]:
    """LoRA files in `<workspace>/loras` (recursively), skipping hidden folders and the folders a training
    run writes besides its LoRA (checkpoints, samples, TensorBoard logs; see sd_lora.artifacts)."""
    base = ws.root / "loras"
    out = []
    for p in sorted(base.rglob("*.safetensors")) if base.is_dir() else []:
        rel = p.relative_to(base)
        if any(part.startswith(".") or artifacts.is_run_output(part) for part in rel.parts[:-1]):
            continue
        out.append(rel.with_suffix("").as_posix())
    return out


# ---- captions (sd_lora.caption) ---------------------------------------------------------------------


def captioner_names() -> list[str]:
    from sd_lora.caption import available_captioners

    return list(available_captioners())


def bulk_caption_edit(root: Path, op: str, a: str, b: str) -> int:
    """One bulk edit over every caption under `root`; returns how many caption files changed."""
    from sd_lora.caption import edit

    a = (a or "").strip()
    if op != "find / replace" and op != "fill missing" and not a:
        raise ValueError(f"{op}: type the text to use in the first box")
    if op == "add trigger word":
        return edit.add_trigger(root, a)
    if op == "add prefix":
        return edit.add_prefix_suffix(root, prefix=a)
    if op == "add suffix":
        return edit.add_prefix_suffix(root, suffix=a)
    if op == "find / replace":
        return edit.find_replace(root, a, b or "")
    if op == "fill missing":
        return edit.fill_missing(root, a or "{folder}", trigger=(b or "").strip())
    if op == "remove tag":
        return edit.remove_tags_from(root, [t.strip() for t in a.split(",") if t.strip()])
    raise ValueError(f"unknown bulk operation {op!r}")


def run_captioner(root: Path, name: str, mode: str, trigger: str, model: Path | None, template: str, progress) -> str:
    """Caption every image under `root` with the captioner `name`, reporting progress to the page."""
    import sd_lora

    if not name:
        raise ValueError("auto-caption: choose a captioner")
    options = {}
    if name == "template" and (template or "").strip():
        options["template"] = template.strip()
    report = sd_lora.caption_folder(
        root, name, model=model, mode=mode, trigger=(trigger or "").strip(), progress=False,
        callback=lambda done, total: progress((done, total), desc="captioning", unit="images"), **options,
    )
    return "\n".join(report.lines())
