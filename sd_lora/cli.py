"""`sd-lora` command line: a thin layer that parses arguments and calls the Python API.

Each subcommand lives in `sd_lora/commands/<name>.py` with `register(subparsers)`; adding one is
one file and one line in COMMANDS below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module under sd_lora.commands, imported lazily so `sd-lora --help` stays fast)
COMMANDS = [
    "model_info",
    "ui",
    "caption",
    "generate",
    "train",
    "inspect", "edit_metadata",
    "convert",
    "merge", "resize", "extract",
    "import_kohya",
    "demo",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-lora",
        description="Train, share and apply LoRA adapters for Stable Diffusion, offline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show debug logging, the libraries' warnings and progress bars, and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sd_lora.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import setup_logging

    setup_logging(args.verbose)  # our lines; the libraries' only with -v (sd_lora/logs.py)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if argv is None and getattr(args, "prepare_process", None):
        args.prepare_process()  # the command is this process (not main([...]) from Python): it may tune it
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
