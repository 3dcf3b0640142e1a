"""Training on the tiny pipelines: loss falls, the file is right, events/report/samples, SD2-v and SDXL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import TrainingOutOfMemory, train
from sd_lora.training.events import read_events

CAPTION = "a red circle on a blue background"


def make_images(folder, n=4, size=(64, 64), caption=CAPTION):
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[...] = (30, 60, 220)
        yy, xx = np.mgrid[:h, :w]
        a[(yy - h // 2) ** 2 + (xx - w // 2 - i * 3) ** 2 < (min(w, h) // 4) ** 2] = (220, 30, 30)
        Image.fromarray(a).save(folder / f"{i}.png")
        if caption:
            (folder / f"{i}.txt").write_text(caption)
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def _fixed_noise_loss(pipe, latents, hidden):
    """Denoising loss at fixed noise and timesteps (the same draws before and after training)."""
    g = torch.Generator().manual_seed(0)
    sched = pipe.scheduler
    total = 0.0
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.full((latents.shape[0],), t)
        pred = pipe.unet(sched.add_noise(latents, noise, ts), ts, hidden).sample
        total += torch.mean((pred - noise) ** 2).item()
    return total / 5


def test_loss_falls_file_keys_metadata_events_report(tiny_models, tmp_path):
    from sd_lora.data.cache import encode_pixels, item_pixels
    from sd_lora.data.dataset import scan_dataset
    from sd_lora.models import load_base
    from sd_lora.network import NetworkConfig, inject_network

    data = make_images(tmp_path / "data" / "5_circle")
    (data / "0.txt").unlink()  # one image without a caption: the folder name is used
    out = tmp_path / "out" / "circle.safetensors"
    seen = []
    cfg = TrainConfig(
        model=tiny_models["sd1"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
        network={"rank": 8, "alpha": 8, "preset": "attention", "train_text_encoder": True},
        steps=30, batch_size=4, lr=1e-2, text_encoder_lr=1e-3, seed=1, save_every=20,
        sample_every=30, sample_prompts=["a red circle --w 64 --h 64 --s 2 --d 3 --l 1"],
    )
    assert train(cfg, on_event=seen.append) == out

    # the trained LoRA lowers the denoising loss on the training images at fixed noise
    pipe = load_base(tiny_models["sd1"])
    ds = scan_dataset(cfg.data)
    latents = torch.cat([encode_pixels(pipe.vae, item_pixels(i, False, 10**8)[None]) for i in ds.items])
    network = inject_network(pipe, NetworkConfig(rank=8, alpha=8, preset="attention", train_text_encoder=True))
    captions = [i.caption for i in ds.items]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    before = _fixed_noise_loss(pipe, latents, pipe.text_encoder(ids)[0])
    tensors, metadata = load_safetensors(out)
    network.load_kohya_state_dict({k: v.float() for k, v in tensors.items()})
    after = _fixed_noise_loss(pipe, latents, pipe.text_encoder(ids)[0])
    assert after < before * 0.97, (before, after)  # measured: 1.088 -> 1.035

    # kohya keys for UNet attention and the text encoder, each module with down/up/alpha
    assert any(k.startswith("lora_unet_") and "attn1_to_q" in k for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(tensors)
    assert tensors[next(iter(k for k in tensors if k.endswith("lora_down.weight")))].dtype == torch.float16
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == "30"
    assert metadata["ss_num_train_images"] == "4" and metadata["ss_text_encoder_lr"] == "0.001"
    assert json.loads(metadata["ss_tag_frequency"]) == {"5_circle": {CAPTION: 3, "circle": 1}}
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # events: the same records in the callback and the JSON-lines file
    kinds = [e["event"] for e in read_events(out.parent / "circle.events.jsonl")]
    assert kinds == [e["event"] for e in seen]
    assert kinds[:2] == ["dataset", "start"] and kinds[-1] == "done"
    assert kinds.count("step") == 30 and "checkpoint" in kinds and "sample" in kinds
    start = next(e for e in seen if e["event"] == "start")
    assert start["total_steps"] == 30 and "4 images x repeats = 20 samples per epoch" in start["arithmetic"]
    step = next(e for e in seen if e["event"] == "step")
    assert {"step", "loss", "lr", "it_per_s", "eta_s", "epoch"} <= set(step)
    # every event carries exactly the fields of its kind in the one schema (training/events.py)
    from sd_lora.training.events import EVENTS

    for e in seen:
        assert set(e) - {"event", "time"} == set(EVENTS[e["event"]]), e["event"]
    assert [e["path"] for e in seen if e["event"] == "saved"] == [str(out.parent / "circle-step000020.safetensors"), str(out)]

    # intermediate file, checkpoint folder, samples, loss curve and grid next to the output
    assert (out.parent / "circle-step000020.safetensors").is_file()
    assert (out.parent / "circle-checkpoints" / "step-00000020" / "optimizer.pt").is_file()
    done = seen[-1]
    assert Image.open(done["loss_curve"]).size == (800, 400)
    assert Image.open(done["sample_grid"]).width >= 64
    assert (out.parent / "circle-samples" / "step-000030-0.png").is_file()


@pytest.mark.parametrize("arch", ["sd2-v", "sdxl"])
def test_sd2v_and_sdxl_train(tiny_models, tmp_path, arch):
    from sd_lora.models import architecture_of, load_base

    # Square and wide images: two buckets (so SDXL's add_time_ids differ per bucket)
    make_images(tmp_path / "data" / "2_a", n=2, size=(64, 64))
    make_images(tmp_path / "data" / "2_b", n=2, size=(64, 32))
    out = tmp_path / f"{arch}.safetensors"
    data = DataConfig(path=str(tmp_path / "data"), resolution=64, bucket_step=32, flip=True)
    cfg = TrainConfig(model=tiny_models[arch], output=str(out), data=data,
                      network={"rank": 4, "alpha": 4, "train_text_encoder": arch == "sdxl"}, steps=3, batch_size=2,
                      min_snr_gamma=5.0, noise_offset=0.05)
    events = []
    train(cfg, on_event=events.append)
    assert architecture_of(load_base(tiny_models[arch])).prediction_type == ("v_prediction" if arch == "sd2-v" else "epsilon")
    tensors, metadata = load_safetensors(out)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    buckets = next(e for e in events if e["event"] == "dataset")["buckets"]
    assert len(buckets) == 2
    if arch == "sdxl":
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)  # SGM names, as kohya writes SDXL
    else:
        assert metadata.get("ss_v_parameterization") == "True" and metadata["ss_v2"] == "True"


def test_out_of_memory_gives_advice(tiny_models, tmp_path, monkeypatch):
    from sd_lora.training import loop

    make_images(tmp_path / "data", n=1)
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(tmp_path / "o.safetensors"), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "train_text_encoder": True}, steps=2, batch_size=4)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "diffusion_loss", oom)
    with pytest.raises(TrainingOutOfMemory) as err:
        train(cfg)
    msg = str(err.value)
    for hint in ("batch_size = 1 with gradient_accumulation = 4", "gradient_checkpointing = true", "adamw8bit",
                 "train_text_encoder = false", 'base_precision = "fp8"'):
        assert hint in msg
    events = read_events(tmp_path / "o.events.jsonl")
    assert events[-1]["event"] == "error" and "out of memory" in events[-1]["message"]


def test_nan_loss_skips_updates_then_stops_with_advice(tiny_models, tmp_path, monkeypatch):
    from sd_lora.training import loop

    make_images(tmp_path / "data", n=1)
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(tmp_path / "o.safetensors"), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4, "train_text_encoder": False}, steps=20)
    real = loop.diffusion_loss
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    events = []
    with pytest.raises(ValueError, match="NaN/inf 5 steps in a row"):
        train(cfg, on_event=events.append)
    assert sum(e["event"] == "warning" and "update skipped" in e["message"] for e in events) == 5


def test_save_every_epochs_and_tensorboard_log(tiny_models, tmp_path):
    """Epoch saves land after epochs 2 and 4 (not at the end: the final file is the output), and
    TensorBoard holds the same loss curve as the events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_images(tmp_path / "data" / "1_circle", n=4)
    out = tmp_path / "o.safetensors"
    cfg = TrainConfig(model=tiny_models["sd1"], output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 4}, epochs=5, batch_size=2, save_every_epochs=2, tensorboard=True, lr=1e-3)
    assert train(cfg) == out and out.is_file()
    # 4 images / batch 2 = 2 steps per epoch: epochs 2 and 4 end at steps 4 and 8.
    assert sorted(p.name for p in tmp_path.glob("o-step*.safetensors")) == ["o-step000004.safetensors", "o-step000008.safetensors"]
    assert load_safetensors(tmp_path / "o-step000004.safetensors")[0].keys() == load_safetensors(out)[0].keys()
    # checkpoints at the two epoch saves and at the last step (a finished run can be extended)
    assert sorted(p.name for p in (tmp_path / "o-checkpoints").iterdir()) == ["step-00000004", "step-00000008", "step-00000010"]

    steps = {e["step"]: e["loss"] for e in read_events(tmp_path / "o.events.jsonl") if e["event"] == "step"}
    logs = list((tmp_path / "o-tensorboard").glob("events.out.tfevents.*"))
    assert len(logs) == 1
    acc = EventAccumulator(str(logs[0]))
    acc.Reload()
    assert {"loss", "lr"} <= set(acc.Tags()["scalars"])
    tb = {s.step: s.value for s in acc.Scalars("loss")}
    assert sorted(tb) == sorted(steps) == list(range(1, 11))
    for step, loss in steps.items():
        assert tb[step] == pytest.approx(loss, rel=1e-6)


def test_event_schema_refuses_what_it_does_not_list(tmp_path):
    from sd_lora.training.events import EventLog, make_event

    assert make_event("warning", message="x")["message"] == "x"
    with pytest.raises(ValueError, match="unknown event kind 'progress'"):
        make_event("progress", step=1)
    with pytest.raises(ValueError, match="fields"):
        make_event("checkpoint", step=1, path="p", lora="never sent")
    log = EventLog(tmp_path / "e.jsonl")
    with pytest.raises(ValueError):
        log.emit("step", step=1)  # lr, loss, ... missing
    log.close()
    assert (tmp_path / "e.jsonl").read_text() == ""  # nothing written for a refused event


def test_sample_grid_rows_by_step_from_artifact_names(tmp_path):
    from sd_lora import artifacts
    from sd_lora.training.report import draw_sample_grid

    out = tmp_path / "style.safetensors"
    paths = []
    for step in (10, 2):  # not in name order: step 2 must still come first
        for index in (0, 1):
            p = artifacts.sample_image(out, step, index)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (255 * index, 0, step)).save(p)
            paths.append(p)
    stray = artifacts.samples_dir(out) / "notes.png"  # not a sample: left out
    Image.new("RGB", (64, 64)).save(stray)
    grid = draw_sample_grid(paths + [stray], artifacts.sample_grid(out), cell=64)
    img = Image.open(grid)
    assert img.size == (2 * 64, 2 * (64 + 16))
    assert img.getpixel((32, 16 + 32)) == (0, 0, 2) and img.getpixel((96, 80 + 16 + 32)) == (255, 0, 10)
    assert draw_sample_grid([stray], tmp_path / "none.png") is None
