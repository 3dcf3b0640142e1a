"""Training step time and peak RSS: sd-lora's trainer against a plain diffusers + PEFT loop.

    .venv/bin/python bench/bench_train.py [--steps 5] [--resolution 256] [--rank 16] [--mixed-precision no|bf16] [--base-precision fp8]

Both sides train a LoRA (rank 16 on UNet attention + text-encoder attention, AdamW, fp32, batch 1)
on a full-size SD1.5 with random weights (sd_lora.testing.full_size_pipeline("sd1"), saved once to a
temporary folder so both load it from disk), on the same 256 px images, each in its own subprocess
so peak RSS is measured per side. The baseline is the loop of diffusers'
examples/dreambooth/train_dreambooth_lora.py: VAE-encode and text-encode every step, PEFT adapters
added with `add_adapter`. Step time is the mean over steps 2..N (step 1 warms up allocators).
Prints one JSON line per side and the ratios (goal: time <= 0.7x, peak RSS <= 0.8x).

--mixed-precision bf16 runs both sides as diffusers' script does with `--mixed_precision bf16`:
frozen weights (UNet, text encoder, VAE) in bf16, LoRA parameters in fp32, forward under bf16
autocast. --base-precision (sd-lora only) also stores the frozen weights in fp8 (a different
setting than the baseline's: reported as such).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CAPTION = "a photo of sks dog"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def prepare(root: Path, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    from sd_lora.testing import full_size_pipeline

    if not (root / "model" / "model_index.json").is_file():
        full_size_pipeline("sd1").save_pretrained(root / "model")
    folder = root / "data" / "1_sks dog"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION)


def run_ours(root: Path, steps: int, resolution: int, rank: int, gradient_checkpointing: bool = False,
             mixed_precision: str = "no", base_precision: str | None = None) -> dict:
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.training import train

    times = []
    cfg = TrainConfig(
        model=str(root / "model"), output=str(root / "out" / "ours.safetensors"),
        data=DataConfig(path=str(root / "data"), resolution=resolution, cache_latents="ram"),
        network={"rank": rank, "alpha": rank, "preset": "attention", "train_text_encoder": True},
        steps=steps, batch_size=1, lr=1e-4, optimizer="adamw", seed=0, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, base_precision=base_precision,
    )
    train(cfg, on_event=lambda e: times.append(time.perf_counter()) if e["event"] == "step" else None)
    return {"times": times[-steps:]}


def run_diffusers(root: Path, steps: int, resolution: int, rank: int, mixed_precision: str = "no") -> dict:
    """The training loop of diffusers' train_dreambooth_lora.py (no prior preservation), in a few lines."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    model = str(root / "model")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
    # As the script: frozen weights in the mixed-precision dtype, then adapters, cast back to fp32.
    weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    for m in (vae, text_encoder, unet):
        m.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # diffusers' cast_training_params
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    files = sorted((root / "data" / "1_sks dog").glob("*.png"))
    images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for f in files]
    input_ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    times = []
    for step in range(steps):
        pixel_values = images[step % len(images)][None].to(weight_dtype)
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,)).long()
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        with autocast:
            encoder_hidden_states = text_encoder(input_ids)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
    return {"times": times}


def child(args) -> None:
    root = Path(args.root)
    t0 = time.perf_counter()
    if args.side == "ours":
        res = run_ours(root, args.steps, args.resolution, args.rank, args.gradient_checkpointing, args.mixed_precision, args.base_precision)
    else:
        res = run_diffusers(root, args.steps, args.resolution, args.rank, args.mixed_precision)
    t = res["times"]
    per_step = (t[-1] - t[0]) / (len(t) - 1)
    print("RESULT " + json.dumps({"side": args.side, "s_per_step": round(per_step, 3), "peak_rss_gib": round(peak_rss_gib(), 2),
                                  "total_s": round(time.perf_counter() - t0, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "sd_lora_bench_train"))
    ap.add_argument("--gradient-checkpointing", action="store_true", help="sd-lora side only: trade time for memory")
    ap.add_argument("--only-ours", action="store_true", help="skip the diffusers baseline (for comparing sd-lora settings)")
    ap.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="both sides (as diffusers' --mixed_precision)")
    ap.add_argument("--base-precision", choices=("fp8",), help="sd-lora side only: frozen weights stored in fp8")
    ap.add_argument("--side", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        child(args)
        return
    root = Path(args.root)
    prepare(root, args.resolution)
    results = {}
    for side in ("ours",) if args.only_ours else ("diffusers", "ours"):
        cmd = [sys.executable, __file__, "--side", side, "--root", str(root), "--steps", str(args.steps),
               "--resolution", str(args.resolution), "--rank", str(args.rank)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        cmd += ["--mixed-precision", args.mixed_precision] + (["--base-precision", args.base_precision] if args.base_precision else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        results[side] = json.loads(line[len("RESULT "):])
        print(json.dumps(results[side]), flush=True)
    if args.only_ours:
        return
    d, o = results["diffusers"], results["ours"]
    print(json.dumps({
        "time_ratio": round(o["s_per_step"] / d["s_per_step"], 3), "goal_time_ratio": 0.7,
        "rss_ratio": round(o["peak_rss_gib"] / d["peak_rss_gib"], 3), "goal_rss_ratio": 0.8,
        "settings": f"full-size SD1.5 (random weights), {args.resolution} px, batch 1, rank {args.rank}, UNet + TE attention, "
                    f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}"
                    f"{f' (sd-lora base {args.base_precision})' if args.base_precision else ''}, AdamW, {args.steps} steps",
    }))


if __name__ == "__main__":
    main()
