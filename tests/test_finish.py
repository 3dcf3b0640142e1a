"""The end of a run: files before final samples, Ctrl-C while sampling, sampling progress, CPU warnings."""

from __future__ import annotations

import threading

import pytest

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.training import TrainingStopped, train
from sd_lora.training.checkpoint import list_checkpoints
from sd_lora.training.events import read_events

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(root, out, **kw):
    kw = {"sample_prompts": ["a thing"], **kw}
    return TrainConfig(model=str(root / "model"), output=str(out), data=DataConfig(path=str(root / "data"), resolution=64),
                       seed=3, network={"rank": 2, "preset": "attention", "train_text_encoder": False}, sample_steps=3, **kw)


def test_ctrl_c_in_final_sampling_keeps_the_lora_and_the_last_checkpoint(tiny_training_root, tmp_path, monkeypatch):
    from sd_lora.training import sampling

    def interrupted(*args, on_progress=None, **kw):
        on_progress(0, 1, 1, 3)
        raise KeyboardInterrupt  # Ctrl-C (or a second one) while the final samples render

    monkeypatch.setattr(sampling, "render_samples", interrupted)
    out = tmp_path / "lora.safetensors"
    cfg = _cfg(tiny_training_root, out, steps=3)
    assert train(cfg) == out and out.is_file()
    assert [p.name for p in list_checkpoints(cfg.checkpoint_root)] == ["step-00000003"]
    events = read_events(tmp_path / "lora.events.jsonl")
    kinds = [e["event"] for e in events]
    # the files are written before the samples start
    assert kinds.index("saved") < kinds.index("checkpoint") < kinds.index("sampling")
    assert kinds[-1] == "done" and "sample" not in kinds
    assert any("final samples interrupted" in e["message"] for e in events if e["event"] == "warning")


def test_sampling_reports_progress_and_a_stop_ends_it(tiny_training_root, tmp_path):
    from webui.jobs import Progress, fold_event

    stop = threading.Event()
    seen = []

    def on_event(e):
        seen.append(e)
        if e["event"] == "sampling" and e["step"] == 2:
            stop.set()  # the Stop button while the step-2 samples render

    cfg = _cfg(tiny_training_root, tmp_path / "lora.safetensors", steps=4, sample_every=2,
               sample_prompts=["a thing", "a thing --s 2"])
    with pytest.raises(TrainingStopped) as err:
        train(cfg, on_event=on_event, stop_event=stop)
    assert err.value.step == 2 and err.value.checkpoint.is_dir()
    sampling = [e for e in seen if e["event"] == "sampling"]
    assert [(e["prompt"], e["prompts"], e["sampler_step"], e["sampler_steps"]) for e in sampling] == [(1, 2, 1, 3)]
    assert "sample" not in [e["event"] for e in seen]  # interrupted before its first image was done
    p = Progress()
    fold_event(p, sampling[0])
    assert p.stage.startswith("sampling (step 2): prompt 1/2, 1/3, ETA ")

    # unstopped: every prompt reports its first and last sampler step, the images are made
    seen.clear()
    cfg = _cfg(tiny_training_root, tmp_path / "b.safetensors", steps=2, sample_prompts=["a thing", "a thing --s 2"])
    train(cfg, on_event=seen.append)
    at = [(e["prompt"], e["sampler_step"]) for e in seen if e["event"] == "sampling"]
    assert {(1, 1), (1, 3), (2, 1), (2, 2)} <= set(at) and at == sorted(at)
    assert [len(e["paths"]) for e in seen if e["event"] == "sample"] == [2]


def test_cpu_warnings_name_big_samples_and_bf16_on_small_models(tmp_path):
    from sd_lora.training.loop import cpu_warnings

    cfg = TrainConfig(model="m", output=str(tmp_path / "o.safetensors"), data=DataConfig(path=".", resolution=64),
                      sample_prompts=["a --w 512 --h 512", "b"])
    (w,) = cpu_warnings(cfg, "cpu", 900_000_000)
    assert "512x512" in w and "64x a training step" in w and "--w/--h" in w
    assert cpu_warnings(cfg, "cuda", 1000) == []
    cfg.sample_prompts, cfg.mixed_precision = ["b"], "bf16"
    (w,) = cpu_warnings(cfg, "cpu", 2_600_000)
    assert "bf16" in w and "2.6M" in w and 'mixed_precision = "no"' in w
    assert cpu_warnings(cfg, "cpu", 860_000_000) == []  # full-size SD1.5: bf16 is faster there


def test_a_small_unet_on_the_cpu_trains_on_one_thread_unless_told(tiny_training_root, tmp_path):
    import torch

    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        on_step = lambda e: seen.append(torch.get_num_threads()) if e["event"] == "step" else None  # noqa: E731
        train(_cfg(tiny_training_root, tmp_path / "a.safetensors", steps=1, sample_prompts=[]), on_event=on_step)
        assert seen == [1] and torch.get_num_threads() == 2  # one thread while it ran, torch's count back after
        train(_cfg(tiny_training_root, tmp_path / "b.safetensors", steps=1, sample_prompts=[], cpu_threads=2), on_event=on_step)
        assert seen == [1, 2]  # an explicit count wins
    finally:
        torch.set_num_threads(before)
