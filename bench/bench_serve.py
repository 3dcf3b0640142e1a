"""The service under a seeded multi-client workload: our grouped scheduler vs our FIFO order vs a plain
diffusers service (set_adapters per request, adapters not fused), all in the same run. Prints
requests/s, p50/p95 latency and stack switches per request.

    PYTHONPATH=. .venv/bin/python bench/bench_serve.py [--requests 200] [--loras 20] [--stacks 30] [--clients 4]
        [--steps 4] [--size 64] [--max-batch 4] [--max-wait 5] [--full-size] [--seed 0]

Workload (seeded): `--stacks` distinct 3-LoRA stacks drawn from `--loras` random kohya LoRA files
(weights 0.3-1.0), each request's stack drawn with Zipf-like popularity (stack k has weight
1/(k+1)^1.1), a prompt from a small list, its own seed; one size and step count, so requests with
the same stack can share a pipeline call. `--clients` closed-loop clients: each sends a request,
waits for its images, sends the next. Latency is from a request's submission to its result.

Sides, each on its own copy of the base (tiny-base by default; `--full-size`: SD1.5 shapes with
random weights, r16 attention LoRAs, which needs ~10 GB RAM and is slow on a CPU):
  grouped    sd_lora.serve: check_request (the HTTP layer's checks) + Scheduler(policy="grouped")
  fifo       the same with policy="fifo" (arrival order; adjacent same-key requests still batch)
  diffusers  a worker thread in arrival order: pipe.set_adapters(stack) with all LoRAs loaded by
             load_lora_weights (PEFT, unfused), then one pipeline call per request
The HTTP layer is left out (the same for every side); bench/README.md has recorded figures.
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_BASE = Path(__file__).resolve().parents[1] / "datasets" / "tiny-base"
PROMPTS = ["a red circle", "a blue square on a white background", "a green triangle", "two yellow stars",
           "a purple ring, pastel", "a black cross on a gray background"]


def load(full_size: bool):
    import sd_lora
    from sd_lora.testing import full_size_pipeline

    pipe = full_size_pipeline("sd1") if full_size else sd_lora.load_base(TINY_BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_loras(pipe, folder: Path, n: int, full_size: bool) -> list[Path]:
    from sd_lora.testing import write_random_lora

    rank = 16 if full_size else 4
    # UNet-only: diffusers 0.42 with transformers 5 leaves kohya text-encoder factors unloaded ("MISSING")
    return [write_random_lora(folder / f"style{i:02d}.safetensors", pipe, seed=100 + i, rank=rank, alpha=rank / 2, text_encoder=False,
                              dtype=torch.float16 if full_size else torch.float32) for i in range(n)]


def workload(seed: int, requests: int, names: list[str], stacks: int, steps: int, size: int) -> list[dict]:
    rng = random.Random(seed)
    pool = [[(name, round(rng.uniform(0.3, 1.0), 1)) for name in rng.sample(names, 3)] for _ in range(stacks)]
    popularity = [1 / (k + 1) ** 1.1 for k in range(stacks)]
    out = []
    for i in range(requests):
        stack = rng.choices(pool, popularity)[0]
        out.append({"prompt": rng.choice(PROMPTS), "loras": [{"name": n, "weight": w} for n, w in stack],
                    "seed": 1000 + i, "steps": steps, "width": size, "height": size})
    return out


def clients(bodies: list[dict], n: int, call) -> tuple[float, list[float]]:
    """`n` closed-loop clients over `bodies` (in order); `call(body)` blocks until the result.
    Returns (wall seconds, latencies)."""
    todo = iter(list(enumerate(bodies)))
    lock = threading.Lock()
    latency = [0.0] * len(bodies)
    errors = []

    def client():
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, body = item
            t = time.perf_counter()
            try:
                call(body)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            latency[i] = time.perf_counter() - t

    threads = [threading.Thread(target=client) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]!r}")
    return time.perf_counter() - t0, latency


def run_ours(pipe, lora_dir: Path, bodies: list[dict], policy: str, args) -> dict:
    import json

    from sd_lora.serve import LoraCatalog, Scheduler
    from sd_lora.serve.request import Limits, check_request

    catalog = LoraCatalog(lora_dir, pipe)
    limits = Limits()
    scheduler = Scheduler(pipe, policy=policy, max_batch=args.max_batch, max_wait=args.max_wait, max_queue=4 * args.clients)

    def call(body):
        job = check_request(json.dumps(body).encode(), catalog, pipe, limits)
        scheduler.submit(job).result()

    try:
        wall, latency = clients(bodies, args.clients, call)
    finally:
        scheduler.close()
    return {"wall": wall, "latency": latency, "switches": scheduler.switches,
            "calls": len(scheduler.batches), "mean_batch": statistics.mean(scheduler.batches)}


def run_diffusers(pipe, files: list[Path], bodies: list[dict], args) -> dict:
    from sd_lora.generation import generation_threads

    t = time.perf_counter()
    for f in files:
        pipe.load_lora_weights(str(f), adapter_name=f.stem)
    print(f"  (diffusers: load_lora_weights x{len(files)} took {time.perf_counter() - t:.1f} s, not counted)")
    jobs: queue.Queue = queue.Queue()
    threads = generation_threads(pipe)  # the same CPU thread rule as ours, for a fair comparison
    state = {"switches": 0, "previous": None}

    def worker():
        if threads:
            torch.set_num_threads(threads)
        while (item := jobs.get()) is not None:
            body, done = item
            stack = tuple((x["name"], x["weight"]) for x in body["loras"])
            pipe.set_adapters([n for n, _ in stack], adapter_weights=[w for _, w in stack])
            state["switches"] += stack != state["previous"]
            state["previous"] = stack
            pipe(prompt=body["prompt"], num_inference_steps=body["steps"], width=body["width"], height=body["height"],
                 guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(body["seed"]))
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()

    def call(body):
        done = threading.Event()
        jobs.put((body, done))
        done.wait()

    try:
        wall, latency = clients(bodies, args.clients, call)
    finally:
        jobs.put(None)
        thread.join()
    return {"wall": wall, "latency": latency, "switches": state["switches"], "calls": len(bodies), "mean_batch": 1.0}


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--loras", type=int, default=20)
    parser.add_argument("--stacks", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait", type=float, default=5.0)
    parser.add_argument("--full-size", action="store_true", help="SD1.5 shapes, random weights (slow on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("grouped", "fifo", "diffusers"), action="append")
    args = parser.parse_args()

    import logging

    logging.getLogger("sd_lora").setLevel(logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    t = time.perf_counter()
    pipe = load(args.full_size)
    files = make_loras(pipe, folder, args.loras, args.full_size)
    bodies = workload(args.seed, args.requests, [f.stem for f in files], args.stacks, args.steps, args.size)
    distinct = len({tuple((x["name"], x["weight"]) for x in b["loras"]) for b in bodies})
    print(f"base: {'full-size SD1.5 (random weights)' if args.full_size else 'datasets/tiny-base'}, built in "
          f"{time.perf_counter() - t:.1f} s; {len(files)} LoRAs; {args.requests} requests over {distinct} distinct "
          f"3-LoRA stacks (Zipf), {args.clients} clients, {args.steps} steps at {args.size} px, "
          f"max_batch {args.max_batch}, max_wait {args.max_wait:g} s; torch threads {torch.get_num_threads()}")

    # warm-up: an image and a few stacks on each pipeline (first-call allocations, file reads: no side's cost)
    import sd_lora

    sd_lora.generate(pipe, "warm-up", steps=1, width=args.size, height=args.size)
    run_ours(pipe, folder, workload(args.seed + 1, 8, [f.stem for f in files], args.stacks, 1, args.size), "fifo", args)
    results = {}
    for side in args.only or ("grouped", "fifo", "diffusers"):
        if side == "diffusers":
            del pipe
            pipe = load(args.full_size)  # a clean copy: diffusers' adapters wrap the layers
            pipe(prompt="warm-up", num_inference_steps=1, width=args.size, height=args.size)
            results[side] = run_diffusers(pipe, files, bodies, args)
        else:
            results[side] = run_ours(pipe, folder, bodies, side, args)
        r = results[side]
        print(f"{side:>9}: {len(bodies) / r['wall']:6.2f} req/s   p50 {p(r['latency'], 50):6.3f} s   p95 "
              f"{p(r['latency'], 95):6.3f} s   switches/request {r['switches'] / len(bodies):.3f}   pipeline calls "
              f"{r['calls']} (mean {r['mean_batch']:.2f} requests each)   wall {r['wall']:.1f} s", flush=True)
    if "grouped" in results and "diffusers" in results:
        g, d = results["grouped"], results["diffusers"]
        print(f"grouped / diffusers throughput: {d['wall'] / g['wall']:.2f}x")
    if "grouped" in results and "fifo" in results:
        g, f = results["grouped"], results["fifo"]
        print(f"grouped / fifo throughput: {f['wall'] / g['wall']:.2f}x; p95 grouped - fifo: "
              f"{p(g['latency'], 95) - p(f['latency'], 95):+.3f} s (documented bound: max_wait {args.max_wait:g} s + one batch)")


if __name__ == "__main__":
    main()
