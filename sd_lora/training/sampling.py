"""Sample images during training, from prompt lines in kohya's sample-prompt syntax.

    a photo of sks dog on a beach --n blurry, low quality --w 512 --h 768 --s 28 --d 1234 --l 7

--n negative prompt, --w/--h width/height, --s sampler steps, --d seed, --l guidance (CFG) scale,
--ss sampler (kohya's or A1111's name; else the run's sample_sampler, else the model's own scheduler).
Lines starting with # and empty lines are ignored. Images are rendered with the pipeline being
trained (adapters active), with a seeded generator, so the same line gives comparable images across
steps. Prompts are encoded as `sd_lora.generate` encodes them (sd_lora.prompts: A1111 emphasis, long
prompts), with the run's clip_skip. Runs with zero_terminal_snr sample with a zero-SNR,
trailing-spacing scheduler and guidance rescale (sample_guidance_rescale, 0.7 by default for them).

Each PNG carries the same A1111 `parameters` text as `sd-lora generate` writes (written by
sd_lora.generation.parameters_text, the one builder): prompt, negative prompt, steps, sampler, CFG
scale, seed, size, model and its hash, clip skip. It has no "Lora hashes" and no "LoRAs" entry: the
image comes from the adapters in memory at that step, which are no file (the file saved at the same
step may differ from them: it is cast to save_precision), so a hash would name weights that did not
make the image, and `--from-png` would re-apply a file that is not there. Instead it says
`LoRA in training: <output name> step N` (ours; A1111 shows unknown keys as they are).
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
                   clip_skip: int | None = None, sampler: str | None = None, model=None, vae=None) -> list[Path]:
    """Render every prompt; returns the PNG paths, named by artifacts.sample_image for the run whose
    LoRA file is `output` (`<stem>-samples/step-000100-0.png`, ...).

    sampler: the run's sampler (sample_sampler: an A1111 or kohya name) for lines without --ss; None:
    the pipeline's own scheduler. Each is built from the pipeline's scheduler config, as generate() does.
    zero_terminal_snr: sample with the chosen scheduler class set up for it (rescaled betas,
    trailing timesteps) and put the original scheduler back afterwards.
    model, vae: the base model and replacement VAE paths, for the PNG's Model, Model hash and VAE.
    on_progress(prompt index, prompts, sampler step, sampler steps) is called after every sampler
    step (a second-order sampler's extra model calls are not steps); should_stop() is asked after
    every model call, and True raises SamplingInterrupted (a 512 px sample on a CPU can take minutes,
    so a stop must not wait for the whole set).
    """
    from contextlib import nullcontext

    from .. import artifacts
    from ..generation import model_settings, parameters_text
    from ..models import zero_terminal_snr_scheduler
    from ..prompts import pipeline_prompt_kwargs
    from ..samplers import make_scheduler, resolve
    from ..stack.grid import save_png

    artifacts.samples_dir(output).mkdir(parents=True, exist_ok=True)
    scheduler = pipe.scheduler  # the original, put back below
    run_sampler = resolve(sampler) if sampler else None
    base = model_settings(model, pipe)  # Model, Model hash (AutoV2; hashed once per process)
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
            name = sp.sampler or run_sampler
            # the sampler first: zero terminal SNR rescales the chosen scheduler's betas (as in generate())
            pipe.scheduler = make_scheduler(name, scheduler) if name else scheduler
            if zero_terminal_snr:
                pipe.scheduler = zero_terminal_snr_scheduler(pipe.scheduler)
            reported = [0]

            def step_end(pipe_, s, t, kwargs, i=i, steps=steps, reported=reported):
                # the callback comes once per model call: a second-order sampler (Heun, DPM2) makes about
                # two per step, PLMS one extra; progress counts sampler steps
                done = min(steps, -(-(s + 1) * steps // len(pipe_.scheduler.timesteps)))
                if on_progress is not None and done > reported[0]:
                    reported[0] = done
                    on_progress(i, len(prompts), done, steps)
                if should_stop is not None and should_stop():
                    raise SamplingInterrupted(paths)
                return kwargs

            seed = default_seed + i if sp.seed is None else sp.seed
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with autocast() if autocast else nullcontext():
                embeds = pipeline_prompt_kwargs(pipe, sp.prompt, sp.negative or "", clip_skip=clip_skip)
                image = pipe(
                    **embeds, width=w, height=h,
                    num_inference_steps=steps, guidance_scale=sp.guidance,
                    guidance_rescale=guidance_rescale, generator=generator, callback_on_step_end=step_end,
                ).images[0]
            settings = {
                "prompt": sp.prompt, "negative_prompt": sp.negative or "", "steps": steps, "sampler": name,
                "scheduler": type(pipe.scheduler).__name__, "guidance": sp.guidance, "seed": seed,
                "width": image.width, "height": image.height, **base, "vae": Path(vae).name if vae else None,
                "clip_skip": clip_skip, "loras": [], "guidance_rescale": guidance_rescale,
                "zero_terminal_snr": zero_terminal_snr, "training": f"{Path(output).stem} step {step}",
            }
            path = artifacts.sample_image(output, step, i)
            save_png(image, path, parameters_text(settings))
            paths.append(path)
    finally:
        pipe.scheduler = scheduler
        for m, t in zip(modules, was_training):
            m.train(t)
    return paths
