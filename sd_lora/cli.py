"""`sd-lora` command line: a thin layer that parses arguments and calls the Python API.

Each subcommand lives in `sd_lora/commands/<name>.py` with `register(subparsers)`; adding one is
one file and one line in COMMANDS below.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module under sd_lora.commands, imported lazily so `sd-lora --help` stays fast)
COMMANDS = [
    "model_info",
    "ui",
    "caption",
    "generate",
    "train",
    "inspect",
    "convert",
    "merge", "resize", "extract",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-lora",
        description="Train, share and apply LoRA adapters for Stable Diffusion, offline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sd_lora.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Our errors are written for users: print them without a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
