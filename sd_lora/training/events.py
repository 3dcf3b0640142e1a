"""Training events as JSON lines: one stream that the progress bar, the web UI, TensorBoard and W&B read.

Every event is a dict with "event" (its kind), "time" and the fields that EVENTS below lists for
its kind: that table is the schema, and `EventLog.emit` refuses an event that does not match it.
The file `<output stem>.events.jsonl` next to the output (artifacts.events_file) gets one line per
event, flushed at once, so another process (the web UI) can follow a run by reading the file.
Torch-free: readers import this module without the trainer.

Trackers (TensorBoard, Weights & Biases) are sinks of the same stream: `scalars` is the one place that
says which numbers an event gives them, and under which names.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

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
    # (and the validation loss per validated step before it, [[step, loss], ...])
    "resumed": ("step", "checkpoint", "losses", "val_losses"),
    "cache": ("stage", "done", "total"),  # stage: "class_images" (data/class_images.py), "latents" or "text"
    # every log_every steps and the last. lr: the run's rate as applied (x Prodigy's d); lrs: each parameter
    # group's ({"unet": .., "text_encoder": .., "unet_plus": ..}); grad_norm: the adapters' gradient norm
    # before clipping (null for a skipped NaN step)
    "step": ("step", "total_steps", "epoch", "loss", "lr", "lrs", "grad_norm", "it_per_s", "eta_s"),
    # the validation loss (training/validation.py) after `step`: the mean over `images` held-out images x 4 timesteps
    "val": ("step", "loss", "images"),
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


def scalars(record: dict) -> dict[str, float]:
    """The numbers a tracker logs for one event, by the name it shows them under ({} for most kinds).

    step: loss, lr (the run's rate), lr/<group> per parameter group, grad_norm; val (the validation
    loss): loss/validation.
    """
    kind = record["event"]
    if kind == "step":
        out = {"loss": record["loss"], "lr": record["lr"]}
        out.update({f"lr/{group}": rate for group, rate in (record.get("lrs") or {}).items()})
        if record.get("grad_norm") is not None:
            out["grad_norm"] = record["grad_norm"]
        return out
    if kind == "val":
        return {"loss/validation": record["loss"]}
    return {}


class TensorBoardSink:
    """scalars() of every event to a TensorBoard log folder."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self._writer.close()


def wandb_logged_in() -> bool:
    """Whether the user gave W&B a key: WANDB_API_KEY, or `wandb login`, which writes it to ~/.netrc
    (wandb/sdk/lib/wbauth/wbnetrc.py) for the host (WANDB_BASE_URL, default api.wandb.ai). No network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """scalars() of every event, and the sample images of `sample` events, to a Weights & Biases run.

    Offline (written under `folder`, uploaded later with `wandb sync`) unless the user is logged in or
    sets WANDB_MODE. Plain wandb rather than accelerate's WandBTracker: that one is driven through
    Accelerator.log, which the event stream (written on the main process, read by the web UI) does not
    go through, and it would hide the offline choice.
    """

    def __init__(self, folder: Path, project: str, name: str, config: dict | None = None, run_id: str | None = None):
        """run_id: continue that run (a resumed training run), else a new one; self.run_id is the run's id.

        Online, wandb resumes the run in place. Offline, the resumed part is a second run folder with the
        same id and resume set, and `wandb sync` (0.31: "files that are part of the same run are synced
        sequentially in order of start time ... for resumed runs", wandb/cli/cli.py) uploads both into one run.
        """
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self._wandb = wandb
        self.dir = Path(os.environ.get("WANDB_DIR") or folder)
        self._run = wandb.init(project=project, name=name, dir=str(self.dir), mode=mode,
                               config=config, id=run_id, resume="allow" if run_id else None,
                               settings=wandb.Settings(silent=True, console="off"))
        self.mode = mode
        self.run_id = self._run.id

    def log(self, record: dict) -> None:
        values: dict = dict(scalars(record))
        if record["event"] == "sample" and record["paths"]:
            values["samples"] = [self._wandb.Image(p, caption=Path(p).stem) for p in record["paths"]]
        if values:
            self._run.log(values, step=record["step"])

    def close(self) -> None:
        self._run.finish()


class EventLog:
    def __init__(self, path: Path | None, on_event: Callable[[dict], None] | None = None, tensorboard_dir: Path | None = None,
                 sinks: list | None = None):
        """sinks: objects with log(record) and close() (TensorBoardSink, WandbSink) that get every event;
        tensorboard_dir adds a TensorBoardSink."""
        self.on_event = on_event
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if self._file.tell() and not _ends_with_newline(path):
                self._file.write("\n")  # a killed run left a torn last line: do not glue our first event to it
        self._sinks = list(sinks or [])
        if tensorboard_dir is not None:
            self._sinks.append(TensorBoardSink(tensorboard_dir))

    def emit(self, event: str, **fields) -> dict:
        record = make_event(event, **fields)
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        for sink in self._sinks:
            sink.log(record)
        if self.on_event is not None:
            self.on_event(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


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
