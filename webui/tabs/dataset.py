"""Dataset tab: pick or upload a folder, see thumbnails with captions, edit captions one by one or in
bulk, auto-caption with progress, and check what the trainer will see."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from sd_lora.config import IMAGE_EXTENSIONS, DataConfig
from sd_lora.caption.edit import existing_caption, find_images, write_caption

from ..security import PathError, safe_name
from .common import bulk_caption_edit, captioner_names, guard, list_dirs, run_captioner

MAX_GALLERY = 400  # thumbnails shown; the check below still counts every image
BULK_OPS = ["add trigger word", "add prefix", "add suffix", "find / replace", "fill missing", "remove tag"]


def caption_of(image: Path) -> str:
    """The caption the trainer will read for `image` (.txt, then .caption), or ""."""
    return existing_caption(image) or ""


def build(ctx, tab=None) -> None:
    ws = ctx.workspace

    def dataset_choices() -> list[str]:
        return list_dirs(ws, "datasets")

    def folder_of(folder: str) -> Path:
        if not folder:
            raise PathError("dataset folder: choose one from the list, or upload images into a new one")
        p = ws.path(folder, must_exist=True, kind="dataset folder")
        if not p.is_dir():
            raise PathError(f"dataset folder: {folder!r} is a file; choose a folder")
        return p

    @guard
    def gallery(folder: str):
        root = folder_of(folder)
        imgs = find_images(root)
        items = [(str(p), f"{p.relative_to(root)}: {caption_of(p) or '(no caption)'}") for p in imgs[:MAX_GALLERY]]
        missing = sum(1 for p in imgs if not caption_of(p))
        note = f"{len(imgs)} images, {missing} without a caption" + (f" (showing the first {MAX_GALLERY})" if len(imgs) > MAX_GALLERY else "")
        return items, note

    @guard
    def select(folder: str, evt: gr.SelectData):
        root = folder_of(folder)
        imgs = find_images(root)
        if evt.index is None or evt.index >= len(imgs):
            return "", ""
        p = imgs[evt.index]
        return str(p.relative_to(root)), caption_of(p)

    @guard
    def save_caption(folder: str, image: str, caption: str):
        root = folder_of(folder)
        img = ws.path(root / image, must_exist=True, kind="image")
        if img.suffix.lower() not in IMAGE_EXTENSIONS:
            raise PathError(f"image: {image!r} is not an image file")
        write_caption(img, caption)
        items, note = gallery(folder)
        return items, note, f"saved caption of {image}"

    @guard
    def upload(folder: str, new_name: str, files):
        if new_name:
            root = ws.child(ws.root / "datasets", new_name, kind="new dataset name")
            root.mkdir(parents=True, exist_ok=True)
            folder = ws.relative(root)
        else:
            root = folder_of(folder)
        n = 0
        for f in files or []:
            src = Path(f if isinstance(f, str) else f.name)
            if src.suffix.lower() not in IMAGE_EXTENSIONS + (".txt", ".caption"):
                continue
            shutil.copyfile(src, root / safe_name(Path(src).name, "uploaded file name"))
            n += 1
        items, note = gallery(folder)
        return gr.update(choices=dataset_choices(), value=folder), items, note, f"added {n} file(s) to {folder}"

    @guard
    def bulk(folder: str, op: str, a: str, b: str):
        root = folder_of(folder)
        changed = bulk_caption_edit(root, op, a, b)
        items, note = gallery(folder)
        return items, note, f"{op}: changed {changed} caption(s)"

    @guard
    def auto_caption(folder: str, captioner: str, mode: str, trigger: str, model: str, template: str,
                     progress=gr.Progress()):
        root = folder_of(folder)
        model_path = ws.path(model, must_exist=True, kind="captioner model") if (model or "").strip() else None
        summary = run_captioner(root, captioner, mode, trigger, model_path, template, progress)
        items, note = gallery(folder)
        return items, note, summary

    @guard
    def check(folder: str, repeats: int, resolution: int):
        import sd_lora

        root = folder_of(folder)
        ds = sd_lora.scan_dataset(DataConfig(path=str(root), repeats=int(repeats), resolution=int(resolution)))
        lines = ds.report.lines()
        lines.insert(1, f"{ds.num_repeated} samples per epoch (images x repeats)")
        return "\n".join(lines)

    gr.Markdown("Datasets live in `datasets/` of the workspace: a folder of images with `.txt` captions, "
                "or kohya `N_name` sub-folders (N = repeats).")
    with gr.Row():
        folder = gr.Dropdown(dataset_choices(), label="dataset folder", allow_custom_value=True, scale=3,
                             elem_id="dataset-folder")
        refresh = gr.Button("Refresh", scale=0)
    with gr.Accordion("Upload images", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="new dataset name (empty: add to the folder above)")
            files = gr.File(label="images and captions", file_count="multiple", file_types=["image", ".txt", ".caption"])
        upload_btn = gr.Button("Upload")
    note = gr.Markdown()
    status = gr.Textbox(label="status", interactive=False, lines=1)
    with gr.Row():
        with gr.Column(scale=3):
            thumbs = gr.Gallery(label="images", columns=6, height=420, allow_preview=False, object_fit="cover")
        with gr.Column(scale=2):
            image = gr.Textbox(label="selected image (click a thumbnail)")
            caption = gr.Textbox(label="caption", lines=3)
            save = gr.Button("Save caption", variant="primary")
    with gr.Accordion("Bulk edit captions", open=False):
        with gr.Row():
            op = gr.Dropdown(BULK_OPS, value=BULK_OPS[0], label="operation")
            arg_a = gr.Textbox(label="text: trigger word / prefix / suffix / find / tags to remove / fill template")
            arg_b = gr.Textbox(label="replace with (find / replace); trigger word (fill missing)")
        bulk_btn = gr.Button("Apply to every caption")
    with gr.Accordion("Auto-caption", open=False):
        with gr.Row():
            names = captioner_names()
            captioner = gr.Dropdown(names, label="captioner", value=names[0] if names else None)
            mode = gr.Radio(["fill", "replace", "append"], value="fill", label="existing captions")
            trigger = gr.Textbox(label="trigger word (optional)")
        with gr.Row():
            cap_model = gr.Textbox(label="captioner model folder (transformers / wd14; e.g. models/wd14-tagger)")
            template = gr.Textbox(label="template (template captioner)", value="{trigger}, {folder}")
        caption_btn = gr.Button("Caption the folder")
    with gr.Accordion("Check: what the trainer will see", open=True):
        with gr.Row():
            repeats = gr.Number(1, label="repeats (folders not named N_name)", precision=0)
            resolution = gr.Number(512, label="resolution", precision=0)
            check_btn = gr.Button("Check")
        report = gr.Textbox(label="report", lines=6, interactive=False)

    def initial():
        # a page load shows the first dataset (the dropdown's value alone would not fill the gallery)
        choices = dataset_choices()
        if not choices:
            return gr.update(choices=[]), [], "No datasets yet: upload images into a new one."
        items, text = gallery(choices[0])
        return gr.update(choices=choices, value=choices[0]), items, text

    def reopened(current: str | None):
        """The tab opened again: the list and the gallery as the workspace is now (a dataset uploaded in the
        Train tab, captions written from a shell)."""
        choices = dataset_choices()
        if current not in choices:
            return initial()
        items, text = gallery(current)
        return gr.update(choices=choices), items, text

    gr.context.Context.root_block.load(initial, None, [folder, thumbs, note], api_name=False)
    if tab is not None:
        tab.select(reopened, folder, [folder, thumbs, note], api_name=False)
    refresh.click(lambda: gr.update(choices=dataset_choices()), None, folder, api_name=False)
    folder.change(gallery, folder, [thumbs, note], api_name="dataset_gallery")
    thumbs.select(select, folder, [image, caption], api_name=False)
    save.click(save_caption, [folder, image, caption], [thumbs, note, status], api_name="save_caption")
    upload_btn.click(upload, [folder, new_name, files], [folder, thumbs, note, status], api_name="upload_images")
    bulk_btn.click(bulk, [folder, op, arg_a, arg_b], [thumbs, note, status], api_name="bulk_caption")
    caption_btn.click(auto_caption, [folder, captioner, mode, trigger, cap_model, template], [thumbs, note, status], api_name="auto_caption")
    check_btn.click(check, [folder, repeats, resolution], report, api_name="check_dataset")
