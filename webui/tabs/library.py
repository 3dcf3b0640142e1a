"""Library tab: the LoRA files in loras/ with their metadata, trigger words, size, base model and a
sample image; inspect, edit the metadata (title, description, trigger words, cover), convert, merge,
resize and extract (sd_lora's public API)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from sd_lora import artifacts

from ..security import PathError, safe_name
from .common import guard, list_loras, list_models

BASE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd2-v": "SD 2.x (v)", "sdxl": "SDXL"}


def sample_image(path: Path, metadata: dict | None = None):
    """A picture for a LoRA: `<stem>.png` / `<stem>.preview.png` next to it (A1111/Civitai habit), else
    the cover stored in the file (`modelspec.thumbnail`, a PIL image), else the first prompt's sample of
    the last sampling step of its training run, else the run's sample grid."""
    for cand in (path.with_suffix(".png"), path.with_suffix(".preview.png")):
        if cand.is_file():
            return cand
    if metadata:
        from sd_lora.formats.edit import read_cover

        cover = read_cover(metadata)
        if cover is not None:
            return cover
    folder = artifacts.samples_dir(path)
    samples = {artifacts.sample_step(p): p for p in folder.iterdir()} if folder.is_dir() else {}
    samples.pop(None, None)  # files that are not samples
    if samples:
        return samples[max(samples, key=lambda at: (at[0], -at[1]))]  # at = (step, prompt index)
    grid = artifacts.sample_grid(path)
    return grid if grid.is_file() else None


def summary(lora, path: Path) -> dict:
    md = lora.metadata
    ranks = sorted({m.rank for m in lora.modules.values() if m.rank})
    return {
        "name": path.stem,
        "size_mb": round(path.stat().st_size / 1e6, 2),
        "base_model": BASE_NAMES.get(lora.arch or "", md.get("ss_base_model_version") or md.get("modelspec.architecture") or "?"),
        "format": lora.format,
        "rank": md.get("ss_network_dim") or ("/".join(map(str, ranks)) if ranks else "?"),
        "alpha": md.get("ss_network_alpha", "?"),
        "modules": len(lora.modules),
        "trigger_words": ", ".join(lora.trigger_words),
        "steps": md.get("ss_steps", ""),
        "title": md.get("modelspec.title", md.get("ss_output_name", "")),
    }


COLUMNS = ["name", "size_mb", "base_model", "format", "rank", "alpha", "modules", "trigger_words", "steps", "title"]
# pixels per column: the headers fit on one line, the long text columns get the room
COLUMN_WIDTHS = ["220px", "80px", "100px", "80px", "60px", "60px", "80px", "220px", "70px", "160px"]


def order_loras(names: list[str], show_steps: bool) -> list[str]:
    """Final LoRAs first (by name), then, if `show_steps`, the intermediate step files of training runs
    (artifacts.intermediate_lora) grouped by run, oldest step first."""
    steps = {n: artifacts.intermediate_step(f"{n}.safetensors") for n in names}
    finals = sorted(n for n in names if steps[n] is None)
    if not show_steps:
        return finals
    run = {n: n[: n.rindex("-step")] for n in names if steps[n] is not None}
    return finals + sorted(run, key=lambda n: (run[n], steps[n]))


def selected_name(evt) -> str | None:
    """The LoRA of a clicked table row (gr.SelectData: the row's values, name first)."""
    row = getattr(evt, "row_value", None)
    return str(row[0]) if row and row[0] else None


def _error_text(report) -> str:
    """The approximation error a tool reports (sd_lora.tools.ToolReport), for the status line."""
    return f" (relative delta error {report.rel_error:.4f})"


def build(ctx, tab=None) -> None:
    ws = ctx.workspace
    lib = ws.root / "loras"

    def lora_path(name: str) -> Path:
        if not name:
            raise PathError("LoRA: choose one from the table")
        p = ws.path(Path("loras") / f"{name}.safetensors", must_exist=True, kind="LoRA")
        if not p.is_relative_to(lib):
            raise PathError(f"LoRA: {name!r} is not in the library (loras/ of the workspace)")
        return p

    @guard
    def table(show_steps: bool = False):
        import pandas as pd

        from sd_lora import load_lora

        rows = []
        for name in order_loras(list_loras(ws), bool(show_steps)):
            p = lib / f"{name}.safetensors"
            try:
                rows.append(summary(load_lora(p), p) | {"name": name})
            except (ValueError, OSError) as e:
                rows.append({"name": name, "size_mb": round(p.stat().st_size / 1e6, 2), "base_model": f"unreadable: {e}"})
        cols = COLUMNS
        frame = pd.DataFrame(rows, columns=cols).fillna("") if rows else pd.DataFrame([[""] * len(cols)], columns=cols)
        return frame, gr.update(choices=[r["name"] for r in rows])

    @guard
    def inspect(name: str):
        from sd_lora import load_lora

        p = lora_path(name)
        lora = load_lora(p)
        info = summary(lora, p)
        md = dict(sorted(lora.metadata.items()))
        if "ss_tag_frequency" in md:
            try:
                md["ss_tag_frequency"] = json.loads(md["ss_tag_frequency"])
            except json.JSONDecodeError:
                pass
        if "modelspec.thumbnail" in md:  # a data URI of kilobytes: shown as the picture, not as text
            md["modelspec.thumbnail"] = f"(cover image, {len(md['modelspec.thumbnail'])} characters)"
        img = sample_image(p, lora.metadata)
        return {"summary": info, "metadata": md}, (str(img) if isinstance(img, Path) else img), str(p)

    @guard
    def current_fields(name: str):
        """The edit form's fields for the chosen LoRA (what edit_metadata would change)."""
        from sd_lora.io import read_safetensors_header

        if not name:
            return "", "", "", ""
        md = read_safetensors_header(lora_path(name))[1]
        return (md.get("modelspec.title", ""), md.get("ss_output_name", ""), md.get("modelspec.trigger_phrase", ""),
                md.get("modelspec.description", ""))

    @guard
    def edit(name: str, title: str, output_name: str, triggers: str, description: str, cover=None, remove_cover: bool = False):
        import sd_lora

        p = lora_path(name)
        # Fields left as the form showed them are not passed, so the file changes only where the user
        # changed something (an empty field removes that entry).
        given = dict(zip(("title", "output_name", "trigger_words", "description"),
                         ((v or "").strip() for v in (title, output_name, triggers, description))))
        current = dict(zip(given, current_fields(name)))
        changes = {k: v for k, v in given.items() if v != current[k]}
        if remove_cover or cover is not None:
            changes["cover"] = "" if remove_cover else cover
        if not changes:
            return f"loras/{p.name}: nothing changed"
        md = sd_lora.edit_metadata(p, **changes)
        words = ", ".join(sd_lora.load_lora(p).trigger_words) or "none"
        return f"wrote loras/{p.name}: title {md.get('modelspec.title', '(none)')!r}, trigger words {words}" + (
            ", cover image stored" if md.get("modelspec.thumbnail") else "")

    @guard
    def convert(name: str, fmt: str, new_name: str):
        import sd_lora

        src = lora_path(name)
        stem = safe_name(new_name or f"{Path(name).name}-{fmt}", "new name")
        # PEFT adapters are folders; kohya and diffusers are single .safetensors files
        dst = ws.child(lib, stem if fmt == "peft" else f"{stem}.safetensors", kind="new name")
        out = sd_lora.convert_lora(src, dst, fmt)
        return f"wrote {ws.relative(out)} ({fmt} format)"

    @guard
    def merge(names: list[str], weights: str, new_name: str):
        import sd_lora

        paths = [lora_path(n) for n in names or []]
        if len(paths) < 2:
            raise ValueError("merge: choose at least two LoRAs")
        ws_ = [float(x) for x in (weights or "").split(",") if x.strip()] or [1.0] * len(paths)
        if len(ws_) != len(paths):
            raise ValueError(f"merge: {len(paths)} LoRAs but {len(ws_)} weights; give one weight each, comma-separated")
        dst = ws.child(lib, f"{safe_name(new_name, 'new name')}.safetensors", kind="new name")
        report = sd_lora.merge_loras(list(zip(paths, ws_)), dst)
        return f"wrote loras/{dst.name}" + _error_text(report)

    @guard
    def resize(name: str, rank: int, new_name: str):
        import sd_lora

        src = lora_path(name)
        dst = ws.child(lib, f"{safe_name(new_name or f'{Path(name).name}-r{int(rank)}', 'new name')}.safetensors", kind="new name")
        report = sd_lora.resize_lora(src, dst, int(rank))
        return f"wrote loras/{dst.name}" + _error_text(report)

    @guard
    def extract(base: str, tuned: str, rank: int, new_name: str):
        import sd_lora

        if not base or not tuned:
            raise ValueError("extract: choose the base model and the fine-tuned model (from models/ in the workspace)")
        a = ws.path(base, must_exist=True, kind="base model")
        b = ws.path(tuned, must_exist=True, kind="fine-tuned model")
        stem = safe_name(new_name or f"{Path(tuned).stem}-extract-r{int(rank)}", "new name")
        dst = ws.child(lib, f"{stem}.safetensors", kind="new name")
        report = sd_lora.extract_lora(a, b, dst, rank=int(rank))
        return f"wrote loras/{dst.name}" + _error_text(report)

    gr.Markdown("LoRA files in `loras/` of the workspace (trained ones land there too).")
    with gr.Row():
        refresh = gr.Button("Refresh")
        show_steps = gr.Checkbox(False, label="show intermediate step files (name-step000100)")
    frame = gr.Dataframe(label="library (click a row to select it)", interactive=False, wrap=False,
                         column_widths=COLUMN_WIDTHS, elem_id="library-table")
    with gr.Row():
        with gr.Column(scale=3):
            name = gr.Dropdown([], label="LoRA", allow_custom_value=True, elem_id="library-name")
            inspect_btn = gr.Button("Inspect")
            details = gr.JSON(label="metadata")
        with gr.Column(scale=2):
            preview = gr.Image(label="sample image", interactive=False, height=280)
            download = gr.File(label="download", interactive=False)
    with gr.Accordion("Edit metadata (title, trigger words, description, cover)", open=False):
        gr.Markdown("Written into the file itself (the tensors are kept byte for byte, so its hashes stay valid); "
                    "an empty field removes that entry. Trigger words: comma-separated, they come first.")
        with gr.Row():
            ed_title = gr.Textbox(label="title (modelspec.title)", elem_id="library-edit-title")
            ed_output = gr.Textbox(label="output name (ss_output_name)")
            ed_triggers = gr.Textbox(label="trigger words, comma-separated", elem_id="library-edit-triggers")
        with gr.Row():
            ed_description = gr.Textbox(label="description (markdown)", lines=4, scale=3)
            with gr.Column(scale=2):
                ed_cover = gr.Image(label="cover image (stored at 256 px; empty: keep the current one)", type="pil",
                                    sources=["upload", "clipboard"], height=200)
                ed_remove_cover = gr.Checkbox(False, label="remove the stored cover")
        ed_btn = gr.Button("Save metadata", elem_id="library-edit-save")
    with gr.Accordion("Convert", open=False):
        with gr.Row():
            fmt = gr.Dropdown(["kohya", "diffusers", "peft"], value="kohya", label="to format")
            conv_name = gr.Textbox(label="new name (optional)")
            conv_btn = gr.Button("Convert")
    with gr.Accordion("Merge", open=False):
        with gr.Row():
            merge_names = gr.Dropdown([], multiselect=True, label="LoRAs to merge", allow_custom_value=True)
            merge_weights = gr.Textbox(label="weights, comma-separated (default 1 each)")
            merge_name = gr.Textbox(label="new name")
            merge_btn = gr.Button("Merge")
    with gr.Accordion("Resize (SVD to a lower rank)", open=False):
        with gr.Row():
            rank = gr.Number(8, label="new rank", precision=0)
            resize_name = gr.Textbox(label="new name (optional)")
            resize_btn = gr.Button("Resize")
    with gr.Accordion("Extract (a LoRA from a fine-tuned model and its base)", open=False):
        with gr.Row():
            # choices start empty and are filled on load (common.py: the login page shows the initial ones)
            ex_base = gr.Dropdown([], label="base model (models/)")
            ex_tuned = gr.Dropdown([], label="fine-tuned model (models/)")
            ex_rank = gr.Number(16, label="rank", precision=0)
            ex_name = gr.Textbox(label="new name (optional)")
            ex_btn = gr.Button("Extract")
    tool_status = gr.Markdown()

    def table_and_choices(steps: bool = False):
        f, upd = table(steps)
        return f, upd, upd

    refresh.click(table_and_choices, show_steps, [frame, name, merge_names], api_name="library")
    show_steps.change(table_and_choices, show_steps, [frame, name, merge_names], api_name=False)
    gr.context.Context.root_block.load(table_and_choices, show_steps, [frame, name, merge_names], api_name=False)
    if tab is not None:
        tab.select(table_and_choices, show_steps, [frame, name, merge_names], api_name=False)

    def pick(evt: gr.SelectData):
        # the row's LoRA becomes the selection that Inspect, Convert and Resize act on
        return gr.update(value=selected_name(evt)) if selected_name(evt) else gr.update()

    frame.select(pick, None, name, api_name=False)
    name.change(current_fields, name, [ed_title, ed_output, ed_triggers, ed_description], api_name=False)
    ed_btn.click(edit, [name, ed_title, ed_output, ed_triggers, ed_description, ed_cover, ed_remove_cover], tool_status,
                 api_name="edit_lora_metadata")
    inspect_btn.click(inspect, name, [details, preview, download], api_name="inspect_lora")
    conv_btn.click(convert, [name, fmt, conv_name], tool_status, api_name="convert_lora")
    merge_btn.click(merge, [merge_names, merge_weights, merge_name], tool_status, api_name="merge_loras")
    resize_btn.click(resize, [name, rank, resize_name], tool_status, api_name="resize_lora")
    ex_btn.click(extract, [ex_base, ex_tuned, ex_rank, ex_name], tool_status, api_name="extract_lora")

    def model_choices():
        return [gr.update(choices=list_models(ws))] * 2

    refresh.click(model_choices, None, [ex_base, ex_tuned], api_name=False)
    gr.context.Context.root_block.load(model_choices, None, [ex_base, ex_tuned], api_name=False)
    if tab is not None:
        tab.select(model_choices, None, [ex_base, ex_tuned], api_name=False)
