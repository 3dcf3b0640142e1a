"""The Gradio app: builds the Blocks from one function per tab and launches it offline.

Offline means no request leaves the machine: a theme with system fonts only (Gradio's default theme
pulls Google Fonts), analytics and the version check off, no share link unless asked for, and the
run-history page (which can talk to a Hugging Face bucket) off. tests/test_webui_browser.py checks
in a real browser that every request the page makes goes to the app itself.
"""

from __future__ import annotations

import contextlib
import os
import time

# Gradio reads these at import time (analytics, version check, telemetry of huggingface_hub).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass, field  # noqa: E402

import gradio as gr  # noqa: E402

from .jobs import JobQueue  # noqa: E402
from .security import Workspace, exposure_warning  # noqa: E402

MAX_UPLOAD = "50mb"  # per file; a training image is rarely over 20 MB
START_CHECK_S = 60  # how long launch() waits for its own server to answer (_patient_start_check)
CSS = """
.sd-progress {width: 100%; height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden}
.sd-progress > div {height: 100%; background: var(--color-accent); transition: width 0.5s}
.sd-status {font-variant-numeric: tabular-nums}
/* a disabled button looks like one whatever its variant (a faded red Stop still read as pressable) */
button:disabled, button[disabled] {background: var(--neutral-200) !important; color: var(--neutral-500) !important;
  border-color: var(--neutral-300) !important; opacity: 1 !important; cursor: not-allowed}
"""


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with system fonts, so the page never asks Google Fonts for anything."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


@dataclass
class UIContext:
    """What every tab needs: the workspace (all paths confined to it) and the job queue."""

    workspace: Workspace
    queue: JobQueue
    extra: dict = field(default_factory=dict)  # per-app caches (the loaded generation pipeline)


def build_app(workspace: str | os.PathLike | Workspace, queue: JobQueue | None = None, timer_s: float = 1.0) -> gr.Blocks:
    """The whole UI as a gr.Blocks. The job queue is started here (its thread runs queued jobs)."""
    from .tabs import dataset, generate, library, train

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    queue = queue or JobQueue(ws.root / "jobs")
    queue.start()
    ctx = UIContext(ws, queue)
    with gr.Blocks(title="sd-lora", analytics_enabled=False) as demo:
        gr.Markdown(f"## sd-lora &nbsp; <small>workspace: `{ws.root}`</small>")
        with gr.Tabs():
            # each tab reads its file lists again when it is opened (a job may have added a LoRA)
            with gr.Tab("Dataset", id="dataset") as dataset_tab:
                dataset.build(ctx, dataset_tab)
            with gr.Tab("Train", id="train") as train_tab:
                train.build(ctx, train_tab, timer_s=timer_s)
            with gr.Tab("Generate", id="generate") as generate_tab:
                generate.build(ctx, generate_tab)
            with gr.Tab("Library", id="library") as library_tab:
                library.build(ctx, library_tab)
    demo.sd_lora_context = ctx  # for tests and for launch() to stop the queue
    return demo


def launch(
    workspace: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    max_file_size: str | int = MAX_UPLOAD,
    block: bool = True,
    quiet: bool = False,
):
    """Build and serve the app. Returns the Blocks (with block=False the server runs in a thread)."""
    warning = exposure_warning(host, auth)
    if warning:
        print(warning, flush=True)
    demo = build_app(workspace)
    ws: Workspace = demo.sd_lora_context.workspace
    demo.queue(default_concurrency_limit=4)
    with _patient_start_check():
        demo.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            share=share,
            max_file_size=max_file_size,
            # Gradio may serve files only from the workspace (gallery images, samples, downloads);
            # everything else outside its own upload cache is refused.
            allowed_paths=[str(ws.root)],
            run_history=False,
            footer_links=["api"],
            theme=offline_theme(),
            css=CSS,
            prevent_thread_lock=True,  # blocked below, after our own start-up lines
            quiet=True,  # Gradio's start-up lines name its launch(share=True); ours below name the --share flag
            show_error=True,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
        )
    if not quiet:
        print(f"* Running on local URL:  {demo.local_url}", flush=True)
        if not share:
            print("* To create a public link, start with `sd-lora ui --share --auth USER:PASSWORD`.", flush=True)
    if block:
        demo.block_thread()
    return demo


@contextlib.contextmanager
def _patient_start_check():
    """Gradio 6's launch() checks that its own server answers, with one HEAD request under a 3 s timeout
    (gradio/networking.py `url_ok`: a timeout ends the check at once), and refuses to serve when it does
    not ("When localhost is not accessible, a shareable link must be created"). On a busy machine the
    first answer can take longer than that. Retry it for up to START_CHECK_S seconds instead."""
    from gradio import networking

    original = networking.url_ok

    def url_ok(url: str) -> bool:
        end = time.monotonic() + START_CHECK_S
        while not original(url):
            if time.monotonic() > end:
                return False
            time.sleep(0.5)
        return True

    networking.url_ok = url_ok
    try:
        yield
    finally:
        networking.url_ok = original


def stop(demo: gr.Blocks) -> None:
    """Close the server and the job queue (a running job is asked to stop with a checkpoint)."""
    ctx: UIContext | None = getattr(demo, "sd_lora_context", None)
    demo.close()
    if ctx is not None:
        ctx.queue.shutdown()
