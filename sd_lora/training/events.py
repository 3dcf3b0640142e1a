"""Training events as JSON lines: one stream that the progress bar, the web UI and TensorBoard read.

Every event is a dict with "event" (its kind), "time" and the fields that EVENTS below lists for
its kind: that table is the schema, and `EventLog.emit` refuses an event that does not match it.
The file `<output stem>.events.jsonl` next to the output (artifacts.events_file) gets one line per
event, flushed at once, so another process (the web UI) can follow a run by reading the file.
Torch-free: readers import this module without the trainer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

# kind -> its fields, in the order the trainer sends them (all of them, always; a value may be null)
EVENTS: dict[str, tuple[str, ...]] = {
    # the dataset report (data.dataset.DatasetReport.to_dict): captions found, buckets, skipped images
    "dataset": ("images", "reg_images", "captions_by_extension", "fallback_captions", "empty_captions", "skipped", "folders",
                "subsets", "buckets", "warnings", "problems"),
    # the plan (loop.Plan) and its arithmetic: images x repeats x epochs / batch / accumulation / processes
    "start": ("images", "samples_per_epoch", "batches_per_epoch", "steps_per_epoch", "total_steps", "epochs",
              "arithmetic", "batch_size", "gradient_accumulation", "processes"),
    # a resumed run: the checkpoint it continues and the loss per step before it ([[step, loss], ...]),
    # so a reader of this run's events alone (a resumed web UI job) has the whole curve
    "resumed": ("step", "checkpoint", "losses"),
    "cache": ("stage", "done", "total"),  # stage: "class_images" (data/class_images.py), "latents" or "text"
    "step": ("step", "total_steps", "epoch", "loss", "lr", "it_per_s", "eta_s"),  # every log_every steps and the last
    # sample images being rendered (after each sampler step, at most about once a second):
    # prompt i of prompts (1-based), sampler step of sampler_steps, the time left for the whole set
    "sampling": ("step", "prompt", "prompts", "sampler_step", "sampler_steps", "eta_s"),
    "sample": ("step", "paths"),  # sample images rendered
    "saved": ("step", "path"),  # a LoRA file written: intermediate (save_every) or the final one
    "checkpoint": ("step", "path"),  # a resumable checkpoint folder written
    "warning": ("message",),
    "stopped": ("step", "checkpoint"),  # stop flag, stop file or Ctrl-C, after saving the checkpoint
    "done": ("step", "path", "loss_curve", "sample_grid"),
    "error": ("message",),
}


def rate_text(it_per_s: float | None) -> str:
    """A step event's `it_per_s` as the trainer's progress bar prints it: `step/s`, or `s/step` below
    one step a second (tqdm's unit="step"; the bar, the log lines and the events carry the same
    average since the run started). The log and the web UI both write it with this."""
    if not it_per_s:
        return "- step/s"
    return f"{it_per_s:.2f} step/s" if it_per_s >= 1 else f"{1 / it_per_s:.2f} s/step"


def make_event(kind: str, **fields) -> dict:
    """One event record, checked against EVENTS (a mismatch is a bug in the sender, so it raises)."""
    expected = EVENTS.get(kind)
    if expected is None:
        raise ValueError(f"unknown event kind {kind!r}; add it to EVENTS in sd_lora/training/events.py")
    if set(fields) != set(expected):
        raise ValueError(f"event {kind!r}: fields {sorted(fields)}, the schema in training/events.py says {sorted(expected)}")
    return {"event": kind, "time": round(time.time(), 3), **fields}


class EventLog:
    def __init__(self, path: Path | None, on_event: Callable[[dict], None] | None = None, tensorboard_dir: Path | None = None):
        self.on_event = on_event
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if self._file.tell() and not _ends_with_newline(path):
                self._file.write("\n")  # a killed run left a torn last line: do not glue our first event to it
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def emit(self, event: str, **fields) -> dict:
        record = make_event(event, **fields)
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        if self._tb is not None and event == "step":
            self._tb.add_scalar("loss", fields["loss"], fields["step"])
            self._tb.add_scalar("lr", fields["lr"], fields["step"])
        if self.on_event is not None:
            self.on_event(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_events(path: str | Path) -> list[dict]:
    """All events in a run's .events.jsonl (a partly written last line is ignored)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
