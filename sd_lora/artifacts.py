"""The names of everything a training run writes next to its output LoRA file.

One place for them: the trainer writes these names, the web UI, the report, the config checks and
the tests ask here (never build or parse a name themselves). Torch-free, so config and the UI can
import it cheaply.

For `--output out/style.safetensors`:

    out/style.safetensors                  the LoRA (final)
    out/style-step000100.safetensors       intermediate LoRA files (save_every)
    out/style-ema.safetensors              EMA weights of a LoRA file (ema_decay; also style-step000100-ema...)
    out/style-checkpoints/step-00000100/   resumable checkpoints (+ STOP: create it to stop the run)
    out/style-samples/step-000100-0.png    sample images (step, prompt index)
    out/style-samples.png                  grid of all samples
    out/style-loss.png                     loss curve
    out/style.events.jsonl                 the run's events (JSON lines)
    out/style-tensorboard/                 TensorBoard logs
    out/style-wandb/                       Weights & Biases run files (offline runs: upload with wandb sync)
    out/style-wandb/run-id                 the W&B run's id, so a resumed run logs to the same run
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
_INTERMEDIATE_RE = re.compile(r"^(?P<stem>.+)-step(?P<step>\d{6,})$")
_SAMPLE_RE = re.compile(r"^step-(?P<step>\d{6,})-(?P<index>\d+)$")
# what follows the output's stem in the names of the files and folders beside it
_CHECKPOINTS, _SAMPLES, _GRID, _LOSS, _EVENTS, _TENSORBOARD, _EMA, _WANDB = (
    "-checkpoints", "-samples", "-samples.png", "-loss.png", ".events.jsonl", "-tensorboard", "-ema", "-wandb")


def _beside(output: str | Path, tail: str) -> Path:
    out = Path(output)
    return out.parent / f"{out.stem}{tail}"


def checkpoint_root(output: str | Path, checkpoint_dir: str | Path | None = None) -> Path:
    """The folder holding the resumable checkpoints of `output` (checkpoint_dir when given)."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    return _beside(output, _CHECKPOINTS)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a checkpoint folder (`step-00000100` -> 100), None for anything else."""
    m = _CHECKPOINT_RE.match(Path(folder).name)
    return int(m.group(1)) if m else None


def stop_file(checkpoint_root_dir: str | Path) -> Path:
    """Create this file to stop the run with a resumable checkpoint (checked every step)."""
    return Path(checkpoint_root_dir) / "STOP"


def intermediate_lora(output: str | Path, step: int) -> Path:
    return _beside(output, f"-step{step:06d}.safetensors")


def intermediate_step(path: str | Path) -> int | None:
    """The step of an intermediate LoRA file (`style-step000100.safetensors` -> 100), else None."""
    m = _INTERMEDIATE_RE.match(Path(path).stem)
    return int(m.group("step")) if m and Path(path).suffix == ".safetensors" else None


def ema_lora(lora: str | Path) -> Path:
    """The EMA file beside a saved LoRA file (final or intermediate): `style.safetensors` -> `style-ema.safetensors`."""
    return _beside(lora, f"{_EMA}.safetensors")


def samples_dir(output: str | Path) -> Path:
    return _beside(output, _SAMPLES)


def sample_image(output: str | Path, step: int, index: int) -> Path:
    return samples_dir(output) / f"step-{step:06d}-{index}.png"


def sample_step(path: str | Path) -> tuple[int, int] | None:
    """(step, prompt index) of a sample image, None for any other file."""
    m = _SAMPLE_RE.match(Path(path).stem)
    return (int(m.group("step")), int(m.group("index"))) if m and Path(path).suffix == ".png" else None


def sample_grid(output: str | Path) -> Path:
    return _beside(output, _GRID)


def loss_curve(output: str | Path) -> Path:
    return _beside(output, _LOSS)


def events_file(output: str | Path) -> Path:
    return _beside(output, _EVENTS)


def tensorboard_dir(output: str | Path) -> Path:
    return _beside(output, _TENSORBOARD)


def wandb_dir(output: str | Path) -> Path:
    """Where a run's Weights & Biases files go (wandb writes its own wandb/ folder inside)."""
    return _beside(output, _WANDB)


def wandb_run_id_file(output: str | Path) -> Path:
    """The W&B run id of the output's run (written when the run starts, read back on resume)."""
    return wandb_dir(output) / "run-id"


def is_run_output(path: str | Path) -> bool:
    """True for files and folders that a training run writes besides its final LoRA (intermediate
    LoRAs, EMA files, checkpoints, samples, grids, loss curves, events, TensorBoard and W&B logs)."""
    p = Path(path)
    name = p.name
    return (intermediate_step(p) is not None or sample_step(p) is not None or name.endswith(
        (_CHECKPOINTS, _SAMPLES, _GRID, _LOSS, _EVENTS, _TENSORBOARD, _WANDB, f"{_EMA}.safetensors")))
