"""Training samples as A1111 and kohya users expect (#21): their PNGs carry the infotext `sd-lora
generate` writes, and prompt lines take kohya's `--ss SAMPLER` (kohya's names and A1111's), as does
the run's `sample_sampler`. Tiny SD1 model on the CPU, fixed seeds."""

from __future__ import annotations

import importlib.util

import pytest
from PIL import Image

import sd_lora
from sd_lora import artifacts
from sd_lora.config import DataConfig, TrainConfig
from sd_lora.generation import settings_from_infotext
from sd_lora.infotext import model_hash, parse_infotext
from sd_lora.sample_prompts import parse_prompt_line
from sd_lora.samplers import KOHYA, SAMPLERS, make_scheduler, resolve
from sd_lora.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# kohya-ss/sd-scripts library/train_util.py get_my_scheduler (commit 48d368fa, lines 6199-6245), facts:
# each --sample_sampler choice -> the diffusers class it builds, and the algorithm_type it sets.
KOHYA_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}
KOHYA_ALGORITHM = {"dpmsolver": "dpmsolver", "dpmsolver++": "dpmsolver++"}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def test_each_kohya_name_builds_the_scheduler_kohya_uses(pipe):
    own = pipe.scheduler
    assert set(KOHYA) == set(KOHYA_CLASSES)  # kohya's choices, all of them
    built_for = {}  # our name -> its scheduler (k_dpm_2 and dpm_2 are one entry: built once, KDPM2's set-up is slow)
    for name, cls in KOHYA_CLASSES.items():
        assert SAMPLERS[resolve(name)].scheduler == cls, name
        needs = SAMPLERS[resolve(name)].needs
        if needs and importlib.util.find_spec(needs) is None:  # LMS without scipy: diffusers has only a stand-in class
            continue
        ours = resolve(name)
        if ours not in built_for:
            built_for[ours] = make_scheduler(ours, own)
        built = built_for[ours]
        assert type(built).__name__ == cls, name
        if name in KOHYA_ALGORITHM:
            assert built.config.algorithm_type == KOHYA_ALGORITHM[name], name
        # kohya never sets Karras sigmas ("k_" is k-diffusion, not Karras)
        assert not built.config.get("use_karras_sigmas", False), name
        assert built.config.beta_schedule == own.config.beta_schedule  # the model's betas kept
    # A1111's names are taken as they are, with the options they imply
    assert resolve("Euler a") == "Euler a" and resolve("DPM++ 2M Karras") == "DPM++ 2M Karras"
    assert make_scheduler(resolve("DPM++ 2M Karras"), own).config.use_karras_sigmas
    assert SAMPLERS[resolve("DPM++ SDE Karras")].scheduler == "DPMSolverSDEScheduler"  # the SDE sampler
    assert make_scheduler(resolve("PLMS"), own).config.skip_prk_steps
    with pytest.raises(ValueError, match=r"sampler 'euler_ancestral': use one of 'Euler', .*or kohya's ddim, pndm"):
        resolve("euler_ancestral")


def test_prompt_lines_take_ss_with_kohyas_and_a1111s_names():
    sp = parse_prompt_line("a cat, on a mat --n blurry, dark --ss euler_a --s 3 --d 7")
    assert (sp.prompt, sp.negative, sp.sampler, sp.steps, sp.seed) == ("a cat, on a mat", "blurry, dark", "Euler a", 3, 7)
    assert parse_prompt_line("a cat --ss DPM++ 2M Karras --w 64").sampler == "DPM++ 2M Karras"  # a name with spaces
    assert parse_prompt_line("a cat --ss dpmsolver++").sampler == "DPM++ 2M"
    assert parse_prompt_line("a cat --s 4").sampler is None
    with pytest.raises(ValueError, match=r"sample prompt 'a cat --ss euler_b': --ss sampler 'euler_b': use one of"):
        parse_prompt_line("a cat --ss euler_b")
    # the config finds a bad name up front, in a prompt line or in sample_sampler (with a suggestion)
    cfg = TrainConfig(model="m", output="o.safetensors", data=DataConfig(path="d"), steps=1, sample_sampler="Euler A",
                      sample_prompts=["a cat --ss k_eulr"])
    errors = "\n".join(cfg.validate(check_paths=False))
    assert "sample_sampler: unknown 'Euler A' (did you mean 'Euler a'?)" in errors
    assert "sample_prompts: sample prompt 'a cat --ss k_eulr': --ss sampler 'k_eulr'" in errors


def test_ss_renders_with_that_sampler_and_counts_second_order_steps(pipe, tmp_path):
    from sd_lora.training.sampling import load_prompts, render_samples

    own = pipe.scheduler
    seen = []

    def progress(i, n, s, of):  # reads the scheduler the pipeline is running with, at each step
        seen.append((i, s, of, type(pipe.scheduler).__name__))

    prompts = load_prompts(["a red circle --n blurry --w 64 --h 72 --s 3 --d 5 --l 4 --ss euler_a",
                            "a blue square --w 64 --h 64 --s 2 --d 6"])
    paths = render_samples(pipe, prompts, tmp_path / "ink.safetensors", step=7, resolution=64, default_steps=20,
                           default_seed=0, on_progress=progress, sampler="k_dpm_2")  # the run's sampler: DPM2
    assert seen == [(0, 1, 3, "EulerAncestralDiscreteScheduler"), (0, 2, 3, "EulerAncestralDiscreteScheduler"),
                    (0, 3, 3, "EulerAncestralDiscreteScheduler"),
                    # DPM2 calls the model about twice per step: progress still counts 1, 2 of 2
                    (1, 1, 2, "KDPM2DiscreteScheduler"), (1, 2, 2, "KDPM2DiscreteScheduler")]
    assert pipe.scheduler is own  # the model's scheduler put back
    # the same pixels as `generate` with sampler "Euler a" and the line's settings
    direct = sd_lora.generate(pipe, "a red circle", negative_prompt="blurry", sampler="Euler a", steps=3, seed=5,
                              guidance=4.0, width=64, height=72).images[0]
    with Image.open(paths[0]) as im:
        assert im.convert("RGB").tobytes() == direct.image.convert("RGB").tobytes()
        text = im.info["parameters"]
    # and the PNG text of generate's, but for the LoRA: the adapters in memory at step 7, not a file
    assert text == direct.parameters.replace(", Version: ", ", LoRA in training: ink step 7, Version: ")
    assert "Lora hashes" not in text and "LoRAs" not in text and settings_from_infotext(text)["training"] == "ink step 7"


def test_a_training_runs_sample_png_parses_as_a1111_infotext(tiny_training_root, tmp_path, caplog):
    from sd_lora.cli import main

    out = tmp_path / "circle.safetensors"
    model = tiny_training_root / "model"
    cfg = TrainConfig(model=str(model), output=str(out), data=DataConfig(path=str(tiny_training_root / "data"), resolution=64),
                      steps=2, lr=1e-3, seed=1, network={"rank": 2, "alpha": 1, "preset": "attention"}, clip_skip=2,
                      sample_every=2, sample_sampler="euler_a",
                      sample_prompts=["a red circle --n blurry, dark --w 64 --h 72 --s 2 --d 5 --l 4.5"])
    assert sd_lora.train(cfg) == out
    png = artifacts.sample_image(out, 2, 0)
    with Image.open(png) as im:
        assert im.size == (64, 72)
        res = parse_infotext(im.info["parameters"])  # the parser written from A1111's source
    assert {k: res[k] for k in ("Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed",
                                "Size-1", "Size-2", "Model", "Model hash", "Clip skip", "LoRA in training")} == {
        "Prompt": "a red circle", "Negative prompt": "blurry, dark", "Steps": "2", "Sampler": "Euler a",
        "Schedule type": "Automatic", "CFG scale": "4.5", "Seed": "5", "Size-1": "64", "Size-2": "72", "Model": "model",
        "Model hash": model_hash(model), "Clip skip": "2", "LoRA in training": "circle step 2"}
    assert "Lora hashes" not in res and res["Version"].startswith("sd-lora ")
    # --from-png remakes it with the base alone unless told, and says why
    assert main(["generate", "--model", str(model), "--from-png", str(png), "--out", str(tmp_path / "again.png")]) == 0
    assert "is a training sample (circle step 2)" in caplog.text
