"""How well each optimizer learns the demo's stripe style on the shipped tiny base, in the same steps.

    .venv/bin/python bench/compare_optimizers_style.py [--steps 300] [--optimizers adamw prodigy] [--seed 0] [--out out/compare]
        [--variant "prodigy use_bias_correction=True safeguard_warmup=True"]   (an optimizer with optimizer_args)
        [--variant "prodigy d0=1e-5 lr_scheduler=cosine"]   (words naming a TrainConfig key set that key instead)

Every run is the demo's stripe training (sd_lora/demo.py train_style_loras: tiny base, 64 px, batch
4, rank 8 on the kohya preset, seed 0 unless --seed, UNet only) with only the optimizer and its rate changed:
AdamW at the demo's tuned lr 1e-3; the adaptive ones (Prodigy, D-Adaptation) with lr unset, i.e.
their default 1.0 (sd_lora/optimizers.py); the others at the rate given in RATES below. Each LoRA
then renders the demo's six prompts with the trigger word at weight 1 (12 steps, guidance 7.5, seed
0, as the demo's grid), and the
demo's style measure (sd_lora.examples.measures.stripe_energy) is averaged over them; the base
model's images give the floor. Prints one JSON line per optimizer and each one's share of AdamW's gain
over the base (the issue's goal for Prodigy: >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# lr per optimizer: adamw is the demo's, the other non-adaptive ones get the same; the adaptive ones
# (prodigy, dadapt_adam) run with lr unset, i.e. their default from sd_lora/optimizers.py (1.0)
RATES = {"adamw": 1e-3, "adamw_schedulefree": 1e-3, "came": 1e-3, "adamw8bit": 1e-3}


def rate(name: str) -> float | None:
    from sd_lora.optimizers import spec

    return None if spec(name).adaptive else RATES.get(name, 1e-3)


def split_words(words: list[str]) -> tuple[list[str], dict]:
    """A variant's KEY=VALUE words: those naming a TrainConfig key (lr_scheduler, lr_warmup_steps, ...) set
    it; the rest are optimizer_args."""
    from dataclasses import fields

    from sd_lora.config import TrainConfig
    from sd_lora.optimizers import parse_value

    keys = {f.name for f in fields(TrainConfig)}
    opt_args, overrides = [], {}
    for word in words:
        key, _, value = word.partition("=")
        if key in keys:
            overrides[key] = parse_value(value)
        else:
            opt_args.append(word)
    return opt_args, overrides


def train_stripes(out: Path, data: Path, optimizer: str, lr: float | None, steps: int, args: list[str] | None = None,
                  tag: str = "", overrides: dict | None = None, seed: int = 0) -> Path:
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.demo import DEFAULT_BASE
    from sd_lora.training.loop import train

    # the demo's stripe config (sd_lora/demo.py train_style_loras), optimizer and lr aside
    return train(TrainConfig(
        model=str(DEFAULT_BASE), output=str(out / f"stripes-{optimizer}{tag}-seed{seed}.safetensors"), optimizer_args=args or None,
        data=DataConfig(path=str(data), resolution=64, cache_latents="ram"), steps=steps, batch_size=4, lr=lr,
        optimizer=optimizer, seed=seed, cpu_threads=1, log_every=50,
        network={"preset": "kohya", "rank": 8, "alpha": 8, "train_text_encoder": False}, **(overrides or {}),
    ))


def stripe_score(pipe, lora: Path | None) -> float:
    from sd_lora.demo import PROMPTS, STYLES
    from sd_lora.examples.measures import stripe_energy
    from sd_lora.generation import generate

    trigger = STYLES["stripes"][0]
    scores = []
    for prompt in PROMPTS:
        stack = [(lora, 1.0)] if lora else []
        image = generate(pipe, f"{prompt}, {trigger}", stack, steps=12, width=64, height=64, seed=0, guidance=7.5,
                         keep_loras=False).images[0].image
        scores.append(stripe_energy(image))
    return sum(scores) / len(scores)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="the demo's steps (sd-lora demo --steps default)")
    ap.add_argument("--optimizers", nargs="*", default=["adamw", "prodigy"])
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                    help="also train optimizer NAME with these optimizer_args (repeatable)")
    ap.add_argument("--baseline", type=float, help="AdamW's stripe energy from an earlier run (skips training adamw again)")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (data order, noise, timesteps, LoRA init); the dataset and the scoring stay fixed")
    ap.add_argument("--out", default="out/compare_optimizers")
    args = ap.parse_args()

    import torch

    from sd_lora.demo import DEFAULT_BASE
    from sd_lora.examples.shapes import make_datasets
    from sd_lora.models import load_base
    from sd_lora.optimizers import default_lr
    from sd_lora.tools.svd import single_thread

    out = Path(args.out)
    data = make_datasets(out / "data", seed=0)["stripes"]
    torch.set_num_threads(1)
    pipe = load_base(DEFAULT_BASE)
    pipe.set_progress_bar_config(disable=True)
    with single_thread():
        base = stripe_score(pipe, None)
    print(json.dumps({"optimizer": "base (no LoRA)", "stripe_energy": round(base, 4)}), flush=True)
    results = {"adamw": args.baseline} if args.baseline is not None else {}
    runs = [(name, []) for name in args.optimizers] + [(v.split()[0], v.split()[1:]) for v in args.variant]
    for i, (name, words) in enumerate(runs):
        t0 = time.perf_counter()
        label = name + (f" ({' '.join(words)})" if words else "")
        opt_args, overrides = split_words(words)
        lora = train_stripes(out, data, name, rate(name), args.steps, opt_args, f"-{i}" if words else "", overrides,
                             seed=args.seed)
        seconds = time.perf_counter() - t0
        with single_thread():
            score = stripe_score(pipe, lora)
        results[label] = score
        print(json.dumps({"optimizer": label, "lr": rate(name) or default_lr(name), "steps": args.steps, "seed": args.seed, "stripe_energy": round(score, 4),
                          "train_s": round(seconds, 1)}), flush=True)
    if "adamw" in results:
        gain = results["adamw"] - base
        for name, score in results.items():
            share = (score - base) / gain if gain > 0 else float("nan")
            print(f"{name}: stripe energy {score:.4f} (base {base:.4f}); gain over the base = {share:.2f}x AdamW's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
