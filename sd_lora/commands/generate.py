"""`sd-lora generate`: render an image from a base model with a weighted LoRA stack (or a weight sweep).

Thin: it parses its own syntax (--lora FILE:W:TE_W, --grid W1,W2,...) and calls sd_lora.generate,
which owns every rule (sizes, steps, defaults, trigger words, the PNG text), shared with the web UI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Torch-free: the defaults and limits are generate()'s own (sd-lora --help imports this module).
from ..generation import DEFAULT_GUIDANCE, DEFAULT_STEPS, DTYPES, MAX_STEPS, MIN_SIZE, ZERO_SNR_GUIDANCE_RESCALE
from ..samplers import SAMPLERS

# With --from-png these come from the PNG unless given on the command line (a value other than the default).
FROM_PNG_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale",
                     "zero_terminal_snr", "sampler", "width", "height", "clip_skip")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate an image with LoRAs (--lora FILE:W, or <lora:NAME:W> in the prompt)",
        description=(
            "Generate an image from a base model with a stack of LoRAs fused into its weights. LoRAs come "
            "from --lora FILE[:W[:TE_W]][:lbw=BLOCKS] (W = UNet weight, TE_W = text-encoder weight, default W; "
            "BLOCKS = a LoRA Block Weight preset such as OUTD or a vector 1,0,0,...) and from "
            "<lora:NAME:W> or <lora:NAME:TE_W:UNET_W[:lbw=BLOCKS]> tags in the prompt (A1111 order), looked up "
            "in --lora-dir. See docs/stack.md for the block table."
        ),
    )
    p.add_argument("--model", required=True, help="base model: diffusers folder or single .safetensors file")
    p.add_argument("--prompt", help="the text (required unless --from-png gives it)")
    p.add_argument("--from-png", metavar="FILE",
                   help="remake an image from the `parameters` text of a PNG written by sd-lora (or A1111/Forge): "
                        "its prompt, seed, steps, sampler, size and LoRAs (looked up by name in --lora-dir, checked "
                        "against their hashes); flags given as well override the PNG's values")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:TE_W]][:lbw=BLOCKS]",
                   help="a LoRA file (or a name in --lora-dir) with its UNet weight, text-encoder weight and block "
                        "weights (lbw=OUTD, lbw=1,0,0,... or sdnext's in=X:mid=Y:out=Z); repeatable")
    p.add_argument("--lora-dir", help="folder that <lora:NAME:...> prompt tags and --lora names are looked up in")
    p.add_argument("--add-triggers", action="store_true", help="prepend the LoRAs' trigger words (from their metadata) to the prompt")
    p.add_argument("--seed", type=int, default=0, help="image i of --num-images uses seed + i (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help="images per stack, written as OUT-<seed>.png when N > 1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps, 1-{MAX_STEPS} (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="X",
                   help="rescale the guided prediction (0-1) so high CFG does not over-expose; default "
                        f"{ZERO_SNR_GUIDANCE_RESCALE} with --zero-terminal-snr, else 0")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="sample a zero-terminal-SNR (v-prediction) model: rescaled betas, trailing timesteps")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, metavar="NAME",
                   help=f"sampler by its A1111 name: {', '.join(SAMPLERS)} (default: the model's own scheduler)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="A1111's Clip skip: condition on the text encoder's Nth layer from the end (2 for most anime "
                        "SD1 models; SDXL ignores it) (default: 1, the last layer)")
    p.add_argument("--vae", metavar="PATH", help="replacement VAE: a diffusers VAE folder or a single .safetensors VAE file")
    p.add_argument("--width", type=int, default=None, help=f"multiple of 8, at least {MIN_SIZE} (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help=f"multiple of 8, at least {MIN_SIZE} (default: the model's native size)")
    p.add_argument("--grid", metavar="W1,W2,...",
                   help="render a weight sweep of the first LoRA (e.g. 0,0.5,1) side by side, labelled with the weights")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (CUDA with little memory)")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 for a tiny model on the CPU, where more threads only wait "
                        "on each other; otherwise torch's count)")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="apply only the LoRA modules that fit the base model's layers (for a LoRA made for another base)")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=run, prepare_process=without_bitsandbytes, parser=p)


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OPTION = re.compile(r"(.*):(lbw|in|mid|out)=([^:]*)", re.IGNORECASE)  # a trailing :key=value


def parse_lora_arg(text: str) -> tuple[str, float, float | None]:
    """`FILE[:W[:TE_W]]` -> (file, unet weight, te weight or None), for callers without block weights."""
    name, unet, te, blocks = parse_lora_option(text)
    if blocks is not None:
        raise ValueError(f"--lora {text!r}: block weights (lbw=, in=/mid=/out=) are not taken here")
    return name, unet, te


def parse_lora_option(text: str) -> tuple[str, float, float | None, str | None]:
    """`FILE[:W[:TE_W]][:lbw=PRESET_OR_VECTOR]` (or sdnext's `:in=X:mid=Y:out=Z`) -> (file, unet
    weight, te weight or None, canonical block weights or None). Paths may contain ':' (C:\\...)."""
    from ..stack.block_weights import block_options

    rest, options = text, {}
    while (opt := _OPTION.fullmatch(rest)) is not None:
        rest, key = opt[1], opt[2].lower()
        if key in options:
            raise ValueError(f"--lora {text!r}: {key}= given twice")
        options[key] = opt[3]
    m = re.fullmatch(rf"(.+?)(?::({_NUM}))?(?::({_NUM}))?", rest)
    if not m or not m[1]:
        raise ValueError(f"--lora {text!r}: expected FILE, FILE:WEIGHT or FILE:WEIGHT:TE_WEIGHT, then optionally "
                         ":lbw=PRESET or :lbw=1,0,... (block weights)")
    numbers = {}
    for key in ("in", "mid", "out"):
        if key in options:
            try:
                numbers[key] = float(options[key])
            except ValueError:
                raise ValueError(f"--lora {text!r}: {key}={options[key]!r} is not a number") from None
    unet = float(m[2]) if m[2] else 1.0
    te = float(m[3]) if m[3] else None
    if numbers and te is None:
        te = unet  # the UNet weight becomes 1 below; the text encoder keeps W, as in a prompt tag
    unet, blocks = block_options(unet, options.get("lbw"), numbers.get("in"), numbers.get("mid"), numbers.get("out"),
                                 where=f"--lora {text!r}: lbw")
    return m[1], unet, te, blocks


def _lora_path(name: str, lora_dir: str | None) -> Path:
    from ..stack.prompt import resolve_lora_name

    path = Path(name)
    if path.is_file():
        return path
    if lora_dir:
        return resolve_lora_name(name, lora_dir)
    raise ValueError(f"--lora {name!r}: no such file (pass --lora-dir to use names from a LoRA folder).")


def without_bitsandbytes() -> None:
    """Keep bitsandbytes out of this process: diffusers imports it whenever it is installed, and with
    it torch's compiler stack (~2.5 of the ~14 CPU seconds of a 64 px tiny-base image on a 2-core
    box), though generation never quantizes. A None in sys.modules makes `find_spec` report the
    package missing, so diffusers, transformers and peft skip it. Only when `sd-lora generate` is the
    process (cli.main calls it then, not for main([...]) from Python): the web UI and training check
    and use bitsandbytes (8-bit optimizers, nf4 bases)."""
    sys.modules.setdefault("bitsandbytes", None)  # already imported (the caller uses it): leave it


def _from_png(args, log) -> tuple[dict, list]:
    """The settings of the PNG's `parameters` text (flags that differ from their defaults win) and its
    LoRA stack, each found by name in --lora-dir and checked against the hash the PNG recorded."""
    from ..generation import settings_from_infotext
    from ..infotext import lora_hash, lora_hash_name, model_hash, read_png_infotext
    from ..stack import LoraSpec

    png = settings_from_infotext(read_png_infotext(args.from_png))
    if png["grid"]:
        raise ValueError(f"--from-png: {args.from_png} is a grid ({png['grid']}); remake it with its own flags "
                         "(--grid W1,W2,...), or pass one of its images' PNGs")
    chosen = {k: getattr(args, k) if getattr(args, k) != args.parser.get_default(k) else png[k] for k in FROM_PNG_SETTINGS}
    if png["training"]:
        log.warning("Note: %s is a training sample (%s): its LoRA was the adapters in memory at that step; "
                    "add --lora with the file saved at that step to come close", args.from_png, png["training"])
    if png["vae"] and not args.vae:
        raise ValueError(f"--from-png: the image was made with the VAE {png['vae']!r}; pass it with --vae PATH")
    if png["model_hash"] and model_hash(args.model) != png["model_hash"]:
        log.warning("Warning: --model %s has hash %s, the PNG's model %s had %s: the image will differ",
                    args.model, model_hash(args.model), png["model"], png["model_hash"])
    if png["loras"] and not args.lora_dir:
        names = ", ".join(name for name, _, _ in png["loras"])
        raise ValueError(f"--from-png: the image used the LoRAs {names}; pass --lora-dir with the folder that holds them")
    specs = []
    for (name, weight, te_weight), blocks in zip(png["loras"], png["lora_block_weights"]):
        path = _lora_path(name, args.lora_dir)
        recorded = png["lora_hashes"].get(lora_hash_name(name))
        if recorded and lora_hash(path) != recorded:
            log.warning("Warning: LoRA %s has hash %s, the PNG's had %s: the image will differ", path, lora_hash(path), recorded)
        specs.append(LoraSpec(path, weight=weight, te_weight=te_weight, block_weights=blocks))
    return chosen, specs


def run(args) -> int:
    """Parse the CLI's own syntax (--lora FILE:W:TE_W, --grid W1,W2), call sd_lora.generate, write the PNGs."""
    import logging

    from ..generation import generate
    from ..logs import quiet_libraries
    from ..stack import LoraSpec

    quiet_libraries(getattr(args, "verbose", False))  # no "Loading pipeline components" bar: our own lines say it
    log = logging.getLogger("sd_lora.generate")
    specs = []
    for text in args.lora:
        name, w, te, blocks = parse_lora_option(text)
        specs.append(LoraSpec(_lora_path(name, args.lora_dir), weight=w, te_weight=te, block_weights=blocks))
    sweep = None
    if args.grid:
        try:
            sweep = [float(x) for x in args.grid.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--grid {args.grid!r}: expected comma-separated weights such as 0,0.5,1") from None

    chosen = {k: getattr(args, k) for k in FROM_PNG_SETTINGS}
    if args.from_png:
        chosen, png_specs = _from_png(args, log)
        specs = png_specs + specs
    elif not args.prompt:
        raise ValueError("--prompt: required (or --from-png FILE to take it, and the other settings, from a PNG)")
    result = generate(
        args.model, chosen["prompt"], specs, negative_prompt=chosen["negative_prompt"], seed=chosen["seed"],
        width=chosen["width"], height=chosen["height"], steps=chosen["steps"], guidance=chosen["guidance"],
        guidance_rescale=chosen["guidance_rescale"], zero_terminal_snr=chosen["zero_terminal_snr"],
        sampler=chosen["sampler"], clip_skip=chosen["clip_skip"], vae=args.vae, lora_dir=args.lora_dir,
        add_trigger_words=args.add_triggers, num_images=args.num_images, sweep_weights=sweep,
        dtype=args.dtype, device=args.device, cpu_offload=args.cpu_offload, cpu_threads=args.cpu_threads,
        strict=not args.skip_mismatched,
    )
    for note in result.notes:
        # a PNG's LoRAs field lists the prompt's tags too, so each tag is named twice by construction
        if not args.from_png:
            log.warning("Note: %s", note)
    if result.trigger_words:
        log.info("Trigger words: %s", ", ".join(result.trigger_words))
    out = Path(args.out)
    if sweep is not None:
        result.save_grid(out)
        written = [out]
    elif len(result.images) == 1:
        written = [result.images[0].save(out)]
    else:  # out.png -> out-<seed>.png, one file per seed
        written = [im.save(out.with_name(f"{out.stem}-{im.settings['seed']}{out.suffix}")) for im in result.images]
    for path in written:
        log.info("Wrote %s", path)
    return 0
