"""Weighted LoRA stacks vs diffusers on full-size SD1.5 (random weights, CPU). Prints ratios.

    PYTHONPATH=. .venv/bin/python bench/bench_stack.py [--files 20] [--switches 6] [--size 128] [--steps 2] [--malloc retain|default]

Setup: `sd_lora.testing.full_size_pipeline("sd1")` (fp32, random weights) and 20 kohya LoRA files,
r16 on attention (UNet to_q/k/v/out + CLIP q/k/v/out_proj), fp16, written with `save_lora`.
Measured, each side in the same process on the same pipeline (median of repeats):
  1. cold apply of a 3-LoRA stack from files not read before:
       ours  apply_loras(pipe, 3 files)  (fresh cache: reads, matches, backs up, fuses)
       diff  load_lora_weights x3 + set_adapters + fuse_lora
  2. switching between 3-LoRA stacks drawn from the 20 files, all used before:
       ours  apply_loras(pipe, next stack)
       diff  (all 20 loaded) unfuse_lora + set_adapters + fuse_lora
  3. one image (2 steps at 128 px by default) bare / with our fused stack / with diffusers'
     adapters active and not fused (the usual way to keep switching cheap in diffusers).
  4. 100 switches (--memory-switches): RSS growth and the file cache's bytes against its bound.
  5. (--loha N) switching between stacks of N LoHa files (r8 on attention), without and with the
     dense-delta cache (LoraCache(dense_bytes=...)); ours only.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def attention_layers(pipe) -> list[tuple[str, torch.Size]]:
    """(kohya module name, weight shape) of every UNet / text-encoder attention projection, once each."""
    from sd_lora.network.naming import kohya_module_name
    from sd_lora.testing import lora_target_layers

    return [(kohya_module_name(c, p, "sd1"), m.weight.shape) for c, p, m in lora_target_layers(pipe, "sd1")]


def make_files(pipe, directory: Path, n: int, rank: int = 16) -> list[Path]:
    from sd_lora.formats.kohya import save_lora

    layers = attention_layers(pipe)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for name, (out_f, in_f) in layers:
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
        paths.append(save_lora(directory / f"lora{i:02d}.safetensors", sd, metadata={"ss_network_dim": str(rank)}))
    return paths


def make_loha_files(pipe, directory: Path, n: int, rank: int = 8) -> list[Path]:
    from sd_lora.formats.kohya import save_lora

    layers = attention_layers(pipe)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for name, (out_f, in_f) in layers:
            for k in ("1", "2"):
                sd[f"{name}.hada_w{k}_a"] = torch.randn(out_f, rank, generator=g) * 0.05
                sd[f"{name}.hada_w{k}_b"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
        paths.append(save_lora(directory / f"loha{i:02d}.safetensors", sd, metadata={"ss_network_dim": str(rank)}))
    return paths


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is what the work costs even when other
    processes share the cores; wall time is what a user waits on an otherwise idle machine."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def med(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def report(what: str, ours: list, theirs: list) -> None:
    (ow, oc), (dw, dc) = med(ours), med(theirs)
    print(f"{what}: ours {ow:.3f} s wall / {oc:.3f} s CPU   diffusers {dw:.3f} s wall / {dc:.3f} s CPU   "
          f"ratio {dw / ow:.1f}x wall, {dc / oc:.1f}x CPU")


def image(pipe, size, steps) -> float:
    return timed(lambda: pipe(prompt="a photo", num_inference_steps=steps, width=size, height=size,
                              generator=torch.Generator().manual_seed(0), output_type="np"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--switches", type=int, default=6, help="timed switches per side")
    ap.add_argument("--cold", type=int, default=3, help="cold applies per side (3 new files each)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--images", type=int, default=3, help="timed images per configuration")
    ap.add_argument("--memory-switches", type=int, default=100, help="switches in the RSS / cache-bound part")
    ap.add_argument("--loha", type=int, default=0, help="also time LoHa stack switches with/without the dense-delta cache (N files)")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="retain: glibc keeps freed memory (steady-state timings, see bench/malloc.py); default: as is")
    args = ap.parse_args()
    if args.malloc == "retain":
        from malloc import retain_freed_memory

        print(f"glibc keeps freed memory (bench/malloc.py): {retain_freed_memory()}")

    import logging
    import warnings

    import diffusers
    import transformers

    from sd_lora.stack import LoraCache, apply_loras, remove_loras

    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from sd_lora.testing import full_size_pipeline

    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    t = time.perf_counter()
    pipe = full_size_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    print(f"built full-size SD1.5 pipeline (random weights) in {time.perf_counter() - t:.1f} s")
    tmp = Path(tempfile.mkdtemp(prefix="bench_stack_"))
    files = make_files(pipe, tmp, max(args.files, 3 * args.cold))
    print(f"{len(files)} LoRA files, {files[0].stat().st_size / 1e6:.1f} MB each (r16 attention, UNet + TE, fp16)")
    base_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    rng = random.Random(0)
    weights = (0.8, 0.5, 0.3)

    # 1. Cold apply ------------------------------------------------------------------------------
    ours_cold = []
    for i in range(args.cold):
        stack = list(zip(files[3 * i: 3 * i + 3], weights))
        ours_cold.append(timed(lambda: apply_loras(pipe, stack, cache=LoraCache())))
        remove_loras(pipe)
    diff_cold = []
    for i in range(args.cold):
        names = [f"c{i}_{j}" for j in range(3)]

        def diffusers_cold():
            for name, f in zip(names, files[3 * i: 3 * i + 3]):
                pipe.load_lora_weights(str(f), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=list(weights))
            pipe.fuse_lora(adapter_names=names)

        diff_cold.append(timed(diffusers_cold))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    drift = (pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight - base_q).abs().max().item()
    print(f"diffusers unfuse_lora + unload: max |W - W_base| left on a touched weight: {drift:.2e} (ours: exactly 0)")
    base_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    report("cold apply, 3 new files", ours_cold, diff_cold)
    print(f"  (ours, first apply in this process, which maps its backup memory: {ours_cold[0][0]:.3f} s wall; "
          f"later applies back up into the memory remove_loras kept)")

    # 2. Switching -------------------------------------------------------------------------------
    pool = files[: args.files]
    stacks = [rng.sample(range(len(pool)), 3) for _ in range(args.switches + 1)]
    cache = LoraCache()
    for f in pool:  # "used before": every file read once into the cache
        apply_loras(pipe, [(f, 1.0)], cache=cache)
    apply_loras(pipe, [(pool[j], w) for j, w in zip(stacks[0], weights)], cache=cache)
    ours_sw = [timed(lambda s=s: apply_loras(pipe, [(pool[j], w) for j, w in zip(s, weights)], cache=cache)) for s in stacks[1:]]
    fused_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    remove_loras(pipe)

    t = time.perf_counter()
    for i, f in enumerate(pool):
        pipe.load_lora_weights(str(f), adapter_name=f"a{i}")
    print(f"(diffusers: loading {len(pool)} adapters took {time.perf_counter() - t:.1f} s, not counted)")
    first = [f"a{j}" for j in stacks[0]]
    pipe.set_adapters(first, adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=first)
    diff_sw = []
    for s in stacks[1:]:
        names = [f"a{j}" for j in s]

        def diffusers_switch():
            pipe.unfuse_lora()
            pipe.set_adapters(names, adapter_weights=list(weights))
            pipe.fuse_lora(adapter_names=names)

        diff_sw.append(timed(diffusers_switch))
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    diff_q = q.base_layer.weight if hasattr(q, "base_layer") else q.weight
    print(f"max |ours - diffusers| on a fused weight after the same switch: {(fused_q - diff_q).abs().max().item():.2e}")
    report(f"switch between 3-LoRA stacks (pool of {len(pool)})", ours_sw, diff_sw)

    # 3. Per-image time -------------------------------------------------------------------------
    pipe.unfuse_lora()
    pipe.set_adapters(first, adapter_weights=list(weights))  # active, not fused
    image(pipe, args.size, args.steps)  # warm-up
    # diffusers with its 3 adapters active (not fused), then bare and ours in alternating rounds on
    # the clean pipeline; the round with the least CPU time of each is reported.
    times = {"bare": [], "ours": [], "diffusers": []}
    for _ in range(args.images):
        times["diffusers"].append(image(pipe, args.size, args.steps))
    pipe.unload_lora_weights()
    gc.collect()
    fused = [(pool[j], w) for j, w in zip(stacks[0], weights)]
    for _ in range(args.images):
        times["bare"].append(image(pipe, args.size, args.steps))
        apply_loras(pipe, fused, cache=cache)
        times["ours"].append(image(pipe, args.size, args.steps))
        remove_loras(pipe)
    best = {k: min(v, key=lambda s: s[1]) for k, v in times.items()}
    b = best["bare"][1]
    print(f"one image ({args.steps} steps, {args.size} px), CPU s: bare {b:.2f}   ours fused {best['ours'][1]:.2f} "
          f"({100 * (best['ours'][1] / b - 1):+.1f} %)   diffusers unfused {best['diffusers'][1]:.2f} "
          f"({100 * (best['diffusers'][1] / b - 1):+.1f} %)   [wall: {best['bare'][0]:.2f} / {best['ours'][0]:.2f} / {best['diffusers'][0]:.2f}]")

    # 4. 100 switches: memory --------------------------------------------------------------------
    # (diffusers' unfuse_lora above left rounding residue in the weights: take the base from here on)
    base_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    cache = LoraCache(max_bytes=128 * 1024 * 1024)  # holds ~14 of the 20 files: evicts as it goes
    for s in stacks[:5]:
        apply_loras(pipe, [(pool[j], w) for j, w in zip(s, weights)], cache=cache)
    gc.collect()
    before = rss()
    t = time.perf_counter()
    peak = before
    for _ in range(args.memory_switches):
        s = rng.sample(range(len(pool)), 3)
        apply_loras(pipe, [(pool[j], w) for j, w in zip(s, weights)], cache=cache)
        assert cache.num_bytes <= cache.max_bytes
        peak = max(peak, rss())
    took = time.perf_counter() - t
    gc.collect()
    growth = rss() - before
    remove_loras(pipe)
    assert torch.equal(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, base_q)
    print(f"{args.memory_switches} switches in {took:.1f} s: RSS growth {growth / 1e6:+.1f} MB (peak {(peak - before) / 1e6:+.1f} MB); cache {cache.num_bytes / 1e6:.0f} MB "
          f"of {cache.max_bytes / 1e6:.0f} MB bound ({cache.hits} hits, {cache.misses} misses); base restored bitwise")

    # 5. LoHa switching: the dense-delta cache ---------------------------------------------------
    if args.loha:
        lohas = make_loha_files(pipe, tmp, args.loha)
        pairs = [[(lohas[j], w) for j, w in zip(rng.sample(range(len(lohas)), 2), (0.8, 0.5))] for _ in range(args.switches)]
        results = {}
        for label, dense_bytes in (("factors only", 0), ("dense cache", 4 << 30)):
            cache = LoraCache(dense_bytes=dense_bytes)
            for f in lohas:  # every file used once before (read, and densified when allowed)
                apply_loras(pipe, [(f, 1.0)], cache=cache)
            results[label] = [timed(lambda s=s: apply_loras(pipe, s, cache=cache)) for s in pairs]
            remove_loras(pipe)
            extra = f", dense cache {cache.dense_num_bytes / 1e6:.0f} MB" if dense_bytes else ""
            print(f"LoHa switch ({len(lohas)} files, r8 attention, 2 per stack), {label}: "
                  f"{med(results[label])[0]:.3f} s wall / {med(results[label])[1]:.3f} s CPU{extra}")
        print(f"  dense-delta cache speed-up: {med(results['factors only'])[0] / med(results['dense cache'])[0]:.1f}x wall")


if __name__ == "__main__":
    main()
