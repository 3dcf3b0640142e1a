"""The diffusion training loss: noise, timesteps, target (epsilon or v), per-sample weights.

    noise  = N(0, 1)  [+ offset * N(0, 1) per channel]  [-> pyramid (multires) noise]
    t      ~ U{min_timestep, ..., max_timestep - 1}
    noisy  = sqrt(a_t) * x0 + sqrt(1 - a_t) * (noise [+ ip_noise_gamma * N(0, 1)])   (scheduler.add_noise)
    target = noise                                  (epsilon models: SD1, SD2-base, SDXL)
           = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (v-prediction models: SD2 768-v)
    loss   = mean over pixels of l(pred - target)   (l2, l1, pseudo-Huber or smooth-L1 with threshold c_t)
             [x the mask at latent size, per pixel: masked loss; the mean stays over all pixels]
             x prior_loss_weight (regularization images) x min-SNR weight x debiased-estimation weight,
             averaged over the batch.

The options and their formulas are kohya sd-scripts' (commit 48d368fa557731ad0488c07304dfeba8c07910eb):
library/train_util.py get_noise_noisy_latents_and_timesteps (L6071-6107), get_timesteps (L6062-6068),
get_huber_threshold_if_needed (L6110-6130), conditional_loss (L6133-6166); library/custom_train_functions.py
apply_snr_weight (L68-76), apply_debiased_estimation (L101-109), pyramid_noise_like (L458-467),
apply_noise_offset (L471-484); the order of the weights is train_network.py's process_batch (L467-480)
and post_process_loss (L330-339). get_huber_threshold_if_needed replaced get_timesteps_and_huber_c in
kohya's 420a180d (2024-11), adding huber_scale; with huber_scale = 1 both give the same thresholds.
docs/training.md ("Loss options") says when to use which.

Every random draw comes from the `generator` passed in (the trainer reseeds it per step, so a
resumed run draws what the uninterrupted one drew), in kohya's order: noise, noise-offset strength,
offset, pyramid levels, timesteps, input-perturbation strength, input perturbation. `cfg` is the
TrainConfig (any object with its loss-option attributes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import HUBER_SCHEDULES, LOSS_TYPES


def noise_scheduler_for_training(scheduler_config, zero_terminal_snr: bool = False):
    """The DDPM forward process of a base model's scheduler config. zero_terminal_snr: betas rescaled
    so the last timestep is pure noise (alphas_cumprod[-1] = 0); off, the base's own config decides
    (a zero-SNR fine-tune may already say so)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config, **({"rescale_betas_zero_snr": True} if zero_terminal_snr else {}))


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU from the seeded generator (same numbers on every device), then moved.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _rand1(generator: torch.Generator) -> float:
    return torch.rand((1,), generator=generator).item()


def noise_offset_strength(latents: torch.Tensor, noise_offset: float, adaptive_noise_scale: float | None) -> torch.Tensor | float:
    """Offset noise's scale: noise_offset, plus adaptive_noise_scale x |mean of each latent channel|
    when set (per image and channel, floored at 0), as kohya's apply_noise_offset."""
    if adaptive_noise_scale is None:
        return noise_offset
    mean = latents.mean(dim=(2, 3), keepdim=True).abs()
    return torch.clamp(noise_offset + adaptive_noise_scale * mean, min=0.0)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023; kohya's pyramid_noise_like): level i adds noise drawn at
    1/r^i of the size (r random in [2, 4)), upsampled bilinearly, weighted discount^i; the sum is
    rescaled to unit standard deviation. Stops after the 1-pixel level."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = _rand1(generator) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = F.interpolate(_randn((b, c, hn, wn), generator, noise), size=(h, w), mode="bilinear")
        noise = noise + level * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_noise(latents: torch.Tensor, generator: torch.Generator, cfg) -> torch.Tensor:
    """The noise a step adds (and, for epsilon models, the target): N(0, 1) with the offset and
    multires options of `cfg`."""
    noise = _randn(latents.shape, generator, latents)
    if cfg.noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
        offset = cfg.noise_offset * (_rand1(generator) if cfg.noise_offset_random_strength else 1.0)
        strength = noise_offset_strength(latents, offset, cfg.adaptive_noise_scale)
        noise = noise + strength * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    return noise


def timestep_range(num_train_timesteps: int, min_timestep: int | None = None, max_timestep: int | None = None) -> tuple[int, int]:
    """[low, high): the timesteps drawn (the whole schedule unless min_timestep / max_timestep say less)."""
    return (0 if min_timestep is None else min_timestep, num_train_timesteps if max_timestep is None else max_timestep)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device,
                     min_timestep: int | None = None, max_timestep: int | None = None) -> torch.Tensor:
    """One uniform timestep per image in [min_timestep, max_timestep); all max_timestep when they are equal (kohya)."""
    low, high = timestep_range(num_train_timesteps, min_timestep, max_timestep)
    if low < high:
        t = torch.randint(low, high, (batch,), generator=generator)
    else:
        t = torch.full((batch,), high, dtype=torch.long)
    return t.to(device)


def noisy_latents(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  generator: torch.Generator, cfg) -> torch.Tensor:
    """The UNet's input. ip_noise_gamma (input perturbation, Ning et al. 2023, arXiv:2301.11706): the
    input gets extra noise that the target does not contain (fixed, or x U(0, 1) with random strength)."""
    if cfg.ip_noise_gamma:
        strength = cfg.ip_noise_gamma * (_rand1(generator) if cfg.ip_noise_gamma_random_strength else 1.0)
        noise = noise + strength * _randn(latents.shape, generator, latents)
    return noise_scheduler.add_noise(latents, noise, timesteps)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}; expected epsilon or v_prediction")


def huber_threshold(timesteps: torch.Tensor, noise_scheduler, cfg) -> torch.Tensor | None:
    """The per-sample Huber threshold c_t of huber / smooth_l1 losses (None for l2 / l1):
        constant:     c_t = huber_c * huber_scale
        exponential:  c_t = huber_scale * exp(-a t), a = -ln(huber_c) / T   (huber_c at t = T, 1 at t = 0)
        snr:          c_t = (1 - huber_c) / (1 + sigma_t)^2 + huber_c,  sigma_t = sqrt((1 - a_t) / a_t)
    (huber_scale does not enter the snr schedule, as in kohya.)"""
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.cpu()
    if cfg.huber_schedule == "constant":
        c = torch.full(t.shape, cfg.huber_c * cfg.huber_scale)
    elif cfg.huber_schedule == "exponential":
        a = -math.log(cfg.huber_c) / noise_scheduler.config.num_train_timesteps
        c = torch.exp(-a * t) * cfg.huber_scale
    elif cfg.huber_schedule == "snr":
        alphas_cumprod = noise_scheduler.alphas_cumprod.cpu()[t]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        c = (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    else:
        raise ValueError(f"huber_schedule: {cfg.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")
    return c.float().to(timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """l2: d^2; l1: |d|; huber: 2c (sqrt(d^2 + c^2) - c); smooth_l1: 2 (sqrt(d^2 + c^2) - c)   (d = pred - target,
    c per sample). Pseudo-Huber is ~d^2 for |d| << c and ~2c|d| for |d| >> c: large errors (a corrupt
    image, a bad caption) pull less than with l2."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs the Huber threshold (huber_threshold())")
        c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    sample_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    *,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
    debiased_estimation: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's loss (a scalar): the per-pixel loss averaged per sample, then weighted per sample by
    sample_weights (prior_loss_weight), min-SNR (Hang et al. 2023: min(SNR, gamma) / SNR, or / (SNR + 1)
    for v) and debiased estimation (Yu et al. 2024, arXiv:2310.08442: 1 / sqrt(SNR), or 1 / (SNR + 1)
    for v, SNR capped at 1000), and averaged over the batch. mask (b, 1, h, w): per-pixel weights in [0, 1]
    (data/masks.py), multiplied in before the per-sample mean, which stays over all pixels (kohya's
    apply_masked_loss + mean: a half-masked image weighs half)."""
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    per_sample = loss.mean(dim=tuple(range(1, pred.ndim)))
    v = noise_scheduler.config.prediction_type == "v_prediction"
    if min_snr_gamma or debiased_estimation:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()
    if min_snr_gamma:
        clipped = torch.clamp(snr, max=min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1) if v else clipped / snr.clamp(min=1e-8))
    if debiased_estimation:
        capped = torch.clamp(snr, max=1000)  # SNR at t = 0 is ~1e3 on SD's schedule (inf on some)
        per_sample = per_sample * (1 / (capped + 1) if v else 1 / torch.sqrt(capped))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device)
    return per_sample.mean()
