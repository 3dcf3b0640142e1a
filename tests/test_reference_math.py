"""One training step of OUR trainer computes what the reference training scripts compute.

The same tiny UNet (and text encoders, adapters on both), latents, captions and random numbers go
through the trainer's own code path (TextConditioner.encode + loop.compute_loss, as `_Trainer._loss`
calls them) and through a reference written here from the scripts people train with; the loss and
every adapter gradient must agree to float tolerance.

References (read, not imported):
- diffusers 58eb52c0803ea9af3abec60841c2a093bdf1f951, examples/dreambooth/train_dreambooth_lora.py:
  tokenize_prompt L725-741, encode_prompt L742-756, the step L1261-1329 (noise, timesteps, add_noise,
  target by prediction type, MSE).
- same commit, examples/dreambooth/train_dreambooth_lora_sdxl.py: tokenize_prompt L943-952,
  encode_prompt L956-980 (penultimate hidden states of both encoders concatenated, pooled output of the
  last), compute_time_ids L1477-1483 (original size + crop top-left + target size), original_size /
  crop_top_left L825-838, added_cond_kwargs L1741-1753.
- The dreambooth scripts have no noise offset, and the SD1 one no min-SNR: those come from the same
  commit's examples/text_to_image/train_text_to_image_lora.py L871-875 (offset) and L904-921 (min-SNR:
  min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction). train_dreambooth_lora_sdxl.py L1840-1850
  weights v-prediction by min(SNR, gamma) / SNR + 1 instead; we follow the min-SNR paper's v form
  (Hang et al. 2023, section 4.2), as train_text_to_image*.py and kohya do.
- Zero terminal SNR: kohya sd-scripts 48d368fa557731ad0488c07304dfeba8c07910eb
  library/custom_train_functions.py fix_noise_scheduler_betas_for_zero_terminal_snr L30-65.
- The options only kohya has: library/train_util.py get_noise_noisy_latents_and_timesteps L6071-6107,
  get_timesteps L6062-6068, get_huber_threshold_if_needed L6110-6130, conditional_loss L6133-6166;
  library/custom_train_functions.py prepare_scheduler_for_custom_training L16-27, apply_snr_weight L68-76,
  apply_debiased_estimation L101-109, pyramid_noise_like L458-467, apply_noise_offset L471-484;
  train_network.py process_batch L467-480 and post_process_loss L330-339 (the order of the weights).

The scripts draw from torch's global RNG (and pyramid_noise_like from Python's `random`); here the
reference draws the same kinds of numbers in the script's order from a generator, which is the one
change made to them, so both sides see the same noise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sd_lora.config import TrainConfig
from sd_lora.data.buckets import Placement

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["red circle on blue", "a small green square, striped"]
# (w, h) source sizes and the (top, left) crop into a 64 px square bucket
PLACEMENTS = [Placement(bucket=(64, 64), resized=(80, 64), crop=(0, 8), original=(120, 96)),
              Placement(bucket=(64, 64), resized=(64, 100), crop=(18, 0), original=(64, 100))]
RESOLUTION = 64


@pytest.fixture(scope="module")
def models():
    """arch -> (loop.Model, adapter parameters): tiny pipelines with random (non-zero) adapters on the
    UNet and every text encoder, so each gradient is exercised."""
    from sd_lora.models import architecture_of
    from sd_lora.network.config import NetworkConfig
    from sd_lora.network.inject import inject_network
    from sd_lora.testing import tiny_pipeline
    from sd_lora.training.conditioning import TextConditioner
    from sd_lora.training.loop import Model

    out = {}
    for arch in ("sd1", "sd2-v", "sdxl"):
        pipe = tiny_pipeline(arch)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.requires_grad_(False)
        network = inject_network(pipe, NetworkConfig(rank=4, alpha=2, preset="attention", train_text_encoder=True))
        params = network.unet_parameters() + network.text_encoder_parameters()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in params:  # LoRA's up matrices start at zero: give every factor a value
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        info = architecture_of(pipe)
        from sd_lora.training.loss import noise_scheduler_for_training

        scheduler = noise_scheduler_for_training(pipe.scheduler.config, zero_terminal_snr=arch == "sd2-v")
        model = Model(pipe, info, network, torch.float32, train_unet=True, train_te=True, noise_scheduler=scheduler,
                      conditioner=TextConditioner(pipe, info.is_sdxl))
        out[arch] = (model, params)
    return out


def _latents(seed=5):
    return torch.randn(2, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(seed))


def ours(model, cfg, latents, seed, weights=(1.0, 1.0)):
    """The trainer's code path: conditioning as _Trainer._loss gets it (text encoders trained: encoded
    each step), then loop.compute_loss. weights: per image (prior_loss_weight for regularization images)."""
    from sd_lora.training.loop import compute_loss

    hidden, pooled = model.conditioner.encode(CAPTIONS, "cpu")
    weights = torch.tensor(weights)
    return compute_loss(cfg, model, model.pipe.unet, latents, hidden, pooled, PLACEMENTS, weights,
                        torch.Generator().manual_seed(seed))


# ---- the reference side -------------------------------------------------------------------------------------


def reference_alphas_cumprod(zero_terminal_snr: bool) -> torch.Tensor:
    """SD's training schedule (scaled_linear 0.00085..0.012, 1000 steps; kohya's DDPMScheduler
    arguments), with kohya's zero-terminal-SNR beta fix when asked."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    if zero_terminal_snr:
        alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
        first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
        alphas_bar_sqrt -= last
        alphas_bar_sqrt *= first / (first - last)
        alphas_bar = alphas_bar_sqrt**2
        alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
        betas = 1 - alphas
    return (1 - betas).cumprod(0)


def reference_text(pipe, arch):
    """diffusers' tokenize_prompt + encode_prompt (SD1/SD2: last hidden state; SDXL: penultimate
    hidden states of both encoders concatenated, the last encoder's pooled projection)."""
    def ids(tok):
        return tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    if arch != "sdxl":
        return pipe.text_encoder(ids(pipe.tokenizer), attention_mask=None, return_dict=False)[0], None
    embeds = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = enc(ids(tok), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(len(CAPTIONS), -1)


def reference_time_ids():
    """compute_time_ids: original_size (h, w) + crops_coords_top_left (top, left) + target_size."""
    rows = [list((p.original[1], p.original[0]) + p.crop + (RESOLUTION, RESOLUTION)) for p in PLACEMENTS]
    return torch.tensor(rows, dtype=torch.float32)


def reference_unet(pipe, arch, noisy, timesteps, hidden, pooled):
    kwargs = {"added_cond_kwargs": {"time_ids": reference_time_ids(), "text_embeds": pooled}} if arch == "sdxl" else {}
    return pipe.unet(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]


def diffusers_step(pipe, arch, latents, seed, snr_gamma=None, noise_offset=0.0):
    """The loss of train_dreambooth_lora(_sdxl).py's step, with train_text_to_image_lora.py's noise
    offset and min-SNR weighting."""
    v = arch == "sd2-v"
    ac = reference_alphas_cumprod(zero_terminal_snr=v)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, 1000, (bsz,), generator=g).long()
    a = ac[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # add_noise
    hidden, pooled = reference_text(pipe, arch)
    pred = reference_unet(pipe, arch, noisy, timesteps, hidden, pooled)
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v else noise  # get_velocity / epsilon
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = (ac[timesteps] / (1 - ac[timesteps])).float()
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1) if v else weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def kohya_step(pipe, arch, latents, seed, o, loss_weights):
    """train_network.py's process_batch with get_noise_noisy_latents_and_timesteps, the Huber
    threshold, conditional_loss and post_process_loss; `o` holds kohya's argument values,
    loss_weights is batch["loss_weights"] (prior_loss_weight for regularization images)."""
    v = arch == "sd2-v"
    ac = reference_alphas_cumprod(zero_terminal_snr=v)
    all_snr = (ac.sqrt() / (1 - ac).sqrt()) ** 2  # prepare_scheduler_for_custom_training
    g = torch.Generator().manual_seed(seed)
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=g)
    if o.noise_offset:
        offset = torch.rand(1, generator=g) * o.noise_offset if o.noise_offset_random_strength else o.noise_offset
        if o.adaptive_noise_scale is not None:  # apply_noise_offset
            offset = torch.clamp(offset + o.adaptive_noise_scale * torch.abs(latents.mean(dim=(2, 3), keepdim=True)), 0.0, None)
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=g)
    if o.multires_noise_iterations:  # pyramid_noise_like
        _, _, w, h = noise.shape
        u = torch.nn.Upsample(size=(w, h), mode="bilinear")
        for i in range(o.multires_noise_iterations):
            r = torch.rand(1, generator=g).item() * 2 + 2  # kohya: random.random() * 2 + 2
            wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
            noise += u(torch.randn(b, c, wn, hn, generator=g)) * o.multires_noise_discount**i
            if wn == 1 or hn == 1:
                break
        noise = noise / noise.std()
    low = 0 if o.min_timestep is None else o.min_timestep
    high = 1000 if o.max_timestep is None else o.max_timestep
    timesteps = (torch.randint(low, high, (b,), generator=g) if low < high else torch.full((b,), high)).long()
    perturbed = noise
    if o.ip_noise_gamma:
        strength = torch.rand(1, generator=g) * o.ip_noise_gamma if o.ip_noise_gamma_random_strength else o.ip_noise_gamma
        perturbed = noise + strength * torch.randn(latents.shape, generator=g)
    a = ac[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * perturbed
    hidden, pooled = reference_text(pipe, arch)
    pred = reference_unet(pipe, arch, noisy, timesteps, hidden, pooled)
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v else noise

    huber_c = None  # get_huber_threshold_if_needed
    if o.loss_type in ("huber", "smooth_l1"):
        if o.huber_schedule == "exponential":
            alpha = -math.log(o.huber_c) / 1000
            huber_c = torch.exp(-alpha * timesteps) * o.huber_scale
        elif o.huber_schedule == "snr":
            acs = torch.index_select(ac, 0, timesteps)
            sigmas = ((1.0 - acs) / acs) ** 0.5
            huber_c = (1 - o.huber_c) / (1 + sigmas) ** 2 + o.huber_c
        else:
            huber_c = torch.full((b,), o.huber_c * o.huber_scale)
    p, t = pred.float(), target.float()  # conditional_loss(..., "none", huber_c)
    if o.loss_type == "l2":
        loss = F.mse_loss(p, t, reduction="none")
    elif o.loss_type == "l1":
        loss = F.l1_loss(p, t, reduction="none")
    else:
        hc = huber_c.view(-1, *([1] * (p.ndim - 1)))
        loss = 2 * (torch.sqrt((p - t) ** 2 + hc**2) - hc)
        if o.loss_type == "huber":
            loss = hc * loss
    loss = loss.mean(dim=list(range(1, loss.ndim))) * torch.tensor(loss_weights)
    snr = torch.stack([all_snr[ti] for ti in timesteps])
    if o.min_snr_gamma:  # apply_snr_weight
        m = torch.minimum(snr, torch.full_like(snr, o.min_snr_gamma))
        loss = loss * (torch.div(m, snr + 1) if v else torch.div(m, snr)).float()
    if o.debiased_estimation_loss:  # apply_debiased_estimation
        s = torch.minimum(snr, torch.ones_like(snr) * 1000)
        loss = (1 / (s + 1) if v else 1 / torch.sqrt(s)) * loss
    return loss.mean()


# ---- the comparisons ------------------------------------------------------------------------------------------------


def _compare(model, params, ours_loss, ref_loss):
    g_ours = torch.autograd.grad(ours_loss, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    used = 0
    for p, a, b in zip(params, g_ours, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
            used += bool(a.abs().sum() > 0)
    assert used >= len(params) // 2  # the gradients compared are real, not all zero
    return g_ours


@pytest.mark.parametrize("arch", ["sd1", "sd2-v", "sdxl"])
@pytest.mark.parametrize("min_snr_gamma, noise_offset", [(None, 0.0), (5.0, 0.1)], ids=["plain", "min_snr+offset"])
def test_one_step_equals_diffusers(models, arch, min_snr_gamma, noise_offset):
    model, params = models[arch]
    cfg = TrainConfig(min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, zero_terminal_snr=arch == "sd2-v")
    assert model.noise_scheduler.config.prediction_type == ("v_prediction" if arch == "sd2-v" else "epsilon")
    latents, seed = _latents(), 21
    grads = _compare(model, params, ours(model, cfg, latents, seed),
                     diffusers_step(model.pipe, arch, latents, seed, min_snr_gamma, noise_offset))
    if arch == "sdxl":  # both text encoders' adapters learn (te1 through its penultimate layer)
        te1 = [g for p, g in zip(params, grads) if any(p is q for q in model.pipe.text_encoder.parameters())]
        te2 = [g for p, g in zip(params, grads) if any(p is q for q in model.pipe.text_encoder_2.parameters())]
        assert any(g is not None and g.abs().sum() > 0 for g in te1) and any(g is not None and g.abs().sum() > 0 for g in te2)


KOHYA_OPTIONS = {
    "huber_snr+debiased+ip+multires": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1, debiased_estimation_loss=True,
                                           ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                                           multires_noise_iterations=4, multires_noise_discount=0.3, min_snr_gamma=5.0),
    "smooth_l1_exp+offsets+timesteps": dict(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5,
                                            noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.2,
                                            min_timestep=200, max_timestep=700, debiased_estimation_loss=True),
}


@pytest.mark.parametrize("arch", ["sd1", "sd2-v"])
@pytest.mark.parametrize("name", list(KOHYA_OPTIONS))
def test_kohya_options_equal_kohya(models, arch, name):
    model, params = models[arch]
    cfg = TrainConfig(zero_terminal_snr=arch == "sd2-v", **KOHYA_OPTIONS[name])
    latents, seed, weights = _latents(6), 33, (1.0, 0.6)  # the second image a regularization image
    _compare(model, params, ours(model, cfg, latents, seed, weights), kohya_step(model.pipe, arch, latents, seed, cfg, weights))
