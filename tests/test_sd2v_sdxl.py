"""SD2-v and SDXL extras (issue 11): zero terminal SNR in training and sampling, rescaled guidance,
and a replacement VAE for latent caching, samples and `sd-lora generate`. Tiny tiny_models, CPU, fixed seeds."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import train

from test_train import make_images

SAMPLE = "a red circle --w 64 --h 64 --s 2 --d 3 --l 4"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE of the tiny models' shape with other random weights: as a diffusers folder, as a single
    file in diffusers key layout and in the original (LDM) layout; plus one with 8 latent channels."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from sd_lora.convert_single_file import vae_to_original
    from sd_lora.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("vae")
    config = dict(tiny_pipeline("sd2-v").vae.config)
    torch.manual_seed(7)
    vae = AutoencoderKL.from_config(config)
    vae.save_pretrained(root / "folder")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(root / "diffusers_keys.safetensors"))
    save_file({k: v.contiguous() for k, v in vae_to_original(state, prefix="").items()}, str(root / "original_keys.safetensors"))
    wide = AutoencoderKL.from_config({**config, "latent_channels": 8})
    wide.save_pretrained(root / "wide")
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(root / "wide.safetensors"))
    return {"vae": vae, "root": root}


class PipelineCalls:
    """Records every text-to-image pipeline call (its kwargs and the scheduler in use), then runs it."""

    def __init__(self, monkeypatch):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        self.calls = []
        for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
            real = cls.__call__

            def call(pipe, *args, _real=real, **kwargs):
                self.calls.append({"pipe": pipe, "scheduler": pipe.scheduler, "vae": pipe.vae, **kwargs})
                return _real(pipe, *args, **kwargs)

            monkeypatch.setattr(cls, "__call__", call)


def _cfg(tiny_models, tmp_path, arch="sd2-v", **kw) -> TrainConfig:
    if not (tmp_path / "data").is_dir():
        make_images(tmp_path / "data" / "1_circle", n=2)
    kw.setdefault("network", {"rank": 4, "alpha": 4, "preset": "attention"})
    return TrainConfig(model=tiny_models[arch], output=str(tmp_path / "out" / "z.safetensors"),
                       data=DataConfig(path=str(tmp_path / "data"), resolution=64), seed=1, **kw)


# ---- zero terminal SNR ---------------------------------------------------------------------------------


def test_sd2v_trains_with_zero_terminal_snr(tiny_models, tmp_path, monkeypatch):
    from sd_lora.training import loop

    seen = {"schedulers": set(), "timesteps": []}
    real = loop.diffusion_loss

    def spy(pred, target, timesteps, noise_scheduler, *args, **kwargs):
        seen["schedulers"].add(noise_scheduler)
        seen["timesteps"] += timesteps.tolist()
        return real(pred, target, timesteps, noise_scheduler, *args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    calls = PipelineCalls(monkeypatch)
    cfg = _cfg(tiny_models, tmp_path, zero_terminal_snr=True, min_snr_gamma=5.0, steps=3, batch_size=2,
               sample_prompts=[SAMPLE])
    events = []
    out = train(cfg, on_event=events.append)

    (scheduler,) = seen["schedulers"]
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)  # the last timestep is pure noise
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    _, metadata = load_safetensors(out)
    assert metadata["ss_zero_terminal_snr"] == "True" and metadata["ss_v_parameterization"] == "True"

    # the final sample used rescaled guidance (0.7 by default) and a zero-SNR, trailing-spacing sampler ...
    (call,) = calls.calls
    assert call["guidance_rescale"] == 0.7
    used = call["scheduler"]
    assert type(used).__name__ == "DDIMScheduler"  # the tiny sd2-v pipeline's own class
    assert used.config.rescale_betas_zero_snr and used.config.timestep_spacing == "trailing"
    assert used.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    # ... and the pipeline has its own scheduler back afterwards
    back = call["pipe"].scheduler
    assert back is not used and not back.config.get("rescale_betas_zero_snr") and back.config.timestep_spacing != "trailing"


def test_min_snr_weights_finite_at_zero_snr():
    from diffusers import DDPMScheduler

    from sd_lora.training.loss import diffusion_loss

    for prediction in ("v_prediction", "epsilon"):
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True, prediction_type=prediction)
        t = torch.tensor([999, 500])  # SNR 0 at t = 999
        pred, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
        loss = diffusion_loss(pred, target, t, sched, min_snr_gamma=5.0)
        assert torch.isfinite(loss) and loss > 0, prediction


def test_zero_terminal_snr_refuses_epsilon(tiny_models, tmp_path):
    cfg = _cfg(tiny_models, tmp_path, arch="sd1", zero_terminal_snr=True, steps=1)
    with pytest.raises(ValueError, match=r"epsilon-prediction model.*prediction_type = \"v_prediction\""):
        train(cfg)
    # said by validate() already when the config itself asks for epsilon
    cfg = _cfg(tiny_models, tmp_path, zero_terminal_snr=True, prediction_type="epsilon", steps=1, sample_guidance_rescale=1.5)
    errors = cfg.validate()
    assert any(e.startswith("zero_terminal_snr: needs v-prediction") for e in errors)
    assert any(e.startswith("sample_guidance_rescale: must be between 0 and 1") for e in errors)
    assert TrainConfig(zero_terminal_snr=True).guidance_rescale == 0.7 and TrainConfig().guidance_rescale == 0.0
    assert TrainConfig(zero_terminal_snr=True, sample_guidance_rescale=0.0).guidance_rescale == 0.0


def test_zero_terminal_snr_scheduler_needs_support():
    from diffusers import PNDMScheduler

    from sd_lora.models import zero_terminal_snr_scheduler

    with pytest.raises(ValueError, match="PNDMScheduler has no rescale_betas_zero_snr.*DDIMScheduler"):
        zero_terminal_snr_scheduler(PNDMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="needs a v-prediction model"):
        zero_terminal_snr_scheduler(PNDMScheduler())


def test_train_cli_flags(tmp_path):
    import argparse

    from sd_lora.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--zero-terminal-snr", "--sample-guidance-rescale", "0.5", "--vae", "v.safetensors"])
    cfg = train_cmd.config_from_args(args)
    assert cfg.zero_terminal_snr is True and cfg.sample_guidance_rescale == 0.5 and cfg.vae == "v.safetensors"
    toml = tmp_path / "c.toml"
    toml.write_text('vae = "vaes/fix"\nzero_terminal_snr = true\n')
    from sd_lora.config import load_config

    cfg = load_config(toml)
    assert cfg.vae == str(tmp_path / "vaes" / "fix") and cfg.zero_terminal_snr  # relative to the TOML file
    assert any(e.startswith("vae: ") and "does not exist" in e for e in cfg.validate())


def test_generate_cli_zero_terminal_snr(tiny_models, tmp_path, monkeypatch):
    from sd_lora.cli import main

    calls = PipelineCalls(monkeypatch)
    out = tmp_path / "z.png"
    assert main(["generate", "--model", tiny_models["sd2-v"], "--prompt", "a red circle", "--steps", "2", "--width", "64",
                 "--height", "64", "--zero-terminal-snr", "--guidance-rescale", "0.7", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    (call,) = calls.calls
    assert call["guidance_rescale"] == 0.7
    assert call["scheduler"].config.rescale_betas_zero_snr and call["scheduler"].config.timestep_spacing == "trailing"
    assert "Guidance rescale: 0.7, Zero terminal SNR: True" in Image.open(out).info["parameters"]
    # an epsilon model is refused with the reason (exit status 1, no image)
    assert main(["generate", "--model", tiny_models["sd1"], "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64",
                 "--zero-terminal-snr", "--out", str(tmp_path / "e.png")]) == 1
    assert not (tmp_path / "e.png").exists()


# ---- replacement VAE -----------------------------------------------------------------------------------


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_vae_folder_and_single_files(tiny_models, other_vae):
    from sd_lora.models import ModelLoadError, load_base, load_vae

    pipe = load_base(tiny_models["sd2-v"])
    root = other_vae["root"]
    for path in (root / "folder", root / "diffusers_keys.safetensors", root / "original_keys.safetensors"):
        vae = load_vae(path, pipe)
        assert _same_weights(vae, other_vae["vae"]), path
        assert vae.config.scaling_factor == pipe.vae.config.scaling_factor
    # a model folder: its vae/ subfolder
    assert _same_weights(load_vae(tiny_models["sd1"], pipe), load_base(tiny_models["sd1"]).vae)
    for wrong in (root / "wide", root / "wide.safetensors"):
        with pytest.raises(ModelLoadError, match=rf"VAE {wrong}: does not fit the base model"):
            load_vae(wrong, pipe)


def test_replacement_vae_caches_latents_and_samples(tiny_models, other_vae, tmp_path, monkeypatch):
    from sd_lora.data.cache import LatentCache, encode_pixels, item_pixels
    from sd_lora.data.dataset import scan_dataset

    cache = tmp_path / "cache"
    base_cfg = _cfg(tiny_models, tmp_path, steps=1)
    base_cfg.data.cache_latents, base_cfg.data.cache_dir = "disk", str(cache)
    train(base_cfg)
    base_entries = set(cache.iterdir())
    assert len(base_entries) == 2

    calls = PipelineCalls(monkeypatch)
    cfg = _cfg(tiny_models, tmp_path, steps=1, vae=str(other_vae["root"] / "diffusers_keys.safetensors"), sample_prompts=[SAMPLE])
    cfg.data.cache_latents, cfg.data.cache_dir = "disk", str(cache)
    out = train(cfg)
    new_entries = set(cache.iterdir()) - base_entries
    assert len(new_entries) == 2  # the base VAE's latents were not reused

    # the cached latents are the replacement VAE's encodings
    vae = other_vae["vae"]
    items = scan_dataset(cfg.data).items
    keyed = LatentCache(items, vae, "disk", cache, False, 10**8)
    for item in items:
        path = keyed._file(item, False)
        assert path in new_entries
        cached = load_safetensors(path)[0]["latent"]
        assert torch.allclose(cached, encode_pixels(vae, item_pixels(item, False, 10**8)[None])[0], atol=1e-5)
    # samples decode with it too, and the file names it as kohya does
    (call,) = calls.calls
    assert _same_weights(call["vae"].decoder, vae.decoder)
    assert load_safetensors(out)[1]["ss_vae_name"] == "diffusers_keys.safetensors"


def test_generate_cli_vae(tiny_models, other_vae, tmp_path, monkeypatch):
    from sd_lora.cli import main

    calls = PipelineCalls(monkeypatch)
    common = ["generate", "--model", tiny_models["sd2-v"], "--prompt", "a red circle", "--steps", "1", "--width", "64", "--height", "64"]
    assert main(common + ["--vae", str(other_vae["root"] / "original_keys.safetensors"), "--out", str(tmp_path / "v.png")]) == 0
    assert _same_weights(calls.calls[0]["vae"], other_vae["vae"])
    assert main(common + ["--out", str(tmp_path / "b.png")]) == 0
    assert not Image.open(tmp_path / "v.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    assert main(common + ["--vae", str(other_vae["root"] / "wide"), "--out", str(tmp_path / "w.png")]) == 1
    assert not (tmp_path / "w.png").exists()
