"""`sd-lora demo`: train two style LoRAs on the tiny base and write a comparison grid."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train style LoRAs on the tiny base model and render a comparison grid (CPU, minutes)")
    p.add_argument("--out", default="out/demo", help="output folder (default: %(default)s)")
    p.add_argument("--base", default=None, help="base model (default: datasets/tiny-base of the checkout)")
    p.add_argument("--steps", type=int, default=300, help="training steps per style LoRA (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DEFAULT_BASE, STYLES, run_demo

    result = run_demo(args.out, base=args.base or DEFAULT_BASE, steps=args.steps, seed=args.seed)
    print(f"\nDemo finished in {result.seconds:.0f} s.")
    for style, path in result.loras.items():
        m = result.measures[style]
        sweep = "  ".join(f"{m[f'{style} {w:g}']:.3f}" for w in (0.0, 0.25, 0.5, 0.75, 1.0))
        print(f"  {style:8s} {STYLES[style][1]}: base {m[f'{style} base']:.3f} | weights 0..1: {sweep} | stack {m['stack']:.3f}   {path}")
    print(f"Grid: {result.grid}")
    print(f"Measures: {result.grid.parent / 'measures.json'}")
    return 0
