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


def test_a_finished_run_extends_from_its_last_step(setup, tmp_path):
    """A finished 6-step run keeps a checkpoint of step 6; `--resume --steps 8` continues from it (not
    from an earlier save) and ends equal to an uninterrupted 8-step run. (A constant LR: a decaying
    schedule over 6 steps is another run than one over 8; test_extended_schedule covers the rest.)"""

    def config(out, steps=8, **kw):
        cfg = _config(setup, out, **kw)
        cfg.steps, cfg.lr_scheduler = steps, "constant"
        return cfg

    full = tmp_path / "full" / "lora.safetensors"
    train(config(full))

    out = tmp_path / "ext" / "lora.safetensors"
    short = config(out, 6, save_every=4)
    train(short)
    assert [p.name for p in list_checkpoints(short.checkpoint_root)] == ["step-00000004", "step-00000006"]

    train(config(out, resume="latest"))
    events = read_events(out.parent / "lora.events.jsonl")
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["step"] == 6 and [s for s, _ in resumed["losses"]] == [1, 2, 3, 4, 5, 6]
    a, _ = load_safetensors(full)
    b, _ = load_safetensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    second = events[events.index(resumed):]
    assert [e["step"] for e in second if e["event"] == "step"] == [7, 8]

    # fewer steps than the checkpoint holds: said, with what to set
    with pytest.raises(ValueError, match="at step 8, past this run's 6 steps; set steps to more than 8"):
        train(config(out, 6, resume="latest"))


def test_extended_schedule_sets_the_rate_of_the_longer_run():
    """Loading a 6-step cosine schedule's state into an 8-step one: the optimizer's rate is the 8-step
    schedule's at step 6 (torch saves no schedule function, so it held the 6-step rate, 0)."""
    from sd_lora.training.loop import follow_schedule
    from sd_lora.training.optim import make_scheduler

    def schedule(total):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, make_scheduler("cosine", opt, 0, total)

    opt6, s6 = schedule(6)
    opt8, s8 = schedule(8)
    for _ in range(6):
        opt6.step(), s6.step(), opt8.step(), s8.step()
    opt, s = schedule(8)
    opt.load_state_dict(opt6.state_dict())
    s.load_state_dict(s6.state_dict())
    assert opt.param_groups[0]["lr"] == 0.0  # the shorter run's rate at its end
    follow_schedule(s)
    assert opt.param_groups[0]["lr"] == opt8.param_groups[0]["lr"] > 0
    assert s.get_last_lr() == s8.get_last_lr()
