"""Write the example image sets (sd_lora.examples.shapes) into a folder.

    python datasets/make_datasets.py --out datasets/generated [--seed N]

Needs sd_lora importable (`pip install -e .`, or PYTHONPATH=. from the checkout).
"""

from __future__ import annotations

import argparse

from sd_lora.examples.shapes import make_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the example image sets (kohya dataset-folder format), reproducibly.")
    parser.add_argument("--out", default="datasets/generated", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    roots = make_datasets(args.out, seed=args.seed)
    for name, root in roots.items():
        n = sum(1 for _ in root.glob("*/*.png"))
        print(f"{name:8s} {n:4d} images  {root}")


if __name__ == "__main__":
    main()
