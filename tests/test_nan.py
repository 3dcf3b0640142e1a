"""NaN/inf loss: detected at the step it appears, the update skipped, and after 5 in a row the run
stops naming the step, the likely causes and the last good checkpoint (which a resume can use)."""

from __future__ import annotations

import importlib

import pytest
import torch

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import train
from sd_lora.training.events import read_events

loop = importlib.import_module("sd_lora.training.loop")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_training_root, out, **kw):
    return TrainConfig(model=str(tiny_training_root / "model"), output=str(out), data=DataConfig(path=str(tiny_training_root / "data"), resolution=64),
                       seed=3, network={"rank": 2, "preset": "attention", "train_text_encoder": False}, **kw)


def _nan_at(monkeypatch, bad_steps):
    real = loop._Trainer._loss

    def loss(self, idxs, step, micro):
        value = real(self, idxs, step, micro)
        return value * float("nan") if step + 1 in bad_steps else value  # step numbers as the user sees them

    monkeypatch.setattr(loop._Trainer, "_loss", loss)


def test_a_nan_step_is_skipped_and_named(tiny_training_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3})
    out = train(_cfg(tiny_training_root, tmp_path / "lora.safetensors", steps=5))
    warnings = [e["message"] for e in read_events(tmp_path / "lora.events.jsonl") if e["event"] == "warning"]
    assert warnings == ["step 3: loss is nan; update skipped"]
    tensors, _ = load_safetensors(out)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_persistent_nan_stops_with_step_cause_and_last_good_checkpoint(tiny_training_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(5, 100)))
    cfg = _cfg(tiny_training_root, tmp_path / "lora.safetensors", steps=10, save_every=2)
    with pytest.raises(ValueError) as err:
        train(cfg)
    msg = str(err.value)
    last = cfg.checkpoint_root / "step-00000004"
    assert "step 9:" in msg and "since step 5" in msg and "lr" in msg and str(last) in msg
    events = read_events(tmp_path / "lora.events.jsonl")
    assert [e["message"].split(":")[0] for e in events if e["event"] == "warning"] == [f"step {s}" for s in range(5, 10)]
    assert events[-1]["event"] == "error"
    state, _ = load_safetensors(last / "trainable.safetensors")  # the named checkpoint is good
    assert all(torch.isfinite(t).all() for t in state.values())
    monkeypatch.undo()  # the cause is fixed: resuming from the named checkpoint finishes the run
    cfg.resume = str(last)
    tensors, _ = load_safetensors(train(cfg))
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
