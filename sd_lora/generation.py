"""Text-to-image with a LoRA stack: one `generate()` that the CLI (`sd-lora generate`), the web UI's
Generate tab and Python users all call, so every front-end follows the same rules.

The rules, each written once, here:

- **Base.** A model path is loaded with `load_pipeline` (fp16 on CUDA, fp32 on the CPU unless
  `dtype` says otherwise). An already loaded pipeline (the web UI keeps one between clicks) is used
  where it is; the stack, scheduler and VAE it had are put back after the call, bit for bit, unless
  `keep_loras=True` leaves this call's stack fused (the next `apply_loras` then rewrites only what
  differs, which is what makes switching stacks in the UI cheap).
- **Stack.** `stack` entries are what `sd_lora.apply_loras` takes (`LoraSpec`, paths, `(path, w)`,
  `(path, w, te_w)`); `<lora:NAME:W>` tags in the prompt are resolved in `lora_dir` and appended to
  it. The tags are removed from the text that is encoded and kept in the PNG's prompt line.
  Each file is applied once: named more than once (a stack entry and a tag, or two tags), it keeps
  its first place and takes the weights of its last mention, so a tag (they come after the stack)
  overrides a web UI dropdown's or `--lora`'s weight; `GenerationResult.notes` says so. (Applying it
  twice, as before, silently doubled its effect.)
- **Stack line.** `stack_line` writes the stack as the front-ends show it, with only the weights
  that apply: no text-encoder weight for a UNet-only file ("ink x0.8", not "(TE x0.8)").
- **Size.** width/height 0 or None: the model's native size; otherwise a multiple of 8 (the VAE's
  downscale) and at least 64 (below that even the tiny test models have no room for their
  downsampling blocks).
- **Steps** 1..1000 (diffusers' schedulers cannot take more steps than the 1000 training timesteps).
  **Guidance** finite and >= 0 (at <= 1 diffusers skips classifier-free guidance).
- **Guidance rescale** 0..1; None means 0.7 with `zero_terminal_snr` (the value Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", use with their schedule), else 0.
- **Seeds.** Image i of a call uses `seed + i` (A1111's batch convention: each image can be
  remade alone from its own seed), drawn from a CPU generator so a seed gives the same image on any
  device.
- **Trigger words** (the LoRAs' most frequent training tags, `AppliedStack.trigger_words`) are
  always reported; `add_trigger_words=True` prepends them to the prompt. Every image of a call gets
  the same prompt, the trigger words of all its LoRAs, so the images of a sweep or comparison differ
  only in their stack.
- **Several stacks, same seeds.** `sweep_weights=[0, 0.5, 1]` renders the first LoRA of the stack at
  each weight (its text-encoder weight scaled along); `compare=True` renders the base, each LoRA
  alone and (with two or more) the whole stack. `GenerationResult.grid()` lays them out labelled.
- **CPU threads.** A UNet under 100 M parameters (the tiny demo and test models; every real SD
  UNet has several hundred million) is run on one CPU thread: its many small ops give OpenMP threads
  nothing to share, and on a busy machine they wait on each other (tiny-base, 64 px, 25 steps on a
  loaded 2-core box: 12-86 s with torch's 2 threads, 2-4 s with one). `cpu_threads` sets the count
  for any model; the previous count is put back after the call.
- **Prompts** are encoded as A1111 encodes them (sd_lora.prompts): `(word:1.2)`, `(word)`, `[word]`
  emphasis, `\(` escapes, `BREAK`, any length in 75-token chunks, the negative prompt padded to the
  prompt's chunks; `clip_skip` N reads the text encoder's Nth layer from the end (SD1/SD2; SDXL
  ignores it, as A1111 does, and the call's notes say so). The embeddings go to the pipeline as
  `prompt_embeds`; a plain prompt of up to 75 tokens gives the image the pipeline's own encoding
  gives, bit for bit. The PNG says `Clip skip: N` when N > 1 (A1111's infotext).
- **Sampler.** `sampler` is an A1111 name ("Euler a", "DPM++ 2M Karras", ...; sd_lora.samplers),
  built from the model's scheduler config for the call; None keeps the model's own scheduler.
- **PNG.** Each image carries A1111's infotext as its `parameters` text (`parameters_text`, the one
  place that writes it, in sd_lora.infotext's layout with AutoV2 model and A1111 LoRA hashes) and the
  same settings as a dict; `save_png` writes both atomically. `settings_from_infotext` reads it back
  (`sd-lora generate --from-png`).

Validation happens before anything is loaded; a problem raises ValueError naming the argument the
way both front-ends label it ("width 100: ..."), all problems of a call in one message.

The module imports no torch at import time (`sd-lora --help` imports the command module that reads
the defaults below).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from .stack.spec import LoraSpec

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0
ZERO_SNR_GUIDANCE_RESCALE = 0.7
MIN_SIZE = 64
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class GeneratedImage:
    """One image of a call, with what its PNG carries: `parameters` (the text A1111 and Civitai read)
    and `settings` (the same facts as plain values: prompt, seed, loras, size, ...)."""

    image: Image.Image
    label: str  # the variant: "" for a plain call, the weight in a sweep, "base"/name/"stack" in a comparison
    settings: dict[str, Any]
    parameters: str

    def save(self, path: str | os.PathLike) -> Path:
        """Write the PNG with its `parameters` text, atomically."""
        from .stack.grid import save_png

        save_png(self.image, path, self.parameters)
        return Path(path)


@dataclass
class GenerationResult:
    """What `generate` made: the images (variant by variant, seed by seed within a variant), the stack
    that was asked for (tags resolved), the trigger words found, and the settings of the call."""

    images: list[GeneratedImage]
    stack: list[LoraSpec]
    trigger_words: list[str]
    settings: dict[str, Any]  # the call's settings; its "loras" are the requested stack
    title: str | None = None  # the grid's title for a sweep or comparison
    labels: list[str] = field(default_factory=list)  # the variants, in order
    notes: list[str] = field(default_factory=list)  # what the user should know (duplicates merged)

    @property
    def parameters(self) -> str:
        """The `parameters` text for a grid of the whole call (the call's settings and the grid's labels)."""
        return parameters_text({**self.settings, "grid": self.labels} if len(self.labels) > 1 else self.settings)

    def grid(self) -> Image.Image:
        """The images side by side, one column per variant and one row per seed, each labelled."""
        from .stack.grid import label_grid

        per_variant = len(self.images) // max(1, len(self.labels))
        ordered = [self.images[v * per_variant + i] for i in range(per_variant) for v in range(len(self.labels))]
        seeds = per_variant > 1 or not self.labels[0]
        labels = [", ".join(x for x in (im.label, f"seed {im.settings['seed']}" if seeds else "") if x) for im in ordered]
        return label_grid([im.image for im in ordered], labels, title=self.title, columns=len(self.labels))

    def save_grid(self, path: str | os.PathLike) -> Path:
        from .stack.grid import save_png

        save_png(self.grid(), path, self.parameters)
        return Path(path)


def parameters_text(settings: dict[str, Any]) -> str:
    """The PNG `parameters` text for one image's (or a grid's) settings, in A1111's infotext layout
    (sd_lora.infotext): the prompt, a "Negative prompt:" line when there is one, then the pairs in
    A1111's order, with its Model hash (AutoV2) and Lora hashes, then ours (A1111 keeps unknown keys):
    "LoRAs" (each LoRA's name:unet_weight:te_weight[:lbw=BLOCKS], what --from-png re-applies), guidance rescale,
    zero terminal SNR, the grid's labels. The one function that writes it."""
    from . import __version__
    from .infotext import format_infotext, lora_hash_name
    from .samplers import a1111_fields

    sampler, schedule = a1111_fields(settings.get("sampler"), None)
    if settings.get("sampler") is None:
        sampler = settings.get("scheduler") or sampler  # the model's own scheduler, by its class
    loras = settings["loras"]
    width, height = settings.get("width"), settings.get("height")
    params = {
        "Steps": settings["steps"], "Sampler": sampler, "Schedule type": schedule, "CFG scale": settings["guidance"],
        "Seed": settings["seed"], "Size": f"{width}x{height}" if width and height else None,
        "Model hash": settings.get("model_hash"), "Model": settings["model"], "VAE": settings.get("vae"),
        "Clip skip": settings["clip_skip"] if (settings.get("clip_skip") or 1) > 1 else None,  # A1111: after VAE, before extras
        "Lora hashes": ", ".join(f"{lora_hash_name(x['name'])}: {x['hash']}" for x in loras if x.get("hash")) or None,
        "LoRAs": " ".join(f"{x['name']}:{_exact(x['weight'])}:{_exact(x['te_weight'])}"
                          + (f":lbw={x['block_weights']}" if x.get("block_weights") else "") for x in loras) or None,
        "Guidance rescale": _exact(settings["guidance_rescale"]) if settings["guidance_rescale"] else None,
        "Zero terminal SNR": "True" if settings["zero_terminal_snr"] else None,
        "Grid": " | ".join(settings["grid"]) if settings.get("grid") else None,
        "LoRA in training": settings.get("training"),  # a training sample's run and step (training/sampling.py)
        "Version": f"sd-lora {__version__}",
    }
    return format_infotext(settings["prompt"], settings["negative_prompt"], params)


_LORA_ITEM = re.compile(r"\s*(.+?):([-+.\deE]+):([-+.\deE]+)(?::lbw=(\S+))?(?=\s|$)")


def settings_from_infotext(text: str) -> dict[str, Any]:
    """What a `parameters` text says about the call that made it, as `generate()` keyword arguments
    (prompt, negative_prompt, seed, steps, guidance, width, height, sampler, guidance_rescale,
    zero_terminal_snr, clip_skip) plus what the caller must find itself: "loras" [(name, unet_w, te_w)] from
    our LoRAs field with "lora_block_weights" beside it (each one's block weights text, or None),
    "lora_hashes" {name: hash}, "model", "model_hash", "vae" (names, not paths), "grid" (a sweep's
    or comparison's labels: the text of a whole grid, not of one image), "training" (a training
    sample's "<output name> step N": its LoRA was the adapters in memory, not a file).

    Reads A1111's and Forge's infotexts too (sd_lora.infotext.parse_infotext follows A1111's parser):
    their LoRAs are the prompt's <lora:...> tags, which generate() resolves itself."""
    from .infotext import parse_infotext
    from .samplers import from_a1111

    res = parse_infotext(text)
    missing = [k for k in ("Steps", "Seed", "CFG scale") if k not in res]
    if missing:
        raise ValueError(f"parameters text without {', '.join(missing)}: not an A1111-style infotext")
    items = list(_LORA_ITEM.finditer(res.get("LoRAs", "")))
    loras = [(m[1], float(m[2]), float(m[3])) for m in items]
    hashes = dict(item.rsplit(": ", 1) for item in res.get("Lora hashes", "").split(", ") if ": " in item)
    return {
        "prompt": res["Prompt"], "negative_prompt": res["Negative prompt"], "seed": int(res["Seed"]),
        "steps": int(res["Steps"]), "guidance": float(res["CFG scale"]),
        "width": int(res["Size-1"]) if "Size-1" in res else None, "height": int(res["Size-2"]) if "Size-2" in res else None,
        "sampler": from_a1111(res.get("Sampler"), res.get("Schedule type")),
        "guidance_rescale": float(res["Guidance rescale"]) if "Guidance rescale" in res else None,
        "zero_terminal_snr": res.get("Zero terminal SNR") == "True",
        "clip_skip": int(res["Clip skip"]) if res.get("Clip skip", "").isdigit() else None,
        "loras": loras, "lora_block_weights": [m[4] for m in items], "lora_hashes": hashes,
        "model": res.get("Model"), "model_hash": res.get("Model hash"), "vae": res.get("VAE"), "grid": res.get("Grid"),
        "training": res.get("LoRA in training"),
    }


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype, device: str):
    """"fp32" / "fp16" / "bf16" / a torch dtype / None (fp16 on CUDA, fp32 elsewhere) -> torch dtype."""
    import torch

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return names[dtype]


def load_pipeline(model: str | os.PathLike, *, dtype=None, device: str | None = None, cpu_offload: bool = False,
                  vae: str | os.PathLike | None = None):
    """Load a base model for generation: `sd_lora.load_base` with generation's defaults (CUDA when
    available, fp16 there and fp32 on the CPU), an optional replacement VAE, no progress bars, and
    `enable_model_cpu_offload()` last with `cpu_offload` (the VAE must be in place before the hooks)."""
    from .models import load_base, load_vae

    device = device or default_device()
    dt = torch_dtype(dtype, device)
    where = "cpu" if cpu_offload else device
    pipe = load_base(model, dtype=dt, device=where)
    if vae:
        pipe.vae = load_vae(vae, pipe, dtype=dt).to(where)
    if cpu_offload:
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    # single files leave the name empty; the PNG's "Model:" comes from it when the pipeline is passed in
    pipe.register_to_config(_name_or_path=str(model))
    return pipe


def resolve_stack(prompt: str, stack=None, lora_dir: str | os.PathLike | None = None) -> tuple[str, list[LoraSpec], list[str]]:
    """(prompt without `<lora:...>` tags, `stack` normalised + the tags' LoRAs resolved in `lora_dir`,
    each file once (`merge_duplicates`), and the notes on the duplicates merged)."""
    from .stack.prompt import parse_lora_prompt, prompt_to_stack
    from .stack.spec import normalize_stack

    specs = normalize_stack(stack)
    clean, tagged = prompt_to_stack(prompt, lora_dir)
    tags = [t.tag for t in parse_lora_prompt(prompt)[1]]  # the same tags, in the same order
    merged, notes = merge_duplicates([(f"stack {_weights_text(s)}", s) for s in specs] + list(zip(tags, tagged)))
    return clean, merged, notes


def merge_duplicates(named: list[tuple[str, LoraSpec]]) -> tuple[list[LoraSpec], list[str]]:
    """(stack with each file once, notes): `named` is (where it was named, spec) in stack order; a file
    named again keeps its first place and takes the weights of its last mention."""
    from .formats.lora_file import LoraFile

    order, last, where = [], {}, {}
    for text, spec in named:
        key = id(spec.path) if isinstance(spec.path, LoraFile) else os.path.normcase(Path(spec.path).resolve())
        if key not in last:
            order.append(key)
        last[key] = spec
        where.setdefault(key, []).append(text)
    notes = [f"{_name(last[k])} is named {len(where[k])} times ({', '.join(where[k])}): applied once, with the weights "
             f"of the last ({where[k][-1]})" for k in order if len(where[k]) > 1]
    return [last[k] for k in order], notes


def stack_line(loras: list[dict]) -> str:
    """A call's `settings["loras"]` as the front-ends show them: "ink x0.8, glow x1 (TE x0.5)". The
    text-encoder weight only where the file has a text-encoder part and it differs from the UNet
    weight; a file with only a text-encoder part shows "TE x..." alone."""
    parts = []
    for x in loras:
        unet, te = "unet" in x["parts"], "text_encoder" in x["parts"]
        blocks = f" lbw={x['block_weights']}" if unet and x.get("block_weights") else ""
        if te and not unet:
            parts.append(f"{x['name']} TE x{x['te_weight']:g}")
        elif te and x["te_weight"] != x["weight"]:
            parts.append(f"{x['name']} x{x['weight']:g}{blocks} (TE x{x['te_weight']:g})")
        else:
            parts.append(f"{x['name']} x{x['weight']:g}{blocks}")
    return ", ".join(parts) or "none"


def sweep_variants(stack: list[LoraSpec], weights: Sequence[float]) -> list[tuple[str, list[LoraSpec]]]:
    """The first LoRA of `stack` at each weight (its text-encoder weight keeps its ratio to the UNet
    weight), the rest of the stack as it is; labelled with the weights."""
    from .stack.spec import LoraSpec

    first = stack[0]
    ratio = None if first.te_weight is None else (first.te_weight / first.weight if first.weight else None)
    return [
        (f"{w:g}", [LoraSpec(first.path, weight=w, te_weight=None if ratio is None else w * ratio,
                             block_weights=first.block_weights)] + stack[1:])
        for w in weights
    ]


def compare_variants(stack: list[LoraSpec]) -> list[tuple[str, list[LoraSpec]]]:
    """The base, each LoRA alone, and the whole stack when it has two or more LoRAs."""
    return [("base", [])] + [(_name(s), [s]) for s in stack] + ([("stack", stack)] if len(stack) > 1 else [])


def generate(
    base,
    prompt: str,
    stack=None,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    guidance_rescale: float | None = None,
    zero_terminal_snr: bool = False,
    sampler: str | None = None,
    clip_skip: int | None = None,
    vae: str | os.PathLike | None = None,
    lora_dir: str | os.PathLike | None = None,
    add_trigger_words: bool = False,
    num_images: int = 1,
    sweep_weights: Sequence[float] | None = None,
    compare: bool = False,
    keep_loras: bool = False,
    dtype=None,
    device: str | None = None,
    cpu_offload: bool = False,
    cpu_threads: int | None = None,
    strict: bool = True,
    render: bool = True,
) -> GenerationResult:
    """Generate images from `base` (a model path or a loaded diffusers pipeline) with a LoRA stack.

    Args:
        base: a diffusers folder or single .safetensors file (loaded with `load_pipeline`, using
            `dtype` "fp32"/"fp16"/"bf16", `device` and `cpu_offload`), or a pipeline from
            `sd_lora.load_base`, or a function returning one, called after the arguments are checked
            (the web UI's cached loader); with a pipeline, dtype/device/cpu_offload must be left out.
        prompt: the text; `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>` tags add LoRAs from `lora_dir`.
        stack: LoRA specs, paths or (path, unet_weight[, te_weight[, block_weights]]) tuples, as `apply_loras` takes.
        negative_prompt, seed, width, height, steps, guidance: as in A1111; see the module docstring.
        guidance_rescale: 0..1; None is 0.7 with `zero_terminal_snr`, else 0.
        zero_terminal_snr: sample with rescaled betas and trailing timesteps (v-prediction models only).
        sampler: an A1111 sampler name from sd_lora.samplers.SAMPLERS ("Euler a", "DPM++ 2M Karras", ...);
            None: the model's own scheduler.
        clip_skip: A1111's "Clip skip" (kohya's --clip_skip): condition on the text encoder's Nth layer
            from the end; None or 1: the last layer. SD1/SD2 only (SDXL ignores it, as A1111 does).
        vae: a replacement VAE (diffusers folder or single file) for this call.
        add_trigger_words: prepend the LoRAs' trigger words to the prompt.
        num_images: images per stack, with seeds seed, seed+1, ...
        sweep_weights / compare: several stacks with the same seeds (see the module docstring).
        keep_loras: leave the stack fused in a loaded pipeline instead of putting back its previous one.
        cpu_threads: torch CPU threads for the call; None: one for a small UNet on the CPU, else torch's count.
        strict: refuse a LoRA with modules that fit no layer of the base (made for another model);
            False applies the modules that fit and logs the rest (CLI: --skip-mismatched).
        render: False checks and resolves everything and returns the result without images (its
            settings are the call's; `render_batch` renders such results together). The service
            (sd_lora.serve) checks a request this way before it is queued.

    Returns a GenerationResult; nothing is written to disk (use `.images[i].save(path)` or `.save_grid(path)`).
    """
    from .samplers import check_sampler

    problems = _check(prompt, seed, width, height, steps, guidance, guidance_rescale, num_images, sweep_weights, compare)
    if cpu_threads is not None and (not _whole(cpu_threads) or cpu_threads < 1):
        problems.append(f"cpu threads {_show(cpu_threads)}: must be a whole number, at least 1 (empty: automatic)")
    problems += check_sampler(sampler)
    if clip_skip is not None and (not _whole(clip_skip) or clip_skip < 1):
        problems.append(f"clip skip {_show(clip_skip)}: must be a whole number, at least 1 (1: the last layer; 2 is usual for anime SD1 models)")
    is_path = isinstance(base, (str, os.PathLike))
    loaded = not is_path  # a pipeline, or a function that returns one
    if loaded:
        given = [name for name, v in (("dtype", dtype), ("device", device), ("cpu_offload", cpu_offload)) if v]
        if given:
            problems.append(f"{', '.join(given)}: only for a model path; a loaded pipeline is used where it is "
                            "(move it with pipe.to(...) or load it with sd_lora.generation.load_pipeline)")
    elif isinstance(dtype, str) and dtype not in DTYPES:
        problems.append(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if is_path and not Path(base).exists():
        problems.append(f"base model {str(base)!r}: no such file or folder; pass a diffusers folder or a .safetensors file")
    if problems:
        raise ValueError("; ".join(problems))
    rescale = _guidance_rescale(guidance_rescale, zero_terminal_snr)
    clean, specs, notes = resolve_stack(prompt, stack, lora_dir)
    if sweep_weights is not None:
        if not specs:
            raise ValueError("weight sweep: it sweeps the first LoRA of the stack; add a LoRA (or a <lora:...> tag)")
        variants = sweep_variants(specs, [float(w) for w in sweep_weights])
        title = f"{_name(specs[0])}: weight sweep, seed {int(seed)}"
    elif compare:
        variants, title = compare_variants(specs), f"base, each LoRA alone{' and the stack' if len(specs) > 1 else ''}, seed {int(seed)}"
    else:
        variants, title = [("", specs)], None
    trigger_words = _trigger_words([s for _, v in variants for s in v])
    triggers = trigger_words if add_trigger_words else []
    encoded = ", ".join(triggers + ([clean] if clean else []))  # a prompt of tags alone leaves no text
    written = ", ".join(triggers + [prompt])

    if is_path:
        pipe = load_pipeline(base, dtype=dtype, device=device, cpu_offload=cpu_offload, vae=vae)
    else:
        pipe = base if hasattr(base, "unet") else base()  # a loader is called only once the arguments are good
    settings = {
        "prompt": written, "encoded_prompt": encoded, "negative_prompt": negative_prompt or "",
        "seed": int(seed), "steps": int(steps), "guidance": float(guidance), "guidance_rescale": rescale,
        "zero_terminal_snr": bool(zero_terminal_snr), "width": int(width or 0) or None, "height": int(height or 0) or None,
        **model_settings(base, pipe), "vae": Path(vae).name if vae else None,
        "loras": _loras(specs), "sampler": sampler, "scheduler": type(pipe.scheduler).__name__,
        "clip_skip": int(clip_skip) if clip_skip else None,
    }
    if settings["clip_skip"] and settings["clip_skip"] > 1 and getattr(pipe, "text_encoder_2", None) is not None:
        notes.append(f"clip skip {settings['clip_skip']}: SDXL ignores clip skip (as A1111 does): both text encoders' "
                     "penultimate layers are read")
    if not render:
        return GenerationResult(images=[], stack=specs, trigger_words=trigger_words, settings=settings,
                                title=title, labels=[label for label, _ in variants], notes=notes)
    with _threads(cpu_threads or generation_threads(pipe)):
        images = _render(pipe, variants, settings, int(num_images), vae if loaded else None, keep_loras, strict)
    return GenerationResult(images=images, stack=specs, trigger_words=trigger_words, settings=settings,
                            title=title, labels=[label for label, _ in variants], notes=notes)


def _render(pipe, variants, settings: dict, num_images: int, vae, keep_loras: bool, strict: bool = True) -> list[GeneratedImage]:
    """Each variant's stack fused in turn, `num_images` seeds each; the pipeline's stack, scheduler
    and VAE put back afterwards (also on an error)."""
    import torch

    from .models import load_vae, use_zero_terminal_snr
    from .prompts import pipeline_prompt_kwargs
    from .samplers import make_scheduler
    from .stack import applied_stack, apply_loras, remove_loras

    previous = applied_stack(pipe)
    scheduler, old_vae = pipe.scheduler, pipe.vae
    out: list[GeneratedImage] = []
    try:
        if settings["sampler"]:  # before zero terminal SNR, which rescales the chosen scheduler's betas
            pipe.scheduler = make_scheduler(settings["sampler"], scheduler)
        if settings["zero_terminal_snr"]:
            use_zero_terminal_snr(pipe)
        if vae:
            pipe.vae = load_vae(vae, pipe, dtype=old_vae.dtype).to(old_vae.device)
        for label, stack in variants:
            apply_loras(pipe, stack, strict=strict)
            # encoded with this variant's stack fused (a LoRA may change the text encoder)
            embeds = pipeline_prompt_kwargs(pipe, settings["encoded_prompt"], settings["negative_prompt"], settings["clip_skip"])
            for i in range(num_images):
                seed = settings["seed"] + i
                generator = torch.Generator("cpu").manual_seed(seed)  # a CPU generator: the same image on any device
                image = pipe(
                    **embeds, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                    guidance_rescale=settings["guidance_rescale"], width=settings["width"], height=settings["height"],
                    generator=generator,
                ).images[0]
                out.append(_image(image, settings, seed, stack, label))
    finally:
        pipe.scheduler, pipe.vae = scheduler, old_vae
        if not keep_loras:
            if previous:
                # It was applied once, maybe with strict=False: non-strict puts back exactly that stack.
                apply_loras(pipe, previous, strict=False)
            else:
                remove_loras(pipe)
    return out


def _image(image, settings: dict, seed: int, stack: list[LoraSpec], label: str) -> GeneratedImage:
    """One rendered image with its own settings (its seed, stack and size) and PNG text."""
    own = {**settings, "seed": seed, "loras": _loras(stack), "label": label, "width": image.width, "height": image.height}
    return GeneratedImage(image=image, label=label, settings=own, parameters=parameters_text(own))


BATCH_KEYS = ("steps", "guidance", "guidance_rescale", "width", "height", "loras", "clip_skip")  # what one pipeline call shares


def render_batch(pipe, calls: list[tuple[GenerationResult, int]], *, strict: bool = True) -> None:
    """Render several `generate(pipe, ..., render=False)` results in ONE pipeline call and fill in their
    images: `calls` is (result, number of images) pairs, each image i of a result with seed + i as in
    `generate`. Their stack is left fused in `pipe`.

    They must share a plain single stack (no sweep or comparison), the values of BATCH_KEYS, and use the
    model's own scheduler, VAE and no zero terminal SNR. Each image keeps its own CPU generator, so its
    starting noise is the one `generate` draws for its seed; what differs from rendering it alone is
    the arithmetic of batched kernels: the images agree to within float rounding, not bit for bit
    (sd_lora.serve states and tests the tolerance). Used by the service to batch requests."""
    import torch

    from .prompts import pipeline_prompt_kwargs
    from .stack import apply_loras

    results = [r for r, _ in calls]
    first = results[0].settings
    for r in results:
        s = r.settings
        if len(r.labels) != 1 or s["sampler"] or s["zero_terminal_snr"] or s["vae"] or r.images:
            raise ValueError("render_batch: only plain single-stack results of render=False, with the model's own "
                             "scheduler and VAE")
        if any(s[k] != first[k] for k in BATCH_KEYS):
            raise ValueError(f"render_batch: the results differ in {[k for k in BATCH_KEYS if s[k] != first[k]]}")
    seeds = [(r, r.settings["seed"] + i) for r, n in calls for i in range(n)]
    with _threads(generation_threads(pipe)):
        apply_loras(pipe, results[0].stack, strict=strict)
        # each result's prompt encoded once, as `generate` encodes it (emphasis, long prompts, clip skip),
        # with the stack fused; then repeated for its images
        per_result = [pipeline_prompt_kwargs(pipe, r.settings["encoded_prompt"], r.settings["negative_prompt"],
                                             r.settings["clip_skip"]) for r in results]
        if len({e["prompt_embeds"].shape for e in per_result}) > 1:
            raise ValueError("render_batch: the prompts encode to different numbers of 75-token chunks; render them apart")
        embeds = {k: torch.cat([e[k] for e, (_, n) in zip(per_result, calls) for _ in range(n)]) for k in per_result[0]}
        images = pipe(
            **embeds, num_inference_steps=first["steps"], guidance_scale=first["guidance"],
            guidance_rescale=first["guidance_rescale"], width=first["width"], height=first["height"],
            generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in seeds],
        ).images
    for (r, seed), image in zip(seeds, images):
        r.images.append(_image(image, r.settings, seed, r.stack, ""))


def generation_threads(pipe) -> int | None:
    """The CPU thread count `generate` uses for `pipe` when not told (models.default_cpu_threads:
    1 for a small UNet on the CPU, None otherwise)."""
    from .models import default_cpu_threads

    device = getattr(pipe, "_execution_device", None) or pipe.device  # offloaded pipelines run on their GPU
    return default_cpu_threads(pipe.unet, device)


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op CPU threads set to `n` for the block (None: left alone), then put back."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(prompt, seed, width, height, steps, guidance, rescale, num_images, sweep, compare) -> list[str]:
    problems = []
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("prompt: empty; type what to draw")
    for name, value in (("width", width), ("height", height)):
        if value is None or value == 0:
            continue
        if not _whole(value) or value < MIN_SIZE or value % 8:
            problems.append(f"{name} {_show(value)}: must be a multiple of 8, at least {MIN_SIZE} (0: the model's native size)")
    if not _whole(steps) or not 1 <= steps <= MAX_STEPS:
        problems.append(f"steps {_show(steps)}: must be a whole number from 1 to {MAX_STEPS}")
    if not _whole(seed) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed {_show(seed)}: must be a whole number from 0 to 2^63-1")
    if not _whole(num_images) or num_images < 1:
        problems.append(f"number of images {_show(num_images)}: must be a whole number, at least 1")
    if not _finite(guidance) or guidance < 0:
        problems.append(f"guidance {_show(guidance)}: must be a number >= 0 (7 is usual; <= 1 turns classifier-free guidance off)")
    if rescale is not None and (not _finite(rescale) or not 0 <= rescale <= 1):
        problems.append(f"guidance rescale {_show(rescale)}: must be between 0 and 1 (0.7 is usual with zero terminal SNR)")
    if sweep is not None:
        if compare:
            problems.append("weight sweep and compare: choose one")
        if not len(sweep) or not all(_finite(w) for w in sweep):
            problems.append(f"weight sweep {list(sweep)}: give one or more weights, such as 0, 0.5, 1")
    return problems


def _show(value) -> str:
    """A value as the user typed it: 64 not 64.0 (the web UI's number boxes send floats)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:g}" if _finite(value) else repr(value)


def _whole(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _guidance_rescale(value: float | None, zero_terminal_snr: bool) -> float:
    if value is None:
        return ZERO_SNR_GUIDANCE_RESCALE if zero_terminal_snr else 0.0
    return float(value)


def _name(spec: LoraSpec) -> str:
    return Path(spec.label).stem


def _weights_text(spec: LoraSpec) -> str:
    te = spec.text_encoder_weight
    return f"x{spec.unet_weight:g}" + (f" (TE x{te:g})" if te != spec.unet_weight else "")


def _loras(stack: list[LoraSpec]) -> list[dict]:
    from .stack.block_weights import normalize_block_weights

    # the weights before block weights (whose BASE would otherwise scale the text encoder twice on --from-png)
    return [{"name": _name(s), "file": s.label, "weight": s.unet_weight,
             "te_weight": float(s.weight if s.te_weight is None else s.te_weight),
             "block_weights": None if s.block_weights is None else normalize_block_weights(s.block_weights),
             "parts": _parts(s), "hash": _lora_hash(s)} for s in stack]


def _lora_hash(spec: LoraSpec) -> str | None:
    """A1111's LoRA hash of the file (None for a LoRA given in memory: there are no file bytes)."""
    from .infotext import lora_hash

    return lora_hash(spec.path) if isinstance(spec.path, (str, os.PathLike)) and Path(spec.path).is_file() else None


def _exact(weight: float) -> str:
    """A weight written short when that reads back as the same float (0.8), else in full (0.8500000000000001
    from a slider), so that --from-png fuses exactly the same weights."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


def _parts(spec: LoraSpec) -> list[str]:
    """Which models the file changes: "unet" and/or "text_encoder" (from its kohya module names)."""
    from .formats.lora_file import LoraFile
    from .network.naming import TE_PREFIXES, UNET_PREFIX
    from .stack import default_cache

    lora = spec.path if isinstance(spec.path, LoraFile) else default_cache().get(spec.path)[1]
    te_prefixes = tuple(prefix for family in TE_PREFIXES.values() for prefix in family.values())
    return [part for part, prefixes in (("unet", (UNET_PREFIX,)), ("text_encoder", te_prefixes))
            if any(name.startswith(prefixes) for name in lora.modules)]


def model_settings(base, pipe) -> dict[str, str | None]:
    """The "model" and "model_hash" settings (the infotext's Model and Model hash) of a base given as a
    path, or of a pipeline that says where it came from (base None or a pipeline)."""
    return {"model": model_name(base, pipe), "model_hash": _model_hash(base, pipe)}


def model_name(base, pipe=None) -> str:
    """A1111's "Model": the checkpoint's file name without its extension (a folder: its name)."""
    source = base if isinstance(base, (str, os.PathLike)) else pipe.name_or_path
    if not source:
        return "unknown"
    path = Path(str(source))
    return path.stem if path.suffix.lower() in (".safetensors", ".ckpt") else path.name


def _model_hash(base, pipe) -> str | None:
    """AutoV2 of the model file (or our hash of a diffusers folder, sd_lora.infotext.model_hash); None
    for a pipeline that does not say where it came from."""
    from .infotext import model_hash

    source = base if isinstance(base, (str, os.PathLike)) else getattr(pipe, "name_or_path", None)
    return model_hash(source) if source and Path(str(source)).exists() else None


def _trigger_words(specs: list[LoraSpec]) -> list[str]:
    """The trigger words `apply_loras` would report for all of `specs` (the stack loader's rule, asked
    of an AppliedStack built from the files read through its cache, which apply_loras then hits)."""
    from .formats.lora_file import LoraFile
    from .stack import AppliedStack, default_cache

    if not specs:
        return []
    files = [s.path if isinstance(s.path, LoraFile) else default_cache().get(s.path)[1] for s in specs]
    return AppliedStack(specs=specs, files=files, modules=0, changed=0).trigger_words
