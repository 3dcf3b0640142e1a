"""What a user reads: sd-lora's own lines in the CLI output and a web UI job's log.txt, the libraries'
warnings, notices and progress bars only with -v (or in the job's debug.log)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("training images in 1 folder(s)", "steps: 2 images x repeats", "step 2/2: loss ", "saved ")
# what diffusers / transformers print on the tiny base without sd_lora.logs
THEIRS = ("should be kept in float32", "torchvision", "Loading pipeline components", "Loading weights")


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _cli(*argv) -> str:
    p = subprocess.run([sys.executable, "-m", "sd_lora.cli", *argv], capture_output=True, text=True, env=_env(),
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def _clean(text: str) -> None:
    assert not [t for t in THEIRS if t in text], text
    assert "\r" not in text and "\x1b" not in text, "progress-bar control codes in the log"


def test_cli_prints_our_lines_and_the_libraries_only_with_verbose(tiny_training_root, tmp_path):
    args = ["train", "--model", str(tiny_training_root / "model"), "--data", str(tiny_training_root / "data"),
            "--output", str(tmp_path / "lora.safetensors"), "--resolution", "64", "--rank", "2", "--preset", "attention"]
    out = _cli(*args, "--steps", "2")
    for line in OURS:
        assert line in out, (line, out)
    _clean(out)
    out = _cli(*args, "--steps", "3", "--resume")
    assert "resumed from" in out and "at step 2 of 3" in out and "step 3/3" in out
    _clean(out)
    out = _cli("-v", *args, "--steps", "4", "--resume")
    assert "Loading pipeline components" in out and "should be kept in float32" in out


def test_job_log_has_our_lines_and_the_debug_log_the_rest(tiny_training_root, tmp_path):
    from sd_lora.config import DataConfig, TrainConfig
    from webui.jobs import DONE, JobQueue

    q = JobQueue(tmp_path / "jobs", poll_s=0.1).start()
    try:
        cfg = TrainConfig(model=str(tiny_training_root / "model"), output=str(tmp_path / "out" / "lora.safetensors"),
                          data=DataConfig(path=str(tiny_training_root / "data"), resolution=64), steps=2,
                          network={"rank": 2, "preset": "attention"})
        job = q.submit(cfg)
        assert q.wait(job, timeout=600)["status"] == DONE
        d = tmp_path / "jobs" / job
        log = (d / "log.txt").read_text()
        for line in OURS:
            assert line in log, (line, log)
        _clean(log)
        assert "should be kept in float32" in (d / "debug.log").read_text()
        # the resumed job's curve starts at step 1: the trainer hands over the history it continues
        again = q.resume(job)
        assert q.wait(again, timeout=600)["status"] == DONE
    finally:
        q.shutdown()
    assert "resumed from" in (tmp_path / "jobs" / again / "log.txt").read_text()
    assert [s for s, _ in q.progress(again).losses] == [1, 2]  # steps = 2 again: nothing new, the old curve


def test_resumed_event_folds_the_earlier_losses_in():
    from webui.jobs import Progress, fold_event

    p = Progress()
    fold_event(p, {"event": "resumed", "step": 2, "checkpoint": "c", "losses": [[1, 0.5], [2, 0.4]]})
    fold_event(p, {"event": "step", "step": 3, "loss": 0.3, "total_steps": 3})
    assert p.losses == [(1, 0.5), (2, 0.4), (3, 0.3)] and p.step == 3


@pytest.mark.parametrize("verbose", [False, True])
def test_python_warnings_outside_sd_lora_are_shown_only_verbose(verbose, capsys):
    import logging
    import warnings

    from sd_lora.logs import setup_logging

    try:
        setup_logging(verbose)
        warnings.warn_explicit("a library's warning", UserWarning, "/x/site-packages/lib/mod.py", 1)
        logging.getLogger("sd_lora.training.loop").info("our line")
        logging.getLogger("bitsandbytes.backends").warning("Failed to load CPU gemm_4bit_forward")
    finally:
        logging.captureWarnings(False)
        for h in [h for h in logging.getLogger().handlers if getattr(h, "_sd_lora", False)]:
            logging.getLogger().removeHandler(h)
    err = capsys.readouterr().err
    assert "our line" in err
    assert ("a library's warning" in err) == verbose and ("gemm_4bit_forward" in err) == verbose


# ---- the Library tab's table (issue #20 item 7) ------------------------------------------------------


def test_library_lists_final_loras_first_and_steps_behind_the_toggle():
    from webui.tabs.library import order_loras

    names = ["style-step000020", "b", "style", "style-step000010", "a-step000100", "a"]
    assert order_loras(names, False) == ["a", "b", "style"]
    assert order_loras(names, True) == ["a", "b", "style", "a-step000100", "style-step000010", "style-step000020"]


def test_library_row_click_selects_that_lora(tmp_path):
    from types import SimpleNamespace

    from webui.app import build_app
    from webui.jobs import JobQueue
    from webui.tabs.library import selected_name

    assert selected_name(SimpleNamespace(row_value=["style", 9.4, "SD 1.x"], index=[0, 2])) == "style"
    assert selected_name(SimpleNamespace(row_value=["", "", ""], index=[0, 0])) is None  # the empty-library row
    demo = build_app(tmp_path, queue=JobQueue(tmp_path / "jobs"))
    ids = {b._id: getattr(b, "elem_id", None) for b in demo.blocks.values()}
    wired = [(ids[d["targets"][0][0]], [ids[o] for o in d["outputs"]]) for d in demo.config["dependencies"]
             if d["targets"] and d["targets"][0][1] == "select"]
    assert ("library-table", ["library-name"]) in wired


def test_the_job_view_names_each_cache_stage():
    from webui.jobs import Progress, fold_event

    stages = []
    for stage in ("latents", "text", "class_images"):
        p = Progress()
        fold_event(p, {"event": "cache", "stage": stage, "done": 3, "total": 10})
        stages.append(p.stage)
    assert stages == ["caching latents 3/10", "caching text embeddings 3/10", "rendering class images 3/10"]
