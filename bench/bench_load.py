"""Peak memory of `load_base` on a full-size single-file checkpoint (random weights, nothing downloaded).

    PYTHONPATH=. .venv/bin/python bench/bench_load.py [--arch sd1] [--file-dtype float32] [--dtype float32 float16]

1. Builds a full-size pipeline of `--arch` with seeded random weights (in the file's dtype, one
   copy) and writes it as an original-layout .safetensors file with `save_single_file` (skipped
   when the file exists).
2. In a fresh Python process: imports, records the baseline RSS, runs `load_base(file)`, and
   records RSS right after loading, the peak RSS (VmHWM), RSS once every weight has been
   read, and the time; once per `--dtype`.

The question it answers: does loading hold two copies of the weights at once? One copy of fp32
SD1.5 is ~4.3 GB; peak - baseline near 1x the file size means one copy, near 2x means two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time, torch
def status(field):
    # VmHWM is the peak RSS of this process image. (getrusage's ru_maxrss is not usable here: Linux
    # carries it over from the parent through fork + exec, so it would report the parent's peak.)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
import diffusers, transformers  # imports are part of the baseline, not of the load
from sd_lora.models import load_base, architecture_of
torch.set_num_threads(2)
dtype = getattr(torch, sys.argv[2])
base = status("VmRSS")
t = time.perf_counter()
pipe = load_base(sys.argv[1], dtype=dtype)
seconds = time.perf_counter() - t
after, peak_load = status("VmRSS"), status("VmHWM")
parts = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
params = [p for m in parts for p in m.parameters()]
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in params)  # touch every weight once
touched = status("VmRSS")
print(json.dumps({"arch": architecture_of(pipe).arch, "baseline": base, "after": after, "peak_load": peak_load,
                  "touched": touched, "peak": status("VmHWM"), "seconds": seconds,
                  "params": sum(p.numel() for p in params), "weight_bytes": sum(p.numel() * p.element_size() for p in params)}))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def save_random_checkpoint(arch: str, path: Path, dtype: torch.dtype) -> None:
    """Write a full-size `arch` single file with random weights, holding one copy in `dtype` only.

    The modules are built on the meta device, given storage directly in `dtype`, and filled in place,
    so even SDXL (3.5 B parameters) needs ~7 GB in fp16. The weights are noise: fine for measuring
    loading, useless for images.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import schedulers as diffusers_schedulers

    from sd_lora.convert_single_file import save_single_file
    from sd_lora.models import ARCH_SDXL, shipped_config_dir, shipped_tokenizer
    from sd_lora.testing import full_size_text_encoders, full_size_unet

    config = shipped_config_dir(arch)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config, subfolder="vae"))
    modules = [full_size_unet(arch), vae, *full_size_text_encoders(arch)]
    gen = torch.Generator().manual_seed(0)
    for m in modules:
        m.to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    sched_cfg = diffusers_schedulers.DDIMScheduler.load_config(config, subfolder="scheduler")
    scheduler = getattr(diffusers_schedulers, sched_cfg["_class_name"]).from_config(sched_cfg)
    unet, vae, te = modules[:3]
    if arch == ARCH_SDXL:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=modules[3], tokenizer=shipped_tokenizer(),
                                         tokenizer_2=shipped_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=shipped_tokenizer(), unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    save_single_file(pipe, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--file", default=None, help="checkpoint to write/read (default /tmp/sd_lora_bench_<arch>_<file-dtype>.safetensors)")
    ap.add_argument("--file-dtype", default="float32", choices=["float32", "float16"], help="dtype of the weights in the file")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16"], help="dtypes to load as")
    args = ap.parse_args()
    path = Path(args.file or f"/tmp/sd_lora_bench_{args.arch}_{args.file_dtype}.safetensors")

    if not path.exists():
        t = time.perf_counter()
        save_random_checkpoint(args.arch, path, getattr(torch, args.file_dtype))
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1")
    size = path.stat().st_size
    print(f"file: {path} ({gib(size)})")
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\nload_base(dtype=torch.{dtype}): {r['arch']}, {r['params'] / 1e6:.0f}M parameters = {gib(r['weight_bytes'])} of weights")
        print(f"  baseline RSS (after imports):     {gib(r['baseline'])}")
        print(f"  RSS right after load_base:        {gib(r['after'])}  (weights are memory-mapped, read on first use)")
        print(f"  peak RSS during load_base:        {gib(r['peak_load'])}")
        print(f"  RSS after touching every weight:  {gib(r['touched'])}")
        print(f"  peak RSS overall:                 {gib(r['peak'])} = baseline + {(r['peak'] - r['baseline']) / r['weight_bytes']:.2f} x weights")
        print(f"  load time:                        {r['seconds']:.1f} s")

if __name__ == "__main__":
    main()
