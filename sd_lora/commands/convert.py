"""`sd-lora convert IN --to kohya|diffusers|peft --out OUT`: rewrite a LoRA in another format."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a LoRA between kohya (A1111/ComfyUI), diffusers and PEFT formats",
    )
    p.add_argument("path", help="input LoRA (any format sd-lora reads), or a PEFT folder")
    p.add_argument("--to", choices=("kohya", "diffusers", "peft"), default="kohya", help="output format (default kohya)")
    p.add_argument("--out", required=True, help="output .safetensors file (kohya, diffusers) or folder (peft)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="tensor dtype to write (default fp16)")
    p.add_argument("--no-strict", action="store_true", help="skip keys of unknown formats instead of failing")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.convert import convert_lora

    out = convert_lora(args.path, args.out, to=args.to, dtype=args.dtype, strict=not args.no_strict)
    print(f"wrote {args.to} LoRA: {out}")
    return 0
