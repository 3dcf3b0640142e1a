"""Stop mid-run and resume: the result equals the uninterrupted run, tensor for tensor."""

from __future__ import annotations

import threading

import pytest
import torch

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import TrainingStopped, train
from sd_lora.training.checkpoint import list_checkpoints
from sd_lora.training.events import read_events


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sd_lora.testing import tiny_pipeline, write_noise_images

    root = tmp_path_factory.mktemp("resume")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "2_thing", 3, [f"red, circle, {p}, small" for p in ("left", "right", "top")])
    return root


def _config(root, out, **kw):
    # Everything random is on: flips, caption shuffle + dropout, adapter dropout, TE training,
    # an 8-bit optimizer, accumulation and a decaying LR schedule.
    data = DataConfig(path=str(root / "data"), resolution=64, flip=True, shuffle_captions=True, keep_tokens=1, caption_dropout=0.2)
    return TrainConfig(
        model=str(root / "model"), output=str(out), data=data, steps=8, batch_size=2, gradient_accumulation=2,
        lr=1e-3, optimizer="adamw8bit", lr_scheduler="cosine", seed=7,
        network={"rank": 4, "alpha": 2, "preset": "attention", "dropout": 0.1, "train_text_encoder": True}, **kw,
    )


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    full = tmp_path / "full" / "lora.safetensors"
    train(_config(setup, full))

    out = tmp_path / "parts" / "lora.safetensors"
    stop = threading.Event()

    def stop_at_3(event):
        if event["event"] == "step" and event["step"] == 3:
            stop.set()  # as the web UI's Stop button does, from another thread

    with pytest.raises(TrainingStopped) as err:
        train(_config(setup, out), on_event=stop_at_3, stop_event=stop)
    assert err.value.step == 3 and err.value.checkpoint.name == "step-00000003"
    assert not out.exists()

    # second stretch: stopped by the STOP file, resumed from the newest checkpoint ("--resume")
    cfg = _config(setup, out, resume="latest")

    def stop_file_at_6(event):
        if event["event"] == "step" and event["step"] == 6:
            cfg.stop_file.touch()

    with pytest.raises(TrainingStopped) as err:
        train(cfg, on_event=stop_file_at_6)
    assert err.value.step == 6 and not cfg.stop_file.exists()
    assert [p.name for p in list_checkpoints(cfg.checkpoint_root)] == ["step-00000003", "step-00000006"]

    # last stretch: resumed from an explicit checkpoint folder ("--resume PATH")
    train(_config(setup, out, resume=str(cfg.checkpoint_root / "step-00000006")))

    a, _ = load_safetensors(full)
    b, _ = load_safetensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same per-step losses as well, and a loss history that spans all three stretches
    def losses(path):
        return {e["step"]: e["loss"] for e in read_events(path) if e["event"] == "step"}

    assert losses(full.parent / "lora.events.jsonl") == losses(out.parent / "lora.events.jsonl")
    assert [e["event"] for e in read_events(out.parent / "lora.events.jsonl")].count("stopped") == 2


def test_resume_without_checkpoint_says_what_to_do(setup, tmp_path):
    # validate() names keys (the CLI adds the flag: "resume (--resume): ...")
    with pytest.raises(ValueError, match="no checkpoint in .* yet; start without resume"):
        train(_config(setup, tmp_path / "x.safetensors", resume="latest"))
