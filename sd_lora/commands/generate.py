"""`sd-lora generate`: render an image from a base model with a weighted LoRA stack (or a weight sweep)."""

from __future__ import annotations

import re
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate an image with LoRAs (--lora FILE:W, or <lora:NAME:W> in the prompt)",
        description=(
            "Generate an image from a base model with a stack of LoRAs fused into its weights. LoRAs come "
            "from --lora FILE[:W[:TE_W]] (W = UNet weight, TE_W = text-encoder weight, default W) and from "
            "<lora:NAME:W> or <lora:NAME:TE_W:UNET_W> tags in the prompt (A1111 order), looked up in --lora-dir."
        ),
    )
    p.add_argument("--model", required=True, help="base model: diffusers folder or single .safetensors file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:TE_W]]",
                   help="a LoRA file (or a name in --lora-dir) with its UNet weight and text-encoder weight; repeatable")
    p.add_argument("--lora-dir", help="folder that <lora:NAME:...> prompt tags and --lora names are looked up in")
    p.add_argument("--add-triggers", action="store_true", help="prepend the LoRAs' trigger words (from their metadata) to the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="X",
                   help="rescale the guided prediction (0-1) so high CFG does not over-expose; default 0.7 with "
                        "--zero-terminal-snr, else 0")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="sample a zero-terminal-SNR (v-prediction) model: rescaled betas, trailing timesteps")
    p.add_argument("--vae", metavar="PATH", help="replacement VAE: a diffusers VAE folder or a single .safetensors VAE file")
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--grid", metavar="W1,W2,...",
                   help="render a weight sweep of the first LoRA (e.g. 0,0.5,1) side by side, labelled with the weights")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (CUDA with little memory)")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=run)


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_lora_arg(text: str) -> tuple[str, float, float | None]:
    """`FILE[:W[:TE_W]]` -> (file, unet weight, te weight or None). Paths may contain ':' (C:\\...)."""
    m = re.fullmatch(rf"(.+?)(?::({_NUM}))?(?::({_NUM}))?", text)
    if not m or not m[1]:
        raise ValueError(f"--lora {text!r}: expected FILE, FILE:WEIGHT or FILE:WEIGHT:TE_WEIGHT")
    return m[1], float(m[2]) if m[2] else 1.0, float(m[3]) if m[3] else None


def _lora_path(name: str, lora_dir: str | None) -> Path:
    from ..stack.prompt import resolve_lora_name

    path = Path(name)
    if path.is_file():
        return path
    if lora_dir:
        return resolve_lora_name(name, lora_dir)
    raise ValueError(f"--lora {name!r}: no such file (pass --lora-dir to use names from a LoRA folder).")


def run(args) -> int:
    import logging

    import torch

    from ..models import load_base, load_vae, use_zero_terminal_snr
    from ..stack import LoraSpec, apply_loras, prompt_to_stack
    from ..stack.grid import label_grid, save_png

    log = logging.getLogger("sd_lora.generate")
    for dim in (args.width, args.height):
        if dim is not None and (dim <= 0 or dim % 8):
            raise ValueError(f"width/height {dim} must be a positive multiple of 8")
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    rescale = args.guidance_rescale if args.guidance_rescale is not None else (0.7 if args.zero_terminal_snr else 0.0)
    if not 0 <= rescale <= 1:
        raise ValueError(f"--guidance-rescale {rescale:g}: must be between 0 and 1 (0.7 is usual)")

    specs = []
    for text in args.lora:
        name, w, te = parse_lora_arg(text)
        specs.append(LoraSpec(_lora_path(name, args.lora_dir), weight=w, te_weight=te))
    prompt, prompt_specs = prompt_to_stack(args.prompt, args.lora_dir)
    specs += prompt_specs
    sweep = None
    if args.grid:
        try:
            sweep = [float(x) for x in args.grid.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--grid {args.grid!r}: expected comma-separated weights such as 0,0.5,1") from None
        if not specs or not sweep:
            raise ValueError("--grid sweeps the weight of the first LoRA: pass at least one --lora (or <lora:...> tag) and weights")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    ]
    pipe = load_base(args.model, dtype=dtype, device="cpu" if args.cpu_offload else device)
    if args.vae:
        pipe.vae = load_vae(args.vae, pipe, dtype=dtype).to("cpu" if args.cpu_offload else device)
    if args.zero_terminal_snr:
        use_zero_terminal_snr(pipe)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)

    def render(stack, text):
        info = apply_loras(pipe, stack)
        full = text
        if args.add_triggers and info.trigger_words:
            full = ", ".join(info.trigger_words) + ", " + text
        gen = torch.Generator("cpu").manual_seed(args.seed)  # CPU generator: same image on any device
        image = pipe(
            prompt=full, negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps,
            guidance_scale=args.guidance, guidance_rescale=rescale, width=args.width, height=args.height, generator=gen,
        ).images[0]
        return image, info, full

    loras_text = " ".join(f"{Path(s.label).stem}:{s.unet_weight:g}:{s.text_encoder_weight:g}" for s in specs)
    params = (
        f"{args.prompt}\nNegative prompt: {args.negative_prompt}\nSteps: {args.steps}, CFG scale: {args.guidance}, "
        f"Seed: {args.seed}, Model: {Path(args.model).name}, LoRAs: {loras_text or 'none'}"
        + (f", Guidance rescale: {rescale:g}" if rescale else "")
        + (", Zero terminal SNR: True" if args.zero_terminal_snr else "")
        + (f", VAE: {Path(args.vae).name}" if args.vae else "")
    )
    if sweep is None:
        image, info, full = render(specs, prompt)
        if info.trigger_words:
            log.info("Trigger words: %s", ", ".join(info.trigger_words))
        save_png(image, args.out, params)
    else:
        first = specs[0]
        te_ratio = None if first.te_weight is None else (first.te_weight / first.weight if first.weight else None)
        images = []
        for w in sweep:
            swept = LoraSpec(first.path, weight=w, te_weight=None if te_ratio is None else w * te_ratio, block_weights=first.block_weights)
            image, _, _ = render([swept] + specs[1:], prompt)
            images.append(image)
        grid = label_grid(images, [f"{w:g}" for w in sweep], title=f"{Path(first.label).stem}: weight sweep, seed {args.seed}")
        save_png(grid, args.out, params + f", Grid weights: {','.join(f'{w:g}' for w in sweep)}")
    log.info("Wrote %s", args.out)
    return 0
