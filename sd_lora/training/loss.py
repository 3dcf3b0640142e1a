"""The diffusion training loss: noise, timesteps, target (epsilon or v), min-SNR and prior weights.

    noisy  = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise                 (scheduler.add_noise)
    target = noise                                  (epsilon models: SD1, SD2-base, SDXL)
           = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (v-prediction models: SD2 768-v)
    loss   = mean over pixels of (pred - target)^2, weighted per sample by
             min-SNR (Hang et al. 2023: min(SNR, gamma) / SNR, or / (SNR + 1) for v) and by
             prior_loss_weight for regularization images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(latents.device, latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}; expected epsilon or v_prediction")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    sample_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Weighted MSE, averaged over the batch (a scalar)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if min_snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=min_snr_gamma)
        if noise_scheduler.config.prediction_type == "v_prediction":
            per_sample = per_sample * clipped / (snr + 1)
        else:
            per_sample = per_sample * clipped / snr.clamp(min=1e-8)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device)
    return per_sample.mean()
