"""GPU training bench: peak VRAM and it/s of sd-lora's trainer with the memory-saving settings.

    .venv/bin/python bench/bench_train_gpu.py [--steps 20] [--only sd1|sdxl]

  SD1.5 at 512 px, batch 1: AdamW8bit + gradient checkpointing + cached latents and text-encoder
      outputs + fp16 base weights; goal peak VRAM <= 4 GB.
  SDXL at 1024 px, batch 1, same settings; goal peak VRAM <= 8 GB.

Models are full-size with random weights (sd_lora.testing.full_size_pipeline), saved once to a
temporary folder. Each case runs in its own subprocess so its peak (torch.cuda.max_memory_allocated,
and nvidia-smi's view via max_memory_reserved) is its own. Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {"sd1": {"resolution": 512, "goal_gb": 4.0}, "sdxl": {"resolution": 1024, "goal_gb": 8.0}}


def prepare(root: Path, arch: str, resolution: int) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from sd_lora.testing import full_size_pipeline

    model = root / f"model-{arch}"
    if not (model / "model_index.json").is_file():
        full_size_pipeline(arch, dtype=torch.float16).save_pretrained(model)
    folder = root / f"data-{resolution}" / "1_sks dog"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        if not (folder / f"{i}.png").exists():
            Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a photo of sks dog")


def child(root: Path, arch: str, steps: int) -> None:
    import torch

    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.training import train

    res = CASES[arch]["resolution"]
    times = []
    cfg = TrainConfig(
        model=str(root / f"model-{arch}"), output=str(root / "out" / f"{arch}.safetensors"),
        data=DataConfig(path=str(root / f"data-{res}"), resolution=res, cache_latents="ram"),
        network={"rank": 16, "alpha": 16, "preset": "kohya", "train_text_encoder": False},
        steps=steps, batch_size=1, lr=1e-4, optimizer="adamw8bit", gradient_checkpointing=True,
        mixed_precision="fp16", seed=0,
    )
    train(cfg, on_event=lambda e: times.append(time.perf_counter()) if e["event"] == "step" else None)
    it_s = (len(times) - 1) / (times[-1] - times[0])
    print("RESULT " + json.dumps({
        "case": f"{arch} {res}px", "it_per_s": round(it_s, 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
        "goal_gb": CASES[arch]["goal_gb"], "device": torch.cuda.get_device_name(),
    }), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", choices=tuple(CASES))
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "sd_lora_bench_gpu"))
    ap.add_argument("--child", choices=tuple(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_train_gpu: no CUDA device; skipped (run it on a machine with an NVIDIA GPU).")
        return 0
    root = Path(args.root)
    if args.child:
        child(root, args.child, args.steps)
        return 0
    failed = False
    for arch in ([args.only] if args.only else list(CASES)):
        prepare(root, arch, CASES[arch]["resolution"])
        cmd = [sys.executable, __file__, "--child", arch, "--root", str(root), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{arch} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}", file=sys.stderr)
            failed = True
            continue
        r = json.loads(line[len("RESULT "):])
        r["meets_goal"] = r["peak_vram_gb"] <= r["goal_gb"]
        print(json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
