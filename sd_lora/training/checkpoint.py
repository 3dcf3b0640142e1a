"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `<checkpoint root>/step-00000100/` (names: sd_lora.artifacts) holding
  trainable.safetensors  every trainable parameter (fp32, by its module path), bit-exact
  optimizer.pt           optimizer + LR scheduler (+ fp16 grad scaler, + EMA weights) state, read back with
                         torch.load(weights_only=True): plain tensors and numbers, nothing executed.
                         Every optimizer of sd_lora/optimizers.py keeps all it needs there (8-bit
                         state, Prodigy's d, schedule-free's z and weight sum, Adafactor's factors):
                         tests/test_resume.py resumes each one exactly
  trainer.json           step, loss history, the config that made it, world size
It is written to a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none. The data order and every random draw are functions of (seed, step) (see
loop.py), so step + weights + optimizer state is all a resume needs to repeat the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import artifacts
from ..io import atomic_write, load_safetensors, save_safetensors_atomic

if TYPE_CHECKING:  # torch is imported by the functions that move tensors: listing checkpoints (config checks) needs none
    import torch

_FILES = ("trainable.safetensors", "optimizer.pt", "trainer.json")


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{pname}": p.detach().float().cpu().clone()
        for name, model in models.items() if model is not None
        for pname, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    import torch

    params = {
        f"{name}.{pname}": p
        for name, model in models.items() if model is not None
        for pname, p in model.named_parameters() if p.requires_grad
    }
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(
            f"the checkpoint does not fit this network ({len(missing)} parameters missing, {len(unknown)} unknown; "
            f"first: {(missing or unknown)[0]}). Resume with the same network settings (method, preset, rank, "
            "train_text_encoder) as the run that wrote it."
        )
    with torch.no_grad():
        for k, p in params.items():
            if tuple(p.shape) != tuple(state[k].shape):
                raise ValueError(f"{k}: shape {tuple(state[k].shape)} in the checkpoint, {tuple(p.shape)} here (different rank?)")
            p.copy_(state[k].to(p.device, p.dtype))


def save_checkpoint(root: Path, step: int, models: dict, optimizer, scheduler, scaler, trainer: dict, keep: int = 0,
                    ema=None) -> Path:
    """Write checkpoint `root/step-XXXXXXXX` atomically; prune to the `keep` newest (0: keep all).
    `ema`: the run's training.ema.AdapterEMA, if any (its state goes into optimizer.pt)."""
    import torch

    if any(g.get("train_mode") is False for g in optimizer.param_groups):
        # schedule-free in eval mode holds the averaged weights, not the ones training continues from
        raise RuntimeError("save_checkpoint: the schedule-free optimizer is in eval mode; save after optimizer.train()")
    root.mkdir(parents=True, exist_ok=True)
    final = root / artifacts.checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_safetensors_atomic(trainable_state(models), tmp / "trainable.safetensors")
        opt_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
        }
        with atomic_write(tmp / "optimizer.pt") as f:
            torch.save(opt_state, f)
        with atomic_write(tmp / "trainer.json", "w", encoding="utf-8") as f:
            json.dump({**trainer, "step": step}, f, indent=1)
        old = None
        if final.exists():  # re-saving the same step (e.g. stop right after a scheduled save)
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:  # deleted only now: a kill before this line leaves a complete step-N
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            # Renamed away first: a kill in the middle of rmtree must not leave a half-deleted
            # folder that still looks like a complete checkpoint.
            trash = root / f".{old.name}.del-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    _remove_stale_temporaries(root)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Delete the `.step-*.{tmp,old,del}-PID` folders of processes that no longer run (killed runs)."""
    for p in root.glob(f".{artifacts.CHECKPOINT_PREFIX}*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive, but another user's: not ours to delete
            pass


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and artifacts.checkpoint_step(p) is not None
             and all((p / n).is_file() for n in _FILES)]
    return sorted(found, key=artifacts.checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, models: dict, optimizer, scheduler, scaler, ema=None) -> dict:
    """Restore weights, optimizer, scheduler (and scaler, and `ema`) from `folder`; returns trainer.json's
    dict, with "ema_loaded": False when `ema` is given but the checkpoint has no EMA state (a run that had
    EMA off: the EMA then starts from the resumed weights)."""
    import torch

    for name in _FILES:
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a complete checkpoint ({name} is missing); pick another one from {folder.parent}")
    state, _ = load_safetensors(folder / "trainable.safetensors")
    load_trainable_state(models, state)
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    state = read_trainer_state(folder)
    if ema is not None:
        state["ema_loaded"] = opt.get("ema") is not None
        if state["ema_loaded"]:
            ema.load_state_dict(opt["ema"])
    return state
