"""`sd-lora resize IN --rank R | --dynamic METHOD --param X`: a smaller LoRA by SVD (kohya resize_lora)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "resize",
        help="reduce a LoRA's rank by SVD (fixed rank, or kohya's sv_ratio / sv_fro / sv_cumulative)",
        description=(
            "Re-factor every module of a LoRA by SVD and keep the largest singular values: --rank R for all modules, "
            "or --dynamic sv_ratio|sv_fro|sv_cumulative --param X per module (kohya resize_lora.py semantics; --rank "
            "then caps the result). Prints the kept energy and relative error, and the new file size."
        ),
    )
    p.add_argument("input", help="the LoRA to resize (.safetensors, any format sd-lora reads)")
    p.add_argument("--rank", type=int, help="new rank (with --dynamic: the largest allowed)")
    p.add_argument("--conv-rank", type=int, help="new rank for 3x3 conv (LoCon) modules (default --rank)")
    p.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank: sv_ratio keeps S > S_max/X; sv_fro keeps sqrt(energy) >= X; "
                        "sv_cumulative keeps sum(S) >= X of the total")
    p.add_argument("--param", type=float, help="the --dynamic target (sv_ratio: e.g. 4; sv_fro / sv_cumulative: e.g. 0.9)")
    p.add_argument("--out", help="output file (default: INPUT-rR.safetensors / INPUT-METHOD-X.safetensors next to it)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="weights in the output (default fp16)")
    p.add_argument("--per-module", action="store_true", help="print each module's ranks, kept energy and error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tools import resize_lora

    src = Path(args.input)
    if args.out:
        out = Path(args.out)
    else:
        tag = f"r{args.rank}" if not args.dynamic else f"{args.dynamic}-{args.param:g}"
        out = src.with_name(f"{src.stem}-{tag}.safetensors")
    report = resize_lora(src, out, rank=args.rank, dynamic=args.dynamic, param=args.param, conv_rank=args.conv_rank,
                         dtype=args.dtype)
    print(report.to_json() if args.json else report.summary(per_module=args.per_module))
    return 0
