"""What each optimizer costs: training step time, optimizer.step() time, optimizer state and peak RSS, next to AdamW.

    .venv/bin/python bench/bench_optimizers.py [--steps 4] [--resolution 256] [--rank 16] [--optimizers adamw prodigy ...]
    .venv/bin/python bench/bench_optimizers.py --isolated [--steps 10]     (optimizer.step() and state only, one process)

Each optimizer trains the same LoRA with sd-lora's trainer (rank 16 on UNet + text-encoder attention,
fp32, batch 1, the images and full-size SD1.5 with random weights of bench/bench_train.py), in its own
subprocess so peak RSS is its own. Per optimizer it prints the mean training step (steps 2..N, from
the trainer's step events), the mean time inside optimizer.step() (timed around the optimizer the
trainer builds), the bytes of optimizer state after the run, and the peak RSS; then each as a ratio
to AdamW's in the same run. The paged bitsandbytes optimizers are left out where there is no CUDA
(they run as their plain 8-bit versions there). Adaptive optimizers run at lr 1.0, the others 1e-4.

--isolated measures only what differs between optimizers, all in one process: the LoRA's parameters
(the same rank-16 UNet + text-encoder attention adapters of full-size SD1.5, shapes from a meta-device
pipeline, values random) with fixed random gradients, the mean optimizer.step() time over --steps
steps after one warm-up step, and the bytes of optimizer state. On a busy machine this is the figure
to read: the full training step there is dominated by the frozen UNet's forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def child(args) -> None:
    from bench_train import peak_rss_gib

    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.optimizers import spec
    from sd_lora.training import optim, train

    root = Path(args.root)
    built, step_s = [], []
    build = optim.OptimizerChoice.build

    def timed_build(self, groups):  # time the optimizer's own step inside the trainer's step
        opt = build(self, groups)
        inner = opt.step

        def step(_self, *a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            step_s.append(time.perf_counter() - t)
            return out

        opt.step = types.MethodType(step, opt)  # a bound method, as torch's LR scheduler wraps it
        built.append(opt)
        return opt

    optim.OptimizerChoice.build = timed_build
    times = []
    cfg = TrainConfig(
        model=str(root / "model"), output=str(root / "out" / f"{args.one}.safetensors"),
        data=DataConfig(path=str(root / "data"), resolution=args.resolution, cache_latents="ram"),
        network={"rank": args.rank, "alpha": args.rank, "preset": "attention", "train_text_encoder": True},
        steps=args.steps, batch_size=1, lr=1.0 if spec(args.one).adaptive else 1e-4, optimizer=args.one, seed=0,
    )
    train(cfg, on_event=lambda e: times.append(time.perf_counter()) if e["event"] == "step" else None)
    state = sum(t.numel() * t.element_size() for s in built[0].state.values() for t in s.values() if hasattr(t, "numel"))
    print("RESULT " + json.dumps({
        "optimizer": args.one, "s_per_step": round((times[-1] - times[0]) / (len(times) - 1), 3),
        "optimizer_step_ms": round(1000 * sum(step_s[1:]) / max(1, len(step_s) - 1), 2),
        "state_mib": round(state / 2**20, 2), "peak_rss_gib": round(peak_rss_gib(), 2)}), flush=True)


def isolated(args) -> list[dict]:
    import torch

    from sd_lora.config import TrainConfig
    from sd_lora.network.inject import inject_network
    from sd_lora.optimizers import OPTIMIZERS, spec
    from sd_lora.testing import full_size_pipeline
    from sd_lora.training.optim import choose_optimizer, network_param_groups

    meta = full_size_pipeline("sd1", device="meta")
    cfg = TrainConfig(network={"rank": args.rank, "alpha": args.rank, "preset": "attention", "train_text_encoder": True})
    network = inject_network(meta, cfg.network)
    shapes = {id(p): tuple(p.shape) for p in network.parameters()}
    gen = torch.Generator().manual_seed(0)
    rows = []
    names = args.optimizers or [n for n, s in OPTIMIZERS.items() if s.installed and (not s.cuda_only or torch.cuda.is_available())]
    for name in names:
        cfg.optimizer, cfg.lr = name, (1.0 if spec(name).adaptive else 1e-4)
        groups = [{**g, "params": [torch.nn.Parameter(torch.randn(shapes[id(p)], generator=gen) * 0.01) for p in g["params"]]}
                  for g in network_param_groups(network, True, cfg)]
        params = [p for g in groups for p in g["params"]]
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3 for i, p in enumerate(params)]
        opt = choose_optimizer(cfg, args.steps + 1).build(groups)
        times = []
        for _ in range(args.steps + 1):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel"))
        rows.append({"optimizer": name, "params_m": round(sum(p.numel() for p in params) / 1e6, 2),
                     "optimizer_step_ms": round(1000 * sum(times[1:]) / args.steps, 1), "state_mib": round(state / 2**20, 2)})
    a = rows[0]
    for r in rows:
        r.update({"step_ratio": round(r["optimizer_step_ms"] / a["optimizer_step_ms"], 2),
                  "state_ratio": round(r["state_mib"] / a["state_mib"], 2)})
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--optimizers", nargs="+", help="default: every one in sd_lora/optimizers.py that runs here")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "sd_lora_bench_train"), help="shared with bench_train.py")
    ap.add_argument("--isolated", action="store_true", help="optimizer.step() time and state only, one process (see above)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        child(args)
        return
    if args.optimizers and args.optimizers[0] != "adamw":
        args.optimizers = ["adamw"] + [n for n in args.optimizers if n != "adamw"]
    if args.isolated:
        isolated(args)
        return
    import torch
    from bench_train import prepare

    from sd_lora.optimizers import OPTIMIZERS

    names = args.optimizers or [n for n, s in OPTIMIZERS.items() if s.installed and (not s.cuda_only or torch.cuda.is_available())]
    if names[0] != "adamw":
        names = ["adamw"] + [n for n in names if n != "adamw"]
    root = Path(args.root)
    prepare(root, args.resolution)
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--root", str(root), "--steps", str(args.steps),
               "--resolution", str(args.resolution), "--rank", str(args.rank)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(json.dumps({"optimizer": name, "failed": (out.stderr or out.stdout)[-600:]}), flush=True)
            continue
        r = results[name] = json.loads(line[len("RESULT "):])
        a = results["adamw"]
        r.update({"step_ratio": round(r["s_per_step"] / a["s_per_step"], 3),
                  "optimizer_step_ratio": round(r["optimizer_step_ms"] / a["optimizer_step_ms"], 2) if a["optimizer_step_ms"] else None,
                  "state_ratio": round(r["state_mib"] / a["state_mib"], 2) if a["state_mib"] else None,
                  "rss_ratio": round(r["peak_rss_gib"] / a["peak_rss_gib"], 3)})
        print(json.dumps(r), flush=True)
    print(json.dumps({"settings": f"full-size SD1.5 (random weights), {args.resolution} px, batch 1, rank {args.rank}, UNet + TE "
                      f"attention, fp32, {args.steps} steps, {'CUDA' if torch.cuda.is_available() else 'CPU'}"}))


if __name__ == "__main__":
    main()
