"""Sample images during training, from prompt lines in kohya's sample-prompt syntax.

    a photo of sks dog on a beach --n blurry, low quality --w 512 --h 768 --s 28 --d 1234 --l 7

--n negative prompt, --w/--h width/height, --s sampler steps, --d seed, --l guidance (CFG) scale.
Lines starting with # and empty lines are ignored. Images are rendered with the pipeline being
trained (adapters active), with a seeded generator, so the same line gives comparable images across
steps. Prompts are encoded as `sd_lora.generate` encodes them (sd_lora.prompts: A1111 emphasis, long
prompts), with the run's clip_skip. Runs with zero_terminal_snr sample with a zero-SNR,
trailing-spacing scheduler and guidance rescale (sample_guidance_rescale, 0.7 by default for them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..sample_prompts import SamplePrompt, load_prompts, parse_prompt_line  # noqa: F401 (the parser lives there, torch-free)


class SamplingInterrupted(Exception):
    """`should_stop` said stop between two sampler steps; the images finished before it are kept."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        super().__init__(f"sampling interrupted after {len(paths)} image(s)")


def sample_size(sp: SamplePrompt, resolution: int) -> tuple[int, int]:
    """(width, height) a prompt line renders at: its --w/--h, else the training resolution, in 8 px steps."""
    return max(64, (sp.width or resolution) // 8 * 8), max(64, (sp.height or resolution) // 8 * 8)


@torch.no_grad()
def render_samples(pipe, prompts: list[SamplePrompt], output: Path, step: int, resolution: int,
                   default_steps: int, default_seed: int, autocast=None, guidance_rescale: float = 0.0,
                   zero_terminal_snr: bool = False, on_progress=None, should_stop=None,
                   clip_skip: int | None = None) -> list[Path]:
    """Render every prompt; returns the PNG paths, named by artifacts.sample_image for the run whose
    LoRA file is `output` (`<stem>-samples/step-000100-0.png`, ...).

    zero_terminal_snr: sample with the pipeline's scheduler class set up for it (rescaled betas,
    trailing timesteps) and put the original scheduler back afterwards.
    on_progress(prompt index, prompts, sampler step, sampler steps) is called after every sampler
    step; should_stop() is asked there too, and True raises SamplingInterrupted (a 512 px sample on a
    CPU can take minutes, so a stop must not wait for the whole set).
    """
    from contextlib import nullcontext

    from .. import artifacts
    from ..io import atomic_path
    from ..models import use_zero_terminal_snr
    from ..prompts import pipeline_prompt_kwargs

    artifacts.samples_dir(output).mkdir(parents=True, exist_ok=True)
    scheduler = use_zero_terminal_snr(pipe) if zero_terminal_snr else pipe.scheduler  # the original, put back below
    modules = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()  # adapter dropout off while sampling
    pipe.set_progress_bar_config(disable=True)
    paths = []
    try:
        for i, sp in enumerate(prompts):
            w, h = sample_size(sp, resolution)
            steps = sp.steps or default_steps

            def step_end(pipe_, s, t, kwargs, i=i, steps=steps):
                if on_progress is not None:
                    on_progress(i, len(prompts), s + 1, steps)
                if should_stop is not None and should_stop():
                    raise SamplingInterrupted(paths)
                return kwargs

            generator = torch.Generator(device="cpu").manual_seed(default_seed + i if sp.seed is None else sp.seed)
            with autocast() if autocast else nullcontext():
                embeds = pipeline_prompt_kwargs(pipe, sp.prompt, sp.negative or "", clip_skip=clip_skip)
                image = pipe(
                    **embeds, width=w, height=h,
                    num_inference_steps=steps, guidance_scale=sp.guidance,
                    guidance_rescale=guidance_rescale, generator=generator, callback_on_step_end=step_end,
                ).images[0]
            path = artifacts.sample_image(output, step, i)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
    finally:
        pipe.scheduler = scheduler
        for m, t in zip(modules, was_training):
            m.train(t)
    return paths
