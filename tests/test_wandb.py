"""Weights & Biases and TensorBoard logging (#18 item 7): one mapping of event fields to scalars for
both trackers, a real 2-step run (loss, validation loss, per-group rates, gradient norm, a sample
image) read back from its offline W&B run file and its TensorBoard log, the offline choice, and a
clear error when wandb is asked for but missing. No network: WANDB_MODE is offline and the netrc /
API key the login check reads are the test's own."""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.training.events import make_event, read_events, scalars, wandb_logged_in

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scalars_name_what_each_event_gives_the_trackers():
    step = make_event("step", step=3, total_steps=9, epoch=1, loss=0.25, lr=2e-4, lrs={"unet": 2e-4, "unet_plus": 3.2e-3},
                      grad_norm=0.5, it_per_s=1.0, eta_s=6.0)
    assert scalars(step) == {"loss": 0.25, "lr": 2e-4, "lr/unet": 2e-4, "lr/unet_plus": 3.2e-3, "grad_norm": 0.5}
    skipped = {**step, "grad_norm": None}  # a NaN step: no norm to log
    assert "grad_norm" not in scalars(skipped)
    # the validation loss (the "val" event: step, loss, images) under its own name
    assert scalars({"event": "val", "step": 4, "loss": 0.125, "images": 2}) == {"loss/validation": 0.125}
    assert scalars(make_event("saved", step=3, path="x")) == {}


def test_offline_unless_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not wandb_logged_in()
    netrc_file.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")  # what `wandb login` writes
    assert wandb_logged_in()
    netrc_file.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_logged_in()


def test_wandb_asked_for_but_not_installed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = TrainConfig(model="m", output="o.safetensors", data=DataConfig(path="d"), steps=2, log_with="all")
    errors = [e for e in cfg.validate(check_paths=False) if e.startswith("log_with")]
    assert errors and "pip install" in errors[0] and "wandb" in errors[0]
    assert not [e for e in TrainConfig(model="m", output="o.safetensors", data=DataConfig(path="d"), steps=2,
                                       log_with="tensorboard").validate(check_paths=False) if e.startswith("log_with")]
    assert cfg.trackers == {"tensorboard", "wandb"}
    assert TrainConfig(tensorboard=True).trackers == {"tensorboard"} and TrainConfig().trackers == set()


# ---- reading a .wandb file: LevelDB log blocks of protobuf Records ------------------------------------------
# The format as wandb writes it: a 7-byte header ":W&B" + magic 0xBEE1 + version, then 32 KiB blocks of
# records, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last piece), and a
# record that does not fit in what is left of a block starts the next one (wandb's former
# sdk/internal/datastore.py; the Go core keeps it). Each payload is a wandb_internal_pb2.Record.

def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, piece = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in this block for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            yield record
            piece = b""


def _run_record(run_file: Path):
    return next(r.run for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "run")


def _wandb_history(run_file: Path) -> dict[int, dict]:
    """step -> {key: value} of the run's logged history rows."""
    rows = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            # a nested value (an image list's fields) comes as one item per leaf: "samples/count"
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = row
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="needs the wandb and tensorboard extras")
def test_a_run_logs_losses_rates_grad_norm_and_samples_to_wandb_and_tensorboard(tiny_training_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sd_lora import artifacts
    from sd_lora.training import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # never any network, logged in or not
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o.safetensors"
    # one of the two images held out for a validation loss after each step
    cfg = TrainConfig(model=str(tiny_training_root / "model"), output=str(out), data=DataConfig(path=str(tiny_training_root / "data"),
                      resolution=64, validation_split=0.5), steps=2, seed=3, network={"rank": 2, "alpha": 1, "preset": "attention"},
                      text_encoder_lr=1e-5, loraplus_lr_ratio=4, lr=1e-3, log_with="all", wandb_run_name="tiny",
                      sample_every=2, sample_prompts=["red circle"], sample_steps=2, validate_every_n_steps=1)
    train(cfg)

    steps = {e["step"]: e for e in read_events(cfg.events_path) if e["event"] == "step"}
    val = {e["step"]: e["loss"] for e in read_events(cfg.events_path) if e["event"] == "val"}
    assert sorted(steps) == sorted(val) == [1, 2]
    for e in steps.values():
        # each parameter group's rate: the UNet's and text encoder's, and LoRA+'s up matrices at 4x each
        assert e["lrs"] == pytest.approx({"unet": 1e-3, "unet_plus": 4e-3, "text_encoder": 1e-5, "text_encoder_plus": 4e-5})
        assert e["grad_norm"] > 0
    runs = list((artifacts.wandb_dir(out) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    assert sorted(history) == [1, 2]
    for step, e in steps.items():
        row = history[step]
        assert row["loss"] == pytest.approx(e["loss"], rel=1e-6) and row["lr"] == pytest.approx(e["lr"])
        assert {k: row[f"lr/{k}"] for k in e["lrs"]} == pytest.approx(e["lrs"])
        assert row["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-6)
        assert row["loss/validation"] == pytest.approx(val[step], rel=1e-6)
    # the one sample image at step 2 (an image list's fields as nested keys), its PNG among the run's files
    assert "samples/count" not in history[1] and history[2]["samples/count"] == 1
    assert history[2]["samples/captions"] == ["step-000002-0"]
    assert (runs[0].parent / "files" / history[2]["samples/filenames"][0]).is_file()

    logs = list(artifacts.tensorboard_dir(out).glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0]))
    acc.Reload()
    assert {"loss", "lr", "lr/unet", "lr/text_encoder_plus", "grad_norm", "loss/validation"} <= set(acc.Tags()["scalars"])
    assert {s.step: s.value for s in acc.Scalars("loss/validation")} == pytest.approx(val)
    assert {s.step: s.value for s in acc.Scalars("grad_norm")} == pytest.approx({s: e["grad_norm"] for s, e in steps.items()})

    # resumed to 4 steps, the same W&B run goes on (offline: a second run folder with the same id and resume
    # set, which `wandb sync` uploads into the one run); the resumed part logs steps 3 and 4
    run_id = artifacts.wandb_run_id_file(out).read_text().strip()
    assert run_id and _run_record(runs[0]).run_id == run_id
    train(replace(cfg, steps=4, resume="latest"))
    runs = sorted((artifacts.wandb_dir(out) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    resumed = _run_record(runs[1])
    assert resumed.run_id == run_id and resumed.resume
    assert sorted(_wandb_history(runs[1])) == [3, 4]
    assert artifacts.wandb_run_id_file(out).read_text().strip() == run_id
