"""`sd-lora extract --base A --tuned B --rank R`: a LoRA from the difference of two checkpoints (SVD)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract a LoRA from a fine-tuned checkpoint and its base (SVD of the weight difference)",
        description=(
            "Load both models (diffusers folders or single files), take W_tuned - W_base for every targeted layer of "
            "the UNet and text encoder(s), and keep its best rank-R part. Prints the relative error per module and "
            "overall, and how much of the fine-tune lies outside the targeted layers."
        ),
    )
    p.add_argument("--base", required=True, help="the base model the fine-tune started from")
    p.add_argument("--tuned", required=True, help="the fine-tuned model")
    p.add_argument("--out", required=True, help="the LoRA to write (.safetensors, kohya format)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--conv-rank", type=int, help="rank for 3x3 conv layers with --targets all (default --rank)")
    p.add_argument("--targets", choices=["kohya", "all"], default="kohya",
                   help="kohya: UNet transformer blocks + text-encoder attention/MLP (default); all: every Linear/Conv2d")
    p.add_argument("--no-text-encoder", action="store_true", help="extract the UNet only")
    p.add_argument("--min-diff", type=float, default=1e-5,
                   help="leave out layers whose largest weight change is at most this (default 1e-5)")
    p.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank as `resize --dynamic` does (--rank is then the cap)")
    p.add_argument("--param", type=float, help="the --dynamic target")
    p.add_argument("--config-from", help="diffusers folder with configs for non-standard single files")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="weights in the output (default fp16)")
    p.add_argument("--per-module", action="store_true", help="print each module's rank and error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tools import extract_lora

    report = extract_lora(
        args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank, targets=args.targets,
        text_encoder=not args.no_text_encoder, min_diff=args.min_diff, dynamic=args.dynamic, param=args.param,
        dtype=args.dtype, config_from=args.config_from,
    )
    print(report.to_json() if args.json else report.summary(per_module=args.per_module))
    return 0
