"""Soak: many LoRA stack switches and many short trainings in one process; memory must stay flat.

    PYTHONPATH=. .venv/bin/python bench/soak.py                 # 500 switches + 50 trainings
    PYTHONPATH=. .venv/bin/python bench/soak.py --switches 100 --trainings 10   # quick look

Prints RSS (from /proc/self/status, after gc) at the start, after a warm-up, and every tenth of each
phase, then the growth after the warm-up. "Flat" = growth after warm-up under a few MiB, with no
upward trend across the checkpoints. A tiny SD1 pipeline (sd_lora.testing) keeps it CPU-cheap; the
question is leaks (caches, hooks, backups, PEFT wrappers, accelerate state), not speed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported


def rss_mib() -> float:
    gc.collect()
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_loras(pipe, folder: Path, n: int) -> list[Path]:
    import torch

    from sd_lora.formats.kohya import save_lora
    from sd_lora.network.naming import module_index

    names = [k for k, v in module_index(pipe, "sd1").items() if isinstance(v[2], torch.nn.Linear)][:12]
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for name in names:
            w = module_index(pipe, "sd1")[name][2].weight
            sd[f"{name}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(4.0)
        paths.append(save_lora(folder / f"l{i}.safetensors", sd))
    return paths


def soak_switches(n: int, folder: Path) -> list[tuple[int, float]]:
    import random

    import torch

    from sd_lora.stack import apply_loras
    from sd_lora.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    paths = make_loras(pipe, folder, 4)
    rng = random.Random(0)
    marks = []
    for i in range(n):
        stack = [(p, rng.uniform(-1, 1)) for p in rng.sample(paths, rng.randint(0, 3))]
        apply_loras(pipe, stack)
        if i == 9 or (i + 1) % max(1, n // 10) == 0:
            marks.append((i + 1, rss_mib()))
    apply_loras(pipe, [])
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in base.items()), "restore is not exact"
    return marks


def soak_trainings(n: int, folder: Path) -> list[tuple[int, float]]:
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.testing import tiny_pipeline, write_noise_images
    from sd_lora.training import train

    tiny_pipeline("sd1").save_pretrained(folder / "model")
    write_noise_images(folder / "data" / "2_thing", 2)
    marks = []
    for i in range(n):
        cfg = TrainConfig(model=str(folder / "model"), output=str(folder / f"out{i % 2}" / "lora.safetensors"),
                          data=DataConfig(path=str(folder / "data"), resolution=64), steps=2, seed=i,
                          network={"rank": 2, "preset": "attention"})
        train(cfg)
        if i == 1 or (i + 1) % max(1, n // 10) == 0:
            marks.append((i + 1, rss_mib()))
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=500)
    ap.add_argument("--trainings", type=int, default=50)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is faster and leaves the other core free
    print(f"start: {rss_mib():.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for label, fn, n in (("stack switches", soak_switches, args.switches), ("trainings", soak_trainings, args.trainings)):
            if not n:
                continue
            t = time.time()
            folder = Path(tmp) / label.replace(" ", "_")
            folder.mkdir()
            marks = fn(n, folder)
            print(f"{label}: " + ", ".join(f"{i}: {m:.1f}" for i, m in marks) + " MiB")
            warm = marks[0][1]
            print(f"  {n} {label} in {time.time() - t:.1f} s; RSS growth after the first {marks[0][0]}: "
                  f"{marks[-1][1] - warm:+.1f} MiB (max {max(m for _, m in marks) - warm:+.1f})")


if __name__ == "__main__":
    main()
