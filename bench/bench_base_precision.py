"""Memory of the frozen base by base_precision (fp32 / bf16 / fp8; nf4 / int8 on CUDA).

    PYTHONPATH=. .venv/bin/python bench/bench_base_precision.py [--cpu-steps 2] [--size 256] [--no-cpu-train]
                                                                [--gpu-steps 20] [--only sd1|sdxl]

1. Weight bytes (exact, no storage: the models are built on the meta device): parameters + buffers
   of the full-size UNet + text encoder(s) of SD1.5 and SDXL, each precision, with LoRA r16 on
   attention injected (adapters fp32).
2. CPU training step (a subprocess per case, so the RSS is its own): full-size SD1.5 UNet with
   random weights, LoRA r16 attention, bf16 compute, batch 1 at --size px. Reports RSS after the
   model is ready (the resident base), the peak RSS of the steps (VmHWM reset before them via
   /proc/self/clear_refs) and s/step. bf16 base vs fp8 base.
3. CUDA (skipped cleanly without it): the real trainer (sd_lora.train) on full-size SD1.5 at 512 px
   and SDXL at 1024 px, random weights, batch 1, LoRA r16 kohya preset, AdamW8bit, gradient
   checkpointing, cached latents/text; base_precision bf16 vs fp8 vs nf4 vs int8: peak VRAM
   (torch.cuda.max_memory_allocated) and it/s.
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
sys.path.insert(0, str(REPO / "bench"))

GIB = 2**30


def weight_bytes() -> list[dict]:
    import torch

    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.testing import full_size_text_encoders, full_size_unet
    from sd_lora.training.base_precision import apply_base_precision, model_bytes

    rows = []
    for arch in ("sd1", "sdxl"):
        row = {"model": arch}
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16)):
            pipe = _meta_pipe(arch, full_size_unet, full_size_text_encoders)
            for m in pipe.models():
                m.requires_grad_(False)
            inject_network(pipe, NetworkConfig(rank=16, alpha=16, preset="attention", train_text_encoder=True))
            apply_base_precision(pipe, precision if precision == "fp8" else None, dtype)
            for m in pipe.models():  # what the trainer does with everything that was not stored small
                for p in m.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(dtype)
            row[precision] = round(sum(model_bytes(m) for m in pipe.models()) / GIB, 3)
        row["fp8/bf16"] = round(row["fp8"] / row["bf16"], 3)
        rows.append(row)
    return rows


class _MetaPipe:
    """Just enough of a pipeline for inject_network / apply_base_precision (architecture from the UNet)."""

    def __init__(self, unet, encoders):
        self.unet = unet
        self.text_encoder = encoders[0]
        if len(encoders) > 1:
            self.text_encoder_2 = encoders[1]

    def models(self):
        return [m for m in (self.unet, self.text_encoder, getattr(self, "text_encoder_2", None)) if m is not None]


def _meta_pipe(arch, full_size_unet, full_size_text_encoders):
    return _MetaPipe(full_size_unet(arch, device="meta"), full_size_text_encoders(arch, device="meta"))


# ---- 2. CPU step in a subprocess ---------------------------------------------------------------------

def _rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def cpu_child(precision: str, steps: int, size: int) -> None:
    import torch

    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.testing import full_size_unet
    from sd_lora.training.base_precision import apply_base_precision, model_bytes

    unet = full_size_unet("sd1", device="cpu", dtype=torch.float32)
    unet.requires_grad_(False)
    pipe = _MetaPipe(unet, [None])
    pipe.text_encoder = None
    network = inject_network(pipe, NetworkConfig(rank=16, alpha=16, preset="attention", train_text_encoder=False))
    apply_base_precision(pipe, "fp8" if precision == "fp8" else None, torch.bfloat16)
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    import gc

    gc.collect()
    ready = _rss_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the steps' own
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = torch.randn(1, 4, lat, lat, generator=g)
        h = torch.randn(1, 77, 768, generator=g)
        with torch.autocast("cpu", torch.bfloat16):
            pred = unet(x, torch.tensor([500]), h).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({
        "base": precision, "unet_weight_gib": round(model_bytes(unet) / GIB, 3), "rss_ready_gib": round(ready, 2),
        "peak_rss_steps_gib": round(_rss_gib("VmHWM"), 2), "s_per_step": round(min(times), 2), "steps": steps,
    }), flush=True)


def cpu_train(steps: int, size: int) -> list[dict]:
    rows = []
    for precision in ("bf16", "fp8"):
        cmd = [sys.executable, __file__, "--cpu-child", precision, "--cpu-steps", str(steps), "--size", str(size)]
        # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps freed
        # tensors in its heap, so RSS would show the allocator's history rather than live tensors.
        env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"cpu {precision} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
    return rows


# ---- 3. CUDA -------------------------------------------------------------------------------------

GPU_CASES = {"sd1": 512, "sdxl": 1024}
GPU_PRECISIONS = ("bf16", "fp8", "nf4", "int8")


def gpu_child(root: Path, arch: str, precision: str, steps: int) -> None:
    import torch

    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.training import train

    res = GPU_CASES[arch]
    times = []
    cfg = TrainConfig(
        model=str(root / f"model-{arch}"), output=str(root / "out" / f"{arch}-{precision}.safetensors"),
        data=DataConfig(path=str(root / f"data-{res}"), resolution=res, cache_latents="ram"),
        network={"rank": 16, "alpha": 16, "preset": "kohya", "train_text_encoder": False},
        steps=steps, batch_size=1, lr=1e-4, optimizer="adamw8bit", gradient_checkpointing=True,
        mixed_precision="bf16", base_precision=precision, seed=0,
    )
    train(cfg, on_event=lambda e: times.append(time.perf_counter()) if e["event"] == "step" else None)
    print("RESULT " + json.dumps({
        "case": f"{arch} {res}px", "base": precision, "it_per_s": round((len(times) - 1) / (times[-1] - times[0]), 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2), "device": torch.cuda.get_device_name(),
    }), flush=True)


def gpu_runs(root: Path, steps: int, only: str | None) -> bool:
    from bench_train_gpu import prepare

    ok = True
    for arch in [only] if only else list(GPU_CASES):
        prepare(root, arch, GPU_CASES[arch])
        base = None
        for precision in GPU_PRECISIONS:
            cmd = [sys.executable, __file__, "--gpu-child", arch, precision, "--root", str(root), "--gpu-steps", str(steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{arch} {precision} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                ok = False
                continue
            r = json.loads(line[len("RESULT "):])
            base = base or (r if precision == "bf16" else None)
            if base:
                r["vram_vs_bf16"] = round(r["peak_vram_gb"] / base["peak_vram_gb"], 3)
                r["speed_vs_bf16"] = round(r["it_per_s"] / base["it_per_s"], 3)
            print(json.dumps(r), flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="CPU step resolution (px)")
    ap.add_argument("--no-cpu-train", action="store_true", help="only the weight bytes (and CUDA runs)")
    ap.add_argument("--gpu-steps", type=int, default=20)
    ap.add_argument("--only", choices=tuple(GPU_CASES))
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "sd_lora_bench_gpu"))
    ap.add_argument("--cpu-child", choices=("bf16", "fp8"), help=argparse.SUPPRESS)
    ap.add_argument("--gpu-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_child:
        cpu_child(args.cpu_child, args.cpu_steps, args.size)
        return 0
    if args.gpu_child:
        gpu_child(Path(args.root), args.gpu_child[0], args.gpu_child[1], args.gpu_steps)
        return 0

    print("## frozen base weight bytes (GiB), UNet + text encoder(s), LoRA r16 attention injected")
    for row in weight_bytes():
        print(json.dumps(row), flush=True)
    if not args.no_cpu_train:
        print(f"## CPU: full-size SD1.5 UNet, LoRA r16 attention, bf16 compute, {args.size} px, batch 1")
        rows = cpu_train(args.cpu_steps, args.size)
        for r in rows:
            print(json.dumps(r), flush=True)
        if len(rows) == 2:
            print(json.dumps({"fp8/bf16 rss_ready": round(rows[1]["rss_ready_gib"] / rows[0]["rss_ready_gib"], 3),
                              "fp8/bf16 peak_rss_steps": round(rows[1]["peak_rss_steps_gib"] / rows[0]["peak_rss_steps_gib"], 3),
                              "fp8/bf16 s_per_step": round(rows[1]["s_per_step"] / rows[0]["s_per_step"], 3)}))
    import torch

    if not torch.cuda.is_available():
        print("## CUDA: no CUDA device; nf4/int8/fp8-vs-bf16 VRAM runs skipped (run this on an NVIDIA GPU).")
        return 0
    print("## CUDA: sd_lora.train, peak VRAM and it/s by base_precision")
    return 0 if gpu_runs(Path(args.root), args.gpu_steps, args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
