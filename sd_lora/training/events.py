"""Training events as JSON lines: one stream that the progress bar, the web UI and TensorBoard read.

Every event is a dict with "event" (its kind) and "time"; the file `<output stem>.events.jsonl`
next to the output gets one line per event, flushed at once, so another process (the web UI) can
follow a run by reading the file. Kinds:

  start       plan: images, repeats, epochs, batch, accumulation, steps, arithmetic
  dataset     the dataset report (captions found, buckets, skipped images)
  cache       {"stage": "latents"|"text", "done", "total"}
  step        {"step", "epoch", "loss", "lr", "it_per_s", "eta_s"}
  sample      {"step", "paths"}
  checkpoint  {"step", "path", "lora"}
  warning     {"message"}
  stopped     {"step", "checkpoint"}     (stop flag, stop file or Ctrl-C)
  done        {"step", "path", "loss_curve", "sample_grid"}
  error       {"message"}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


class EventLog:
    def __init__(self, path: Path | None, on_event: Callable[[dict], None] | None = None, tensorboard_dir: Path | None = None):
        self.path = path
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
        record = {"event": event, "time": round(time.time(), 3), **fields}
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
