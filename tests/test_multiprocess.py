"""Two CPU processes through `accelerate launch` (gloo): the CLI trains, the main process saves one file, and
the validation loss is the one a single process computes for the same weights.

On a machine without GPUs `accelerate launch --multi_gpu --num_processes 2` starts two processes with
torchrun; the trainer sees no CUDA and has accelerate use the gloo CPU backend. (`--cpu` would make
accelerate start a single process.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_lora.io import load_safetensors
from sd_lora.training.events import read_events


def test_two_process_accelerate_launch(tmp_path):
    from sd_lora.testing import tiny_pipeline, write_noise_images

    tiny_pipeline("sd1").save_pretrained(tmp_path / "model")
    write_noise_images(tmp_path / "data" / "3_dots", 4, "dots")
    write_noise_images(tmp_path / "held-out", 3, "dots", seed=1)  # 3: the processes score 2 and 1 of them
    out = tmp_path / "out" / "dots.safetensors"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sd_lora.cli", "train",
        "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output", str(out),
        "--resolution", "64", "--steps", "4", "--rank", "4", "--no-train-text-encoder", "--save-every", "2",
        "--cache-latents", "disk", "--validation-data", str(tmp_path / "held-out"), "--validate-every-n-steps", "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tensors, metadata = load_safetensors(out)
    assert tensors and metadata["ss_steps"] == "4"
    events = read_events(out.parent / "dots.events.jsonl")  # written by the main process only
    start = next(e for e in events if e["event"] == "start")
    assert start["processes"] == 2
    # 4 images x 3 repeats = 12 batches per epoch, 2 per step (one per process): 6 steps per epoch
    assert start["steps_per_epoch"] == 6
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["event"] for e in events].count("done") == 1
    assert sorted(p.name for p in out.parent.glob("*.safetensors")) == ["dots-step000002.safetensors", "dots.safetensors"]
    # the 4 training images and the 3 held-out ones, each encoded once
    assert len(list((tmp_path / "data" / ".sd-lora-cache").glob("*.safetensors"))) == 4 + 3

    # the validation loss: each process scores its share of the 3 held-out images, the shares are summed
    val = {e["step"]: e for e in events if e["event"] == "val"}
    assert sorted(val) == [2, 4] and {e["images"] for e in val.values()} == {3}
    # one process, started from the saved LoRA at a rate too small to move a weight (1e-30 x Adam's unit step
    # is below float32's resolution of every trained weight), scores all 3 itself after its one step: the same
    # loss up to the file's float16 rounding of the weights (measured 1e-8 relative; the main process's share
    # alone is 6e-3 off)
    single = tmp_path / "single" / "dots.safetensors"
    cmd_single = [sys.executable, "-m", "sd_lora.cli", "train", *cmd[cmd.index("--model"):], "--init-lora", str(out),
                  "--lr", "1e-30", "--steps", "1"]
    cmd_single[cmd_single.index("--output") + 1] = str(single)
    proc = subprocess.run(cmd_single, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single_val = [e for e in read_events(single.parent / "dots.events.jsonl") if e["event"] == "val"]
    assert [e["step"] for e in single_val] == [1] and single_val[0]["images"] == 3
    assert single_val[0]["loss"] == pytest.approx(val[4]["loss"], rel=1e-5)  # the last step's
