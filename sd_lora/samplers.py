"""Samplers by the names A1111 / Forge / Civitai users know, mapped to diffusers schedulers.

One table (SAMPLERS): our name -> the diffusers scheduler class, its options, and how A1111 v1.10
writes it in an infotext, where the sampler and the schedule are two fields ("Sampler: DPM++ 2M,
Schedule type: Karras"). The mapping follows diffusers' own table of A1111 equivalents
(docs/source/en/api/schedulers/overview.md: "DPM++ 2M Karras" = DPMSolverMultistepScheduler with
use_karras_sigmas=True, "DPM++ SDE Karras" = DPMSolverSDEScheduler with use_karras_sigmas=True, ...).

Reading an A1111 infotext: its "Automatic" schedule is the sampler's own default, which for DPM++ 2M
and DPM++ SDE is Karras in v1.10 (modules/sd_samplers_kdiffusion.py: `('DPM++ 2M', 'sample_dpmpp_2m',
['k_dpmpp_2m'], {'scheduler': 'karras'})`); infotexts from before v1.9 name the sampler alone
("DPM++ 2M Karras"). Torch-free at import (the CLI's --help lists the names).

kohya's names (KOHYA: its `--sample_sampler` choices and the `--ss` option of sample-prompt lines)
are spellings of entries of the same table, for training samples (`resolve`). The classes are the
ones kohya-ss/sd-scripts library/train_util.py `get_my_scheduler` builds (read at commit 48d368fa,
lines 6199-6245; the choices at lines 4196-4218). Its "k_" prefix means k-diffusion, not Karras
(A1111's aliases agree: 'k_lms' is LMS, 'k_dpm_2_a' is DPM2 a, its Karras variants' aliases end in
"_ka"; modules/sd_samplers_kdiffusion.py samplers_k_diffusion), so no kohya name sets Karras sigmas.
Two things kohya does that we do not: it builds each scheduler with SD1's betas instead of the
model's scheduler config (we keep the model's, as `generate` does, so v-prediction and zero-SNR
settings carry over), and it turns on DDIM's clip_sample (A1111's DDIM does not clip).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # the diffusers class
    options: dict = field(default_factory=dict)  # passed to from_config over the model's scheduler config
    a1111: str = ""  # A1111's "Sampler:" value
    schedule: str = "Automatic"  # A1111's "Schedule type:" value
    needs: str | None = None  # a package the scheduler imports


SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler("EulerDiscreteScheduler", {}, "Euler", "Automatic"),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a", "Automatic"),
    # A1111's plain DPM++ 2M runs Karras sigmas ("Automatic"); ours without Karras is its "Uniform"
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": False}, "DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                               "use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "DPM++ SDE Karras": Sampler("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "DPM++ SDE", "Karras",
                                needs="torchsde"),
    "DDIM": Sampler("DDIMScheduler", {}, "DDIM", "Automatic"),
    "UniPC": Sampler("UniPCMultistepScheduler", {}, "UniPC", "Automatic"),
    "LCM": Sampler("LCMScheduler", {}, "LCM", "Automatic"),
    # k-diffusion samplers that A1111 lists without a schedule of their own ("Automatic": the model's sigmas)
    "Heun": Sampler("HeunDiscreteScheduler", {}, "Heun", "Automatic"),
    "LMS": Sampler("LMSDiscreteScheduler", {}, "LMS", "Automatic", needs="scipy"),  # integrates its coefficients with scipy
    "DPM2": Sampler("KDPM2DiscreteScheduler", {}, "DPM2", "Automatic"),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a", "Automatic"),
    # A1111's PLMS is PNDM without its Runge-Kutta warm-up steps
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", "Automatic"),
    # kohya's dpmsolver and dpmsingle have no A1111 name (A1111's "DPM++ 2S a" is ancestral): these are ours
    # (diffusers refuses its default final_sigmas_type "zero" for algorithm_type "dpmsolver" and names "sigma_min")
    "DPM-Solver 2M": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2,
                                                             "use_karras_sigmas": False, "final_sigmas_type": "sigma_min"},
                             "DPM-Solver 2M", "Automatic"),
    "DPM++ 2S": Sampler("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_karras_sigmas": False}, "DPM++ 2S", "Automatic"),
}

# kohya sd-scripts' sampler names -> ours, by the class and options get_my_scheduler gives each
KOHYA: dict[str, str] = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM-Solver 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2S",
}


def sampler_names() -> tuple[str, ...]:
    """Every name `resolve` takes: ours (A1111's), then kohya's."""
    return tuple(SAMPLERS) + tuple(KOHYA)


def resolve(name: str) -> str:
    """Our name for an A1111 or kohya sampler name (training samples take both); a ValueError naming
    the choices for any other."""
    if name in SAMPLERS:
        return name
    if name in KOHYA:
        return KOHYA[name]
    raise ValueError(f"sampler {name!r}: use one of {', '.join(repr(n) for n in SAMPLERS)}, or kohya's "
                     f"{', '.join(KOHYA)}")


def check_sampler(name) -> list[str]:
    """Problems with a sampler name (generate()'s validation, before anything loads)."""
    if name is None:
        return []
    if name not in SAMPLERS:
        return [f"sampler {name!r}: use one of {', '.join(repr(n) for n in SAMPLERS)} (empty: the model's own scheduler)"]
    needs = SAMPLERS[name].needs
    if needs and importlib.util.find_spec(needs) is None:
        return [f"sampler {name!r}: needs the {needs!r} package, which is not installed (pip install {needs}), "
                "or choose another sampler"]
    return []


def make_scheduler(name: str, scheduler):
    """The scheduler for sampler `name`, built from `scheduler`'s config (the model's betas, timestep
    count and prediction type carry over; the sampler's options override)."""
    import diffusers

    entry = SAMPLERS[name]
    return getattr(diffusers, entry.scheduler).from_config(scheduler.config, **entry.options)


def a1111_fields(name: str | None, scheduler=None) -> tuple[str, str | None]:
    """("Sampler", "Schedule type") values for the infotext. No sampler chosen: the model's own
    scheduler, named by its class (A1111 has no name for it, and reading it back keeps the model's)."""
    if name is None:
        return type(scheduler).__name__ if scheduler is not None else "unknown", None
    entry = SAMPLERS[name]
    return entry.a1111, entry.schedule


def from_a1111(sampler: str | None, schedule: str | None = None) -> str | None:
    """Our sampler name for an infotext's Sampler (+ Schedule type), or None (not one we have: the
    model's own scheduler)."""
    if not sampler:
        return None
    if sampler in SAMPLERS and not schedule:  # an older infotext: "DPM++ 2M Karras" in one field
        return sampler
    for name, entry in SAMPLERS.items():
        if entry.a1111 == sampler and entry.schedule == schedule:
            return name
    if schedule in (None, "Automatic"):  # A1111's default schedule for the sampler
        karras = f"{sampler} Karras"
        if sampler in ("DPM++ 2M", "DPM++ SDE") and karras in SAMPLERS:
            return karras
        return sampler if sampler in SAMPLERS else None
    return None
