"""The loss options of issue #18 against their formulas (kohya sd-scripts' definitions, see
sd_lora/training/loss.py), their config rules, and exact resume with several of them on."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sd_lora.config import TrainConfig
from sd_lora.training import loss as L
from sd_lora.testing import assert_same_tensors


def _sched(prediction="epsilon", zero_snr=False):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction,
                         rescale_betas_zero_snr=zero_snr)


def _cfg(**kw):
    return TrainConfig(**kw)


# ---- Huber threshold schedules and the element-wise losses ------------------------------------------------


def test_huber_threshold_schedules():
    s = _sched()
    t = torch.tensor([0, 250, 999])
    assert L.huber_threshold(t, s, _cfg()) is None  # l2: no threshold

    c = L.huber_threshold(t, s, _cfg(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=1.5))
    assert torch.allclose(c, torch.full((3,), 0.3))

    c = L.huber_threshold(t, s, _cfg(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0))
    expected = [2.0 * 0.1 ** (ti / 1000) for ti in (0, 250, 999)]  # exp(ln(c) t / T) = c^(t/T)
    assert torch.allclose(c, torch.tensor(expected), rtol=1e-6)

    c = L.huber_threshold(t, s, _cfg(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1, huber_scale=7.0))
    for ci, ti in zip(c.tolist(), (0, 250, 999)):
        a = s.alphas_cumprod[ti].item()
        sigma = math.sqrt((1 - a) / a)
        assert ci == pytest.approx((1 - 0.1) / (1 + sigma) ** 2 + 0.1, rel=1e-5)  # huber_scale is not used here
    assert c[0] > c[1] > c[2] > 0.1  # near 1 at clean timesteps, down to huber_c at pure noise


def test_huber_snr_schedule_at_zero_terminal_snr():
    c = L.huber_threshold(torch.tensor([999]), _sched("v_prediction", zero_snr=True), _cfg(loss_type="huber"))
    assert c.item() == pytest.approx(0.1)  # sigma is infinite: the threshold is huber_c


def test_elementwise_losses():
    pred = torch.tensor([[0.0, 0.5, -3.0]]).view(1, 3, 1, 1)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.5])
    d = pred.flatten()
    assert torch.allclose(L.elementwise_loss(pred, target, "l2").flatten(), d**2)
    assert torch.allclose(L.elementwise_loss(pred, target, "l1").flatten(), d.abs())
    huber = L.elementwise_loss(pred, target, "huber", c).flatten()
    assert torch.allclose(huber, 2 * 0.5 * (torch.sqrt(d**2 + 0.25) - 0.5))
    assert torch.allclose(L.elementwise_loss(pred, target, "smooth_l1", c).flatten(), huber / 0.5)
    # pseudo-Huber: ~d^2 for small errors, ~2c|d| (linear) for large ones
    small = L.elementwise_loss(torch.tensor([1e-2]).view(1, 1), torch.zeros(1, 1), "huber", torch.tensor([1.0]))
    assert small.item() == pytest.approx(1e-4, rel=1e-2)
    big = L.elementwise_loss(torch.tensor([1e3]).view(1, 1), torch.zeros(1, 1), "huber", torch.tensor([0.1]))
    assert big.item() == pytest.approx(2 * 0.1 * 1e3, rel=1e-3)
    with pytest.raises(ValueError, match="Huber threshold"):
        L.elementwise_loss(pred, target, "huber")


def test_diffusion_loss_huber_is_per_sample_threshold():
    s = _sched()
    pred, target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 4, 8, 8)
    c = torch.tensor([0.1, 0.9])
    loss = L.diffusion_loss(pred, target, torch.tensor([10, 900]), s, loss_type="huber", huber_c=c)
    per = [(2 * ci * (torch.sqrt(pred[i] ** 2 + ci**2) - ci)).mean() for i, ci in enumerate(c.tolist())]
    assert loss.item() == pytest.approx(sum(per).item() / 2, rel=1e-6)


# ---- SNR weights ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_and_min_snr_weights(prediction):
    s = _sched(prediction)
    t = torch.tensor([0, 100, 500, 990])
    pred, target = torch.ones(4, 4, 2, 2), torch.zeros(4, 4, 2, 2)  # per-sample loss 1: the loss is the mean weight
    a = s.alphas_cumprod[t].double()
    snr = a / (1 - a)
    capped = snr.clamp(max=1000)
    debiased = 1 / (capped + 1) if prediction == "v_prediction" else 1 / capped.sqrt()
    got = L.diffusion_loss(pred, target, t, s, debiased_estimation=True)
    assert got.item() == pytest.approx(debiased.mean().item(), rel=1e-5)
    min_snr = snr.clamp(max=5) / (snr + 1 if prediction == "v_prediction" else snr)
    both = L.diffusion_loss(pred, target, t, s, torch.tensor([1.0, 1.0, 0.5, 2.0]), 5.0, debiased_estimation=True)
    assert both.item() == pytest.approx((min_snr * debiased * torch.tensor([1.0, 1.0, 0.5, 2.0]).double()).mean().item(), rel=1e-5)
    assert snr[0] > 1000  # the cap is reached at t = 0 on SD's schedule


# ---- noise ---------------------------------------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noise_offset_adaptive_and_random_strength():
    latents = torch.randn(2, 4, 8, 8, generator=_gen(1)) + torch.tensor([0.0, 1.0, -2.0, 0.5]).view(1, 4, 1, 1)
    plain = L.sample_noise(latents, _gen(), _cfg())
    assert torch.equal(plain, torch.randn(latents.shape, generator=_gen()))

    g = _gen()
    base, offset = torch.randn(latents.shape, generator=g), torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(L.sample_noise(latents, _gen(), _cfg(noise_offset=0.1)), base + 0.1 * offset)

    strength = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    got = L.sample_noise(latents, _gen(), _cfg(noise_offset=0.1, adaptive_noise_scale=0.5))
    assert torch.allclose(got, base + strength * offset)
    # a negative adaptive scale never makes the offset negative
    floored = L.noise_offset_strength(latents, 0.1, -10.0)
    assert floored.min() == 0 and floored.shape == (2, 4, 1, 1)

    g = _gen()
    base, u, offset = torch.randn(latents.shape, generator=g), torch.rand(1, generator=g).item(), torch.randn((2, 4, 1, 1), generator=g)
    got = L.sample_noise(latents, _gen(), _cfg(noise_offset=0.1, noise_offset_random_strength=True))
    assert torch.allclose(got, base + 0.1 * u * offset)


def test_pyramid_noise_formula():
    noise = torch.randn(2, 4, 16, 16, generator=_gen(3))
    got = L.pyramid_noise(noise.clone(), _gen(5), iterations=3, discount=0.4)
    g, expected = _gen(5), noise.clone()
    for i in range(3):
        r = torch.rand(1, generator=g).item() * 2 + 2
        hn, wn = max(1, int(16 / r**i)), max(1, int(16 / r**i))
        level = torch.randn((2, 4, hn, wn), generator=g)
        expected += torch.nn.Upsample(size=(16, 16), mode="bilinear")(level) * 0.4**i
    expected = expected / expected.std()
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, rel=1e-5)
    # the levels stop at 1 pixel (16 / r^4 <= 1 as r >= 2): more iterations than the size allows add nothing
    assert torch.equal(L.pyramid_noise(noise.clone(), _gen(5), 50, 0.4), L.pyramid_noise(noise.clone(), _gen(5), 5, 0.4))
    cfg = _cfg(multires_noise_iterations=3, multires_noise_discount=0.4)
    g = _gen(9)
    base = torch.randn(noise.shape, generator=g)
    assert torch.allclose(L.sample_noise(noise, _gen(9), cfg), L.pyramid_noise(base, g, 3, 0.4))


def test_input_perturbation_noise_is_not_in_the_target():
    s = _sched()
    latents, noise = torch.randn(2, 4, 8, 8, generator=_gen(1)), torch.randn(2, 4, 8, 8, generator=_gen(2))
    t = torch.tensor([100, 700])
    assert torch.equal(L.noisy_latents(s, latents, noise, t, _gen(), _cfg()), s.add_noise(latents, noise, t))
    extra = torch.randn(latents.shape, generator=_gen())
    got = L.noisy_latents(s, latents, noise, t, _gen(), _cfg(ip_noise_gamma=0.1))
    assert torch.allclose(got, s.add_noise(latents, noise + 0.1 * extra, t))
    g = _gen()
    u, extra = torch.rand(1, generator=g).item(), torch.randn(latents.shape, generator=g)
    got = L.noisy_latents(s, latents, noise, t, _gen(), _cfg(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True))
    assert torch.allclose(got, s.add_noise(latents, noise + 0.1 * u * extra, t))


def test_timestep_range():
    t = L.sample_timesteps(4000, 1000, _gen(), "cpu", 200, 300)
    assert t.min() == 200 and t.max() == 299  # [min, max)
    assert L.sample_timesteps(4000, 1000, _gen(), "cpu", None, 10).max() == 9
    assert L.sample_timesteps(4000, 1000, _gen(), "cpu", 990, None).min() == 990
    assert torch.equal(L.sample_timesteps(3, 1000, _gen(), "cpu", 500, 500), torch.full((3,), 500))
    assert torch.equal(L.sample_timesteps(3, 1000, _gen(), "cpu"), torch.randint(0, 1000, (3,), generator=_gen()))


# ---- config rules -----------------------------------------------------------------------------------------------


def test_loss_option_rules():
    def errors(**kw):
        return TrainConfig(model="m", output="o.safetensors", data={"path": "d"}, steps=1, **kw).validate(check_paths=False)

    assert errors(loss_type="huber", huber_schedule="exponential", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                  noise_offset=0.05, adaptive_noise_scale=0.1, noise_offset_random_strength=True,
                  multires_noise_iterations=6, min_timestep=100, max_timestep=900, debiased_estimation_loss=True) == []
    msgs = errors(adaptive_noise_scale=0.1, noise_offset_random_strength=True, ip_noise_gamma_random_strength=True,
                  min_timestep=600, max_timestep=500, huber_c=2.0, loss_type="hubr")
    text = "\n".join(msgs)
    assert "adaptive_noise_scale: needs noise_offset" in text
    assert "noise_offset_random_strength: needs noise_offset" in text
    assert "ip_noise_gamma_random_strength: needs ip_noise_gamma" in text
    assert "min_timestep/max_timestep: the range [600, 500) is empty" in text
    assert "huber_c: must be > 0, and <= 1" in text
    assert "loss_type: unknown 'hubr' (did you mean 'huber'?)" in text
    assert any(m.startswith("max_timestep: must be 1-1000") for m in errors(max_timestep=1001))
    assert errors(min_timestep=1000, max_timestep=1000)  # would draw timestep 1000, past the schedule
    assert errors(huber_c=5.0, huber_schedule="constant") == []


def test_kohya_flags_reach_the_config():
    from sd_lora.cli import build_parser
    from sd_lora.commands.train import config_from_args

    args = build_parser().parse_args([
        "train", "--model", "m", "--data", "d", "--output", "o.safetensors", "--steps", "1", "--loss_type", "smooth_l1",
        "--huber_c", "0.2", "--huber_schedule", "constant", "--debiased_estimation_loss", "--ip_noise_gamma", "0.1",
        "--multires_noise_iterations", "6", "--multires_noise_discount", "0.4", "--min_timestep", "10", "--max_timestep", "900",
        "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01", "--noise_offset_random_strength",
        "--ip_noise_gamma_random_strength"])
    cfg = config_from_args(args)
    assert (cfg.loss_type, cfg.huber_c, cfg.huber_schedule, cfg.debiased_estimation_loss) == ("smooth_l1", 0.2, "constant", True)
    assert (cfg.ip_noise_gamma, cfg.multires_noise_iterations, cfg.multires_noise_discount) == (0.1, 6, 0.4)
    assert (cfg.min_timestep, cfg.max_timestep, cfg.adaptive_noise_scale) == (10, 900, 0.01)
    assert cfg.noise_offset_random_strength and cfg.ip_noise_gamma_random_strength


# ---- the trainer uses them, and resumes exactly with them ------------------------------------------------------


def test_options_reach_the_loss_and_resume_exactly(tiny_models, tmp_path, monkeypatch, one_torch_thread):
    from sd_lora.io import load_safetensors
    from sd_lora.testing import write_noise_images
    from sd_lora.training import loop, train
    from test_resume import stop_at_step
    from sd_lora.training.events import read_events

    seen = []
    real = loop.diffusion_loss

    def spy(pred, target, timesteps, noise_scheduler, *args, **kwargs):
        seen.append((timesteps.tolist(), kwargs["loss_type"], kwargs["huber_c"], kwargs["debiased_estimation"]))
        return real(pred, target, timesteps, noise_scheduler, *args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    data = write_noise_images(tmp_path / "data" / "1_thing", 2)

    def config(out, **kw):
        # every random option on: each draws from the step's seeded generator
        return TrainConfig(model=tiny_models["sd1"], output=str(out), data={"path": str(data.parent), "resolution": 64},
                           steps=4, batch_size=2, lr=1e-3, seed=3, network={"rank": 4, "alpha": 2, "preset": "attention"},
                           loss_type="huber", huber_schedule="snr", debiased_estimation_loss=True, min_timestep=100,
                           max_timestep=800, noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.1,
                           multires_noise_iterations=3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, **kw)

    full = tmp_path / "full" / "lora.safetensors"
    train(config(full))
    assert len(seen) == 4
    for timesteps, loss_type, huber_c, debiased in seen:
        assert all(100 <= t < 800 for t in timesteps) and loss_type == "huber" and debiased
        assert huber_c.shape == (2,) and (huber_c > 0.1).all()

    out = tmp_path / "parts" / "lora.safetensors"
    stop_at_step(config(out), 2)
    train(config(out, resume="latest"))
    assert_same_tensors(full, out)
    metadata = load_safetensors(full)[1]
    # kohya's metadata keys (train_network.py L1033-1056), and the JSON of settings for the rest
    assert {k: metadata[k] for k in ("ss_loss_type", "ss_huber_c", "ss_huber_schedule", "ss_huber_scale", "ss_debiased_estimation",
                                     "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength", "ss_noise_offset_random_strength",
                                     "ss_adaptive_noise_scale", "ss_multires_noise_iterations", "ss_multires_noise_discount")} == {
        "ss_loss_type": "huber", "ss_huber_c": "0.1", "ss_huber_schedule": "snr", "ss_huber_scale": "1.0",
        "ss_debiased_estimation": "True", "ss_ip_noise_gamma": "0.1", "ss_ip_noise_gamma_random_strength": "True",
        "ss_noise_offset_random_strength": "True", "ss_adaptive_noise_scale": "0.1", "ss_multires_noise_iterations": "3",
        "ss_multires_noise_discount": "0.3"}
    from sd_lora.fields import recorded_settings

    settings = recorded_settings(metadata)
    assert (settings["min_timestep"], settings["max_timestep"], settings["loss_type"]) == (100, 800, "huber")

    def losses(path):
        return {e["step"]: e["loss"] for e in read_events(path) if e["event"] == "step"}

    assert losses(full.parent / "lora.events.jsonl") == losses(out.parent / "lora.events.jsonl")
