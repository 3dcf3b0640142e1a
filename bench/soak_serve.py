"""Soak of `sd-lora serve`: many random requests, bad ones among them, through the HTTP app; checks that
memory stays bounded and the base comes back bit for bit.

    PYTHONPATH=. .venv/bin/python bench/soak_serve.py [--requests 1000] [--loras 10] [--clients 4] [--rss-bound-mb 64]

datasets/tiny-base, 1 step at 64 px. Each request (seeded) is, with these odds:
  70 %  good: a random stack of 0-3 of the LoRAs (JSON list or <lora:...> tags), random weights, n 1-2
  30 %  bad: malformed JSON, unknown LoRA, LoRA for another architecture, size/steps/weight/n out of
        range, unknown field, oversized body, no token
RSS is measured after a warm-up of 100 requests and at the end; the run fails when it grew by more
than --rss-bound-mb (default 64 MB: the LoRA cache and the fused stack's backups are allocated in the
warm-up; what remains is allocator noise), when a good request did not get 200 or a bad one not its
4xx, or when the base (after remove_loras) differs from its first bits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_BASE = Path(__file__).resolve().parents[1] / "datasets" / "tiny-base"
TOKEN = "soak"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def make_request(rng: random.Random, names: list[str]) -> tuple[dict, bytes | None, int]:
    """(headers, body, expected status)"""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": rng.choice(["a red circle", "a blue square", "two green stars"]), "seed": rng.randrange(10**6),
            "steps": 1, "width": 64, "height": 64}
    if rng.random() < 0.7:
        stack = rng.sample(names, rng.randint(0, 3))
        if rng.random() < 0.5:
            body["loras"] = [{"name": n, "weight": round(rng.uniform(-1, 1.5), 2)} for n in stack]
        else:
            body["prompt"] += " " + " ".join(f"<lora:{n}:{rng.uniform(0, 1):.2f}>" for n in stack)
        body["n"] = rng.choice([1, 1, 1, 2])
        return auth, json.dumps(body).encode(), 200
    kind = rng.randrange(10)
    if kind == 0:
        return auth, b'{"prompt": "a cat", "seed": ', 400
    if kind == 1:
        body["loras"] = [{"name": "nosuch" + str(rng.randrange(99))}]
        return auth, json.dumps(body).encode(), 404
    if kind == 2:
        body["loras"] = [{"name": "xl_style"}]
        return auth, json.dumps(body).encode(), 422
    if kind == 3:
        body["width"] = rng.choice([63, 100, 4096])
        return auth, json.dumps(body).encode(), 422
    if kind == 4:
        body["steps"] = rng.choice([0, 1001, -3])
        return auth, json.dumps(body).encode(), 422
    if kind == 5:
        body["loras"] = [{"name": names[0], "weight": 1e6}]
        return auth, json.dumps(body).encode(), 422
    if kind == 6:
        body["n"] = 1000
        return auth, json.dumps(body).encode(), 422
    if kind == 7:
        body["cfg"] = 7
        return auth, json.dumps(body).encode(), 422
    if kind == 8:
        return auth, json.dumps({**body, "prompt": "x" * 100_000}).encode(), 413
    return {}, json.dumps(body).encode(), 401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--loras", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rss-bound-mb", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import logging

    import torch
    from fastapi.testclient import TestClient

    import sd_lora
    from sd_lora.serve import build_app
    from sd_lora.testing import write_random_lora

    logging.getLogger("sd_lora").setLevel(logging.ERROR)
    pipe = sd_lora.load_base(TINY_BASE)
    pipe.set_progress_bar_config(disable=True)
    base = {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    folder = Path(tempfile.mkdtemp(prefix="soak_serve_"))
    names = [write_random_lora(folder / f"s{i}.safetensors", pipe, seed=i).stem for i in range(args.loras)]
    write_random_lora(folder / "xl_style.safetensors", pipe, seed=99,
                      metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    app = build_app(pipe, folder, token=TOKEN, max_queue=4 * args.clients)
    rng = random.Random(args.seed)
    todo = [make_request(rng, names) for _ in range(args.requests)]
    wrong: list[str] = []
    done = [0]
    lock = threading.Lock()
    marks: dict[str, float] = {}

    with TestClient(app) as client:
        def worker(items):
            for headers, body, expected in items:
                r = client.post("/v1/generate", headers=headers, content=body)
                with lock:
                    done[0] += 1
                    if done[0] == args.warmup:
                        marks["rss_after_warmup"] = rss_mb()
                    if r.status_code != expected:
                        wrong.append(f"expected {expected}, got {r.status_code}: {r.text[:200]}")

        t = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(todo[i:: args.clients],)) for i in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    rss_end = rss_mb()
    sd_lora.remove_loras(pipe)
    now = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    exact = all(torch.equal(now[k], v) for k, v in base.items())
    by_status = {int(s): int(float(n)) for s, n in __import__("re").findall(r'sdlora_requests_total\{status="(\d+)"\} (\S+)', metrics)}
    grown = rss_end - marks["rss_after_warmup"]
    print(f"{args.requests} requests ({args.clients} clients) in {wall:.0f} s; by status {dict(sorted(by_status.items()))}")
    print(f"switches {app.state.scheduler.switches}, pipeline calls {len(app.state.scheduler.batches)}")
    print(f"RSS after {args.warmup} requests {marks['rss_after_warmup']:.0f} MB, at the end {rss_end:.0f} MB: "
          f"{grown:+.1f} MB (bound {args.rss_bound_mb:g} MB)")
    print(f"base bit for bit after remove_loras: {exact}; wrong statuses: {len(wrong)}")
    for w in wrong[:5]:
        print("  ", w)
    if wrong or not exact or grown > args.rss_bound_mb:
        sys.exit(1)


if __name__ == "__main__":
    main()
