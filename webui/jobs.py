"""A small training-job queue whose state lives on disk, so any page load can show it.

Why this shape: a browser tab is not a place to keep state. A refresh, a second browser or a
closed laptop lid must all show the running job exactly as it is. So each job is a folder

    <workspace>/jobs/<id>/
        config.toml     the full TrainConfig (absolute paths), written once at submit
        state.json      {"status", "created", "started", "finished", "pid", "returncode", ...}
        events.jsonl    the trainer's events, one JSON object a line (schema: sd_lora.training.events)
        log.txt         the training process's stdout + stderr: sd-lora's own lines
        debug.log       every log record of the training process, the libraries' too

and the page is rebuilt from these files on every poll. Jobs run one after another, each in its
own process (`python -m webui.jobs run <job dir>`), so a crash, an out-of-memory kill or a stuck
CUDA context takes down only that job, never the UI. The server process is the only writer of
state.json; the training process only appends events.

Stop uses the trainer's own mechanism: it creates `TrainConfig.stop_file`, which the training
loop checks every step; the loop then saves a resumable checkpoint and emits a "stopped" event.
Resume submits a new job with the same config and `resume = "latest"`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sd_lora import artifacts
from sd_lora.config import ConfigError, TrainConfig, dump_config, load_config
from sd_lora.io import atomic_write
from sd_lora.training.events import make_event

QUEUED, RUNNING, STOPPING, DONE, STOPPED, FAILED, CANCELLED = (
    "queued", "running", "stopping", "done", "stopped", "failed", "cancelled",
)
ACTIVE = (QUEUED, RUNNING, STOPPING)
FINISHED = (DONE, STOPPED, FAILED, CANCELLED)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_QUEUED = 8  # jobs waiting + running; a queue longer than this is more likely a double click


class JobError(ValueError):
    """A job request the queue refuses (unknown id, queue full, wrong state), with what to do."""


# ---- reading a job's events ------------------------------------------------------------------------


@dataclass
class Progress:
    """What the page shows for a job, folded from its events.jsonl (fields: sd_lora.training.events.EVENTS)."""

    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    stage: str = ""  # "caching latents 3/10", "training", ...
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # "val" events: (step, validation loss)
    samples: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    error: str | None = None
    last_event: str | None = None


class EventTail:
    """Reads an events.jsonl incrementally: each poll parses only the lines appended since the last."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.progress = Progress()

    def update(self) -> Progress:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.progress
        end = chunk.rfind(b"\n")
        if end < 0:  # nothing complete yet (a line being written is read on the next poll)
            return self.progress
        self.offset += end + 1
        for line in chunk[: end + 1].splitlines():
            try:
                fold_event(self.progress, json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
        return self.progress


# how the job view names a "cache" event's stage (training/events.py)
CACHE_STAGES = {"latents": "caching latents", "text": "caching text embeddings", "class_images": "rendering class images"}


def fold_event(p: Progress, e: dict) -> None:
    kind = e.get("event")
    p.last_event = kind
    if kind == "start":
        p.total_steps = e.get("total_steps", p.total_steps)
        p.stage = "starting"
    elif kind == "resumed":
        _fold_resumed(p, e)
    elif kind == "sampling":
        p.stage = sampling_stage(e)
    elif kind == "cache":
        what = CACHE_STAGES.get(e.get("stage"), f"caching {e.get('stage', '')}")
        p.stage = f"{what} {e.get('done', '?')}/{e.get('total', '?')}"
    elif kind == "step":
        p.step = int(e.get("step", p.step))
        p.epoch = e.get("epoch", p.epoch)
        p.loss = e.get("loss", p.loss)
        p.it_per_s = e.get("it_per_s", p.it_per_s)
        p.eta_s = e.get("eta_s", p.eta_s)
        p.total_steps = e.get("total_steps", p.total_steps)
        if p.loss is not None:
            p.losses.append((p.step, float(p.loss)))
        p.stage = "training"
    elif kind == "val":
        p.val_losses.append((int(e.get("step") or 0), float(e.get("loss"))))
    elif kind == "sample":
        p.samples += [str(x) for x in e.get("paths", [])]
    elif kind == "checkpoint":
        p.checkpoints.append(str(e.get("path", "")))
    elif kind == "warning":
        p.warnings.append(str(e.get("message", "")))
    elif kind == "stopped":
        p.step = int(e.get("step", p.step) or p.step)
        p.stage = "stopped"
    elif kind == "done":
        p.step = int(e.get("step", p.step) or p.step)
        p.output = e.get("path")
        p.stage = "done"
        p.eta_s = 0
    elif kind == "error":
        p.error = str(e.get("message", ""))
        p.stage = "error"


def _fold_resumed(p: Progress, e: dict) -> None:
    """A resumed run carries the loss history of the run it continues: the curve starts at step 1."""
    before = [(int(s), float(v)) for s, v in e.get("losses") or [] if int(s) <= int(e.get("step") or 0)]
    p.losses = before + [x for x in p.losses if x[0] > (before[-1][0] if before else 0)]
    val = [(int(s), float(v)) for s, v in e.get("val_losses") or [] if int(s) <= int(e.get("step") or 0)]
    p.val_losses = val + [x for x in p.val_losses if x[0] > int(e.get("step") or 0)]
    p.step = int(e.get("step") or p.step)
    p.stage = f"resumed at step {p.step}"


def sampling_stage(e: dict) -> str:
    """'sampling (step 100): prompt 1/4, 12/20, ETA 35 s', from a "sampling" event."""
    eta = e.get("eta_s")
    return (f"sampling (step {e.get('step')}): prompt {e.get('prompt')}/{e.get('prompts')}, "
            f"{e.get('sampler_step')}/{e.get('sampler_steps')}" + (f", ETA {eta:.0f} s" if eta is not None else ""))


# ---- the queue ------------------------------------------------------------------------------------


def _now() -> float:
    return round(time.time(), 3)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) counts as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class JobQueue:
    """Jobs in `<jobs_dir>/<id>/`, run one at a time by a background thread of the UI server."""

    def __init__(self, jobs_dir: str | os.PathLike, python: str = sys.executable, poll_s: float = 0.5):
        self.dir = Path(jobs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._tails: dict[str, EventTail] = {}
        self._proc: subprocess.Popen | None = None
        self._proc_job: str | None = None
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._reconcile()

    # ---- state files --------------------------------------------------------------------------
    def _job_dir(self, job_id: str) -> Path:
        # ids are ours (time + hex); refuse anything else so an id from a request cannot be a path
        if not job_id or any(c not in "0123456789abcdef-" for c in job_id):
            raise JobError(f"unknown job {job_id!r}; pick one from the jobs list")
        d = self.dir / job_id
        if not (d / "state.json").is_file():
            raise JobError(f"unknown job {job_id!r}; pick one from the jobs list")
        return d

    def state(self, job_id: str) -> dict:
        return json.loads((self._job_dir(job_id) / "state.json").read_text(encoding="utf-8"))

    def _write_state(self, job_id: str, **changes) -> dict:
        with self._lock:
            path = self.dir / job_id / "state.json"
            st = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            st.update(changes)
            with atomic_write(path, "w", encoding="utf-8") as f:
                json.dump(st, f, indent=1)
            return st

    def config(self, job_id: str) -> TrainConfig:
        return load_config(self._job_dir(job_id) / "config.toml")

    def job_ids(self) -> list[str]:
        """All jobs, oldest first (ids sort by creation time)."""
        return sorted(p.name for p in self.dir.iterdir() if (p / "state.json").is_file())

    def jobs(self) -> list[dict]:
        out = []
        for jid in self.job_ids():
            with contextlib.suppress(OSError, ValueError):
                out.append(self.state(jid))
        return out

    def active_job(self) -> dict | None:
        """The running (or stopping) job, else the next queued one, else None."""
        jobs = self.jobs()
        for status in (RUNNING, STOPPING, QUEUED):
            for st in jobs:
                if st["status"] == status:
                    return st
        return None

    def progress(self, job_id: str) -> Progress:
        d = self._job_dir(job_id)
        with self._lock:
            tail = self._tails.get(job_id)
            if tail is None:
                tail = self._tails[job_id] = EventTail(d / "events.jsonl")
            return tail.update()

    def log_tail(self, job_id: str, max_bytes: int = 16_000) -> str:
        """The end of the job's log as a terminal would show it: progress bars redrawn with \\r keep
        only their last state, and colour/cursor escape codes are removed."""
        path = self._job_dir(job_id) / "log.txt"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        text = _ANSI.sub("", text)
        lines = [line.rstrip("\r").split("\r")[-1].rstrip() for line in text.split("\n")]
        return "\n".join(line for line in lines if line)

    # ---- commands -----------------------------------------------------------------------------
    def submit(self, cfg: TrainConfig, name: str = "", resume_of: str | None = None) -> str:
        """Validate `cfg` and queue it; returns the job id. Raises ConfigError listing every problem."""
        errors = cfg.validate()
        if errors:
            raise ConfigError(errors)
        with self._lock:
            waiting = [j for j in self.jobs() if j["status"] in ACTIVE]
            if len(waiting) >= MAX_QUEUED:
                raise JobError(f"{len(waiting)} jobs are already queued or running; wait for one to finish or cancel one")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            d = self.dir / job_id
            d.mkdir(parents=True)
            with atomic_write(d / "config.toml", "w", encoding="utf-8") as f:
                f.write(dump_config(cfg))
            self._write_state(
                job_id, id=job_id, name=name or Path(cfg.output).stem, status=QUEUED, created=_now(),
                started=None, finished=None, pid=None, returncode=None, resume_of=resume_of,
                output=cfg.output, stop_file=str(cfg.stop_file), message="",
            )
        self._wake.set()
        return job_id

    def stop(self, job_id: str, force: bool = False) -> dict:
        """Ask a job to stop: queued -> cancelled; running -> stop file (checkpoint, then exit).

        `force` (or a second Stop on a job already stopping) interrupts the process with SIGINT,
        which the trainer also treats as stop-with-checkpoint; use it when a job is stuck before its
        first step (the stop file is checked once per step).
        """
        with self._lock:
            st = self.state(job_id)
            if st["status"] == QUEUED:
                return self._write_state(job_id, status=CANCELLED, finished=_now(), message="cancelled before it started")
            if st["status"] not in (RUNNING, STOPPING):
                raise JobError(f"job {job_id} is {st['status']}; only queued or running jobs can be stopped")
            stop_file = Path(st["stop_file"])
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            if (force or st["status"] == STOPPING) and _pid_alive(st.get("pid")):
                with contextlib.suppress(OSError):
                    os.kill(st["pid"], signal.SIGINT)
            return self._write_state(job_id, status=STOPPING, message="stopping: saving a resumable checkpoint")

    def resume(self, job_id: str) -> str:
        """Queue a new job that continues `job_id` from its newest checkpoint."""
        st = self.state(job_id)
        if st["status"] in ACTIVE:
            raise JobError(f"job {job_id} is still {st['status']}; stop it first, then resume")
        cfg = self.config(job_id)
        root = cfg.checkpoint_root
        if not root.is_dir() or not any(artifacts.checkpoint_step(p) is not None for p in root.iterdir()):
            raise JobError(f"job {job_id} left no checkpoint in {cfg.checkpoint_root}; start it again instead")
        cfg.resume = "latest"
        return self.submit(cfg, name=st.get("name", ""), resume_of=job_id)

    # ---- running ------------------------------------------------------------------------------
    def start(self) -> JobQueue:
        """Start the background thread that runs queued jobs one after another."""
        if self._thread is None or not self._thread.is_alive():
            self._halt.clear()
            self._thread = threading.Thread(target=self._loop, name="sd-lora-jobs", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, stop_running: bool = True, timeout: float = 30.0) -> None:
        """Stop the runner thread; a running job is asked to stop (checkpoint) and waited for."""
        self._halt.set()
        self._wake.set()
        proc, job_id = self._proc, self._proc_job
        if proc is not None and proc.poll() is None and stop_running and job_id:
            with contextlib.suppress(JobError):
                self.stop(job_id)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait(self, job_id: str, timeout: float = 120.0) -> dict:
        """Block until `job_id` is finished (for scripts and tests); returns its state."""
        end = time.time() + timeout
        while time.time() < end:
            st = self.state(job_id)
            if st["status"] in FINISHED:
                return st
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {self.state(job_id)['status']} after {timeout} s")

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self._tick()
            except Exception as e:  # never let one bad job folder kill the runner
                print(f"sd-lora jobs: {e!r}", file=sys.stderr)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                return
            self._finish(self._proc_job, self._proc.returncode)
            self._proc = self._proc_job = None
        adopted = [j for j in self.jobs() if j["status"] in (RUNNING, STOPPING)]
        if adopted:  # a job started by an earlier server process that still runs
            j = adopted[0]
            if not _pid_alive(j.get("pid")):
                self._finish(j["id"], None)
            return
        queued = [j for j in self.jobs() if j["status"] == QUEUED]
        if queued and not self._halt.is_set():
            self._launch(queued[0]["id"])

    def _launch(self, job_id: str) -> None:
        d = self.dir / job_id
        stop_file = Path(self.state(job_id)["stop_file"])
        with contextlib.suppress(FileNotFoundError):
            stop_file.unlink()  # a stale stop file from an earlier run would stop this one at once
        log = open(d / "log.txt", "ab")  # noqa: SIM115 - owned by the child from here on
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # the child must import webui/ and sd_lora/ the same way this process does
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [self.python, "-m", "webui.jobs", "run", str(d)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=root,
        )
        log.close()
        self._proc_job = job_id
        self._write_state(job_id, status=RUNNING, started=_now(), pid=self._proc.pid, message="running")

    def _finish(self, job_id: str, returncode: int | None) -> None:
        """Decide how a job ended from its events (the process's exit code alone cannot tell stop from done)."""
        p = EventTail(self.dir / job_id / "events.jsonl").update()
        if p.last_event == "done":
            status, msg = DONE, f"done: {p.output}"
        elif p.last_event == "stopped":
            status, msg = STOPPED, f"stopped at step {p.step}; Resume continues from the checkpoint"
        elif p.error:
            status, msg = FAILED, p.error
        elif returncode is None:
            status, msg = FAILED, "the UI server restarted while this job ran and the training process is gone"
        else:
            status, msg = FAILED, f"the training process exited with code {returncode}; see the log"
        self._write_state(job_id, status=status, finished=_now(), returncode=returncode, message=msg)

    def _reconcile(self) -> None:
        """At start-up: jobs recorded as running whose process is gone get their final status."""
        for j in self.jobs():
            if j["status"] in (RUNNING, STOPPING) and not _pid_alive(j.get("pid")):
                self._finish(j["id"], None)


# ---- the training process -------------------------------------------------------------------------


def _job_logging(d: Path) -> None:
    from sd_lora.logs import quiet_libraries, setup_logging

    setup_logging(verbose=False, debug_log=d / "debug.log", stream=sys.stdout)
    quiet_libraries(verbose=False)


def run_job(job_dir: str | os.PathLike) -> int:
    """Body of the training process: read config.toml, train, append every event to events.jsonl.

    Its stdout/stderr are the job's log.txt: sd-lora's own lines go there (dataset report, step
    arithmetic, "resumed from", steps, "saved"), the libraries' records only to debug.log beside it.
    """
    d = Path(job_dir)
    _job_logging(d)
    from sd_lora.training import train

    events = open(d / "events.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    seen = set()

    def on_event(e: dict) -> None:
        seen.add(e.get("event"))
        events.write(json.dumps(e, default=str) + "\n")
        events.flush()

    try:
        cfg = load_config(d / "config.toml")
        train(cfg, on_event=on_event)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if "stopped" in seen:  # the trainer stopped on request (TrainingStopped) after its checkpoint
            return 0
        if "error" not in seen:  # the trainer reports what it catches; add what it could not
            on_event(make_event("error", message=f"{type(e).__name__}: {e}"))
        import traceback

        traceback.print_exc()
        return 1
    finally:
        events.close()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "run":
        sys.exit("usage: python -m webui.jobs run <job dir>")
    sys.exit(run_job(sys.argv[2]))
