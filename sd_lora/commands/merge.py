"""`sd-lora merge`: combine weighted LoRAs into one LoRA (exact or SVD to a rank), or bake them into a
base model checkpoint (--into-model)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge LoRAs into one LoRA, or into a base model checkpoint (--into-model)",
        description=(
            "Without --into-model: combine the LoRAs into one LoRA file. Exact by default (the ranks add up and the "
            "result applies exactly like the stack); --rank R splits each module by SVD to rank R and reports the "
            "error. With --into-model BASE: apply the stack to BASE and save a full checkpoint, one original-layout "
            ".safetensors (A1111/ComfyUI) or a diffusers folder when --out does not end in .safetensors."
        ),
    )
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:W[:TE_W]]",
                   help="a LoRA with its UNet weight and text-encoder weight (default 1, TE_W default W); repeatable")
    p.add_argument("--lora-dir", help="folder that --lora names (without a path) are looked up in")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder for a diffusers checkpoint with --into-model)")
    p.add_argument("--into-model", metavar="BASE", help="bake the LoRAs into this base model (diffusers folder or single file)")
    p.add_argument("--config-from", help="with --into-model: diffusers folder with configs for a non-standard single file")
    p.add_argument("--rank", type=int, help="LoRA merge: SVD to this rank (default: exact, ranks add up)")
    p.add_argument("--conv-rank", type=int, help="LoRA merge: SVD rank for 3x3 conv modules (default --rank)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="weights in the output (default: fp16 for LoRAs, the base model's dtype for --into-model)")
    p.add_argument("--no-strict", action="store_true", help="skip LoRA modules that match no layer instead of failing")
    p.add_argument("--per-module", action="store_true", help="print each module's rank and error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def lora_file(name: str, lora_dir: str | None) -> Path:
    """A --lora argument's file: a path, a path without .safetensors, or a name in --lora-dir."""
    path = Path(name)
    if path.is_file() or path.is_dir():
        return path
    if path.with_name(path.name + ".safetensors").is_file():
        return path.with_name(path.name + ".safetensors")
    if lora_dir:
        from ..stack.prompt import resolve_lora_name

        return resolve_lora_name(name, lora_dir)
    raise ValueError(f"--lora {name!r}: no such file (pass --lora-dir to use names from a LoRA folder).")


def run(args) -> int:
    from ..stack import LoraSpec
    from .generate import parse_lora_option

    specs = []
    for text in args.lora:
        name, w, te, blocks = parse_lora_option(text)  # block weights: --into-model only (merge_loras refuses them)
        specs.append(LoraSpec(lora_file(name, args.lora_dir), weight=w, te_weight=te, block_weights=blocks))
    if args.into_model:
        from ..tools import merge_into_model

        if args.rank or args.conv_rank:
            raise ValueError("--rank / --conv-rank apply to LoRA merges; a checkpoint gets the LoRAs' exact deltas.")
        out = merge_into_model(args.into_model, specs, args.out, dtype=args.dtype, strict=not args.no_strict,
                               config_from=args.config_from)
        print(f"wrote {out} ({len(specs)} LoRA(s) merged into {args.into_model})")
        return 0
    from ..tools import merge_loras

    report = merge_loras(specs, args.out, rank=args.rank, conv_rank=args.conv_rank, dtype=args.dtype or "fp16",
                         strict=not args.no_strict)
    print(report.to_json() if args.json else report.summary(per_module=args.per_module))
    return 0
