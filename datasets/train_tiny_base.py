"""Train a tiny Stable Diffusion 1.x-style text-to-image model on the "shapes" content set, from scratch.

    python datasets/train_tiny_base.py --out datasets/tiny-base

The result is an ordinary diffusers StableDiffusionPipeline folder (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, CLIPTokenizer, DDIMScheduler) that draws "a small red circle on a blue background" at
64x64 px in about a second on a CPU. It is the base model that the LoRA tests and demos train on: small
enough to ship in the repository, but a real model, so a style LoRA has something to change.

Three stages, each a plain loop:
  1. VAE: AutoencoderKL (64x64x3 <-> 16x16x4) trained as an autoencoder (MSE + a small KL term) on the
     content images and on freshly drawn striped / outlined / pastel images, so that the decoder can
     show the styles a LoRA will later teach the UNet.
  2. Text encoder: a small CLIPTextModel with random weights, frozen. Every caption word is its own
     token (sd_lora.testing's tiny tokenizer), and random features of distinct tokens at distinct
     positions are enough for the UNet to tell "red circle on blue" from "blue circle on red".
  3. UNet: UNet2DConditionModel trained with SD's epsilon objective and noise schedule on the cached
     latents of the content set (plus mirror images), with 10 % empty captions for classifier-free
     guidance and an EMA of the weights, which is what gets saved.

The shipped model took two invocations (see datasets/README.md): the second continues the first's
UNet with --vae-from / --unet-from, so training can be extended without starting over.

Only the content set is used for the UNet: the base model has never been asked to draw a striped,
outlined or pastel image, which is the point of the style sets.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sd_lora.examples.shapes import STYLES, _seeded_rng, content_scenes, render, sampled_scenes

# -- model configs ----------------------------------------------------------------------------------
# SD 1.x block types at a much smaller width. The VAE downsamples 4x (SD: 8x) because 64 px images
# would otherwise leave an 8x8 latent, too coarse for a small UNet to place shapes precisely.

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=64,
    hidden_act="quick_gelu",
)
# SD 1.x's noise schedule, so the base behaves like the real thing under LoRA training code.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# -- data -------------------------------------------------------------------------------------------

def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in -1..1, the range SD's VAE works in."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def content_data(seed: int):
    """The "shapes" content set exactly as make_datasets writes it: (images, captions, scenes)."""
    scenes = content_scenes(_seeded_rng(seed, "shapes"))
    return to_tensor([render(s) for s in scenes]), [s.caption() for s in scenes], scenes


def vae_extra_images(seed: int, per_style: int = 300) -> torch.Tensor:
    """Freshly drawn (not the style sets' own) striped, outlined and pastel images for the VAE."""
    rng = _seeded_rng(seed, "vae")
    scenes = [s for style, spec in STYLES.items() for s in sampled_scenes(rng, per_style, spec["colours"], style)]
    return to_tensor([render(s) for s in scenes])


def caption_variants(caption: str) -> list[str]:
    """The caption and the caption without its size word, so prompts may leave the size out."""
    short = caption.replace(" small ", " ").replace(" large ", " ")
    return [caption, short] if short != caption else [caption]


# -- stage 1: VAE -----------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, log):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, so kl_weight does not depend on image size
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} mse {mse.item():.4f} kl {kl.item():.3f}")
    return vae.eval()


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (the cache the UNet trains on)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# -- stage 2: text encoder --------------------------------------------------------------------------

def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = len(tokenizer)
    config = CLIPTextConfig(
        **TEXT_CONFIG,
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def embed(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Last hidden states (N, 77, hidden), as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# -- stage 3: UNet ----------------------------------------------------------------------------------

def train_unet(latent_mean, latent_std, caption_ids, embeddings, steps, batch_size, lr, ema_decay, cfg_drop, min_snr_gamma, seed, log, checkpoint=None, checkpoint_every=0, init_from=None, noise_offset=0.0):
    """Epsilon-prediction training on cached latents.

    caption_ids[i] is a list of rows of `embeddings` that may caption latent i (with and without the
    size word); row 0 of `embeddings` is the empty prompt, used with probability `cfg_drop`.
    `checkpoint(ema_unet, step)` is called every `checkpoint_every` steps, to look at samples early.
    `init_from` (a tiny-base folder) continues from its UNet instead of starting from random weights.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    if init_from:
        unet = UNet2DConditionModel.from_pretrained(init_from, subfolder="unet", dtype=torch.float32)
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-gamma loss weights (Hang et al. 2023): stop the easy low-noise steps from dominating.
    loss_weight = torch.clamp(snr, max=min_snr_gamma) / snr

    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(latent_mean), (batch_size,), generator=gen)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        rows = torch.tensor([caption_ids[i][int(torch.randint(len(caption_ids[i]), (1,), generator=gen))] for i in idx.tolist()])
        rows[torch.rand(batch_size, generator=gen) < cfg_drop] = 0
        cond = embeddings[rows]

        noise = torch.randn(latents.shape, generator=gen)
        if noise_offset:
            # Offset noise (a random constant per image and channel): with SD's schedule the last
            # timestep still leaks the latent's mean, which for these flat backgrounds *is* the
            # background colour, and a 16x16 latent's noise mean (std 1/16) is as large as that
            # leak. Trained without the offset, the model reads the colour from the noise and at
            # sampling paints whatever the random start implies; with it, it must follow the text.
            noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA warms up (decay grows from 0) so early steps do not anchor it to random weights.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            checkpoint(ema.eval(), step)
    return ema.eval()


# -- putting it together ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/tiny-base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--vae-from", help="a tiny-base folder whose VAE to reuse instead of training one")
    parser.add_argument("--unet-from", help="a tiny-base folder whose UNet to continue training (a second round)")
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--unet-batch-size", type=int, default=16)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--cfg-drop", type=float, default=0.1, help="share of empty captions (for guidance)")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--noise-offset", type=float, default=0.0, help="offset-noise strength (see train_unet)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save <out>-step<N> every N UNet steps")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float32", help="dtype of the saved weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine, 0: PyTorch's default")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sd_lora.testing import write_tiny_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)  # noqa: E731

    images, captions, _ = content_data(args.seed)
    log(f"content set: {len(images)} images, {len(set(captions))} distinct captions")

    # 1. VAE (or reuse one from an earlier run, to iterate on the UNet alone)
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", dtype=torch.float32).eval()
        log(f"vae loaded from {args.vae_from}")
    else:
        vae_images = torch.cat([images, vae_extra_images(args.seed)])
        vae = train_vae(vae_images, args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight, args.seed, log)
    # Mirror images are the same captions (all shapes are symmetric left-right): twice the data for free.
    content = torch.cat([images, images.flip(-1)])
    mean, std = encode(vae, content)
    with torch.no_grad():
        recon_mse = F.mse_loss(vae.decode(mean[: len(images)]).sample, images).item()
    # SD scales latents to unit variance before diffusion; the factor lives in the VAE config.
    noise = torch.randn(std.shape, generator=torch.Generator().manual_seed(args.seed))
    scaling_factor = float(1.0 / (mean + std * noise).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    out = Path(args.out)
    vae.save_pretrained(out / "vae")  # now, so that a UNet run can be redone with --vae-from
    log(f"vae done: reconstruction mse {recon_mse:.4f}, latent scaling factor {scaling_factor:.4f}")

    # 2. text encoder (frozen) and every caption's embedding, computed once
    tok_dir = write_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="tiny_base_tok_")))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text_encoder = build_text_encoder(tokenizer, args.seed)
    prompts = [""]
    row_of = {"": 0}
    caption_ids = []
    for caption in captions + captions:  # the mirrored copies share the captions
        ids = []
        for variant in caption_variants(caption):
            if variant not in row_of:
                row_of[variant] = len(prompts)
                prompts.append(variant)
            ids.append(row_of[variant])
        caption_ids.append(ids)
    embeddings = embed(text_encoder, tokenizer, prompts)
    log(f"text encoder: {len(prompts)} prompts embedded, shape {tuple(embeddings.shape[1:])}")

    def save(unet, path: Path) -> None:
        # A standard StableDiffusionPipeline folder, with DDIM at SD's settings for sampling.
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
        pipe = StableDiffusionPipeline(
            vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder), tokenizer=tokenizer, unet=copy.deepcopy(unet),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.to(dtype=getattr(torch, args.dtype))
        pipe.save_pretrained(path, safe_serialization=True)

    # 3. UNet
    unet = train_unet(
        mean * scaling_factor, std * scaling_factor, caption_ids, embeddings,
        args.unet_steps, args.unet_batch_size, args.unet_lr, args.ema_decay, args.cfg_drop, args.min_snr_gamma,
        args.seed, log,
        checkpoint=lambda ema, step: save(ema, Path(f"{out}-step{step}")), checkpoint_every=args.checkpoint_every,
        init_from=args.unet_from, noise_offset=args.noise_offset,
    )
    save(unet, out)
    elapsed = time.time() - start
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "training.json").write_text(
        json.dumps(
            {
                "command": "python datasets/train_tiny_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": settings,
                "wall_time_s": round(elapsed),
                "vae_reconstruction_mse": round(recon_mse, 5),
                "latent_scaling_factor": scaling_factor,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n"
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 1e6:.1f} MB) in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
