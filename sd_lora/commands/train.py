"""`sd-lora train [CONFIG.toml] [--flags]`: train a LoRA. A thin layer over `sd_lora.train`.

Every config key is also a flag (`lr` -> `--lr`, `[data] resolution` -> `--resolution`,
`[network] rank` -> `--rank`, `[data] path` -> `--data`); flags override the TOML file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields

# Section fields whose flag is not simply --<name>
FLAG_NAMES = {("data", "path"): "--data", ("data", "reg_path"): "--reg-data"}
# TrainConfig fields that are sections, not flags
SECTIONS = ("data", "network")


def _flag_type(annotation: str):
    a = str(annotation)
    if a.startswith("bool"):
        return bool
    if a.startswith("int"):
        return int
    if a.startswith("float"):
        return float
    if a.startswith("dict"):
        return json.loads
    return str


def _section_fields():
    from ..config import DataConfig, TrainConfig
    from ..network.config import NetworkConfig

    yield from ((None, f) for f in fields(TrainConfig) if f.name not in SECTIONS)
    yield from (("data", f) for f in fields(DataConfig))
    yield from (("network", f) for f in fields(NetworkConfig))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA from a dataset folder (TOML config and/or flags)",
        description="Train a LoRA. Keys of the TOML config are also flags; flags win. "
        "Ctrl-C (or creating the STOP file in the checkpoint folder) saves a resumable checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML training config (see docs/training.md)")
    p.add_argument("--dry-run", action="store_true", help="validate, scan the dataset and print the step plan; load no model")
    p.add_argument("--json-events", action="store_true", help="print every event as a JSON line on stdout")
    groups = {None: p.add_argument_group("training"), "data": p.add_argument_group("data ([data] table)"),
              "network": p.add_argument_group("network ([network] table)")}
    for section, f in _section_fields():
        flag = FLAG_NAMES.get((section, f.name), "--" + f.name.replace("_", "-"))
        dest = f"cfg__{section or 'top'}__{f.name}"
        help_text = f.metadata.get("help", "") if f.metadata else ""
        kind = _flag_type(f.type)
        if f.name == "resume":
            groups[section].add_argument(flag, dest=dest, nargs="?", const="latest", default=None,
                                         help="continue the newest checkpoint of this output, or the checkpoint folder given")
        elif f.name == "sample_prompts":
            groups[section].add_argument(flag, dest=dest, action="append", default=None, metavar="PROMPT_OR_FILE",
                                         help=help_text + " (repeat the flag for several prompts)")
        elif kind is bool:
            groups[section].add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            groups[section].add_argument(flag, dest=dest, type=kind, default=None, help=help_text or None)
    p.set_defaults(func=run)


def config_from_args(args):
    """TrainConfig from an optional TOML file plus the flags that were given."""
    from pathlib import Path

    from ..config import TrainConfig, load_config

    cfg = load_config(args.config) if args.config else TrainConfig()
    for key, value in vars(args).items():
        if not key.startswith("cfg__") or value is None:
            continue
        _, section, name = key.split("__", 2)
        if name == "sample_prompts" and len(value) == 1 and Path(value[0]).is_file():
            value = value[0]
        target = cfg if section == "top" else getattr(cfg, section)
        setattr(target, name, value)
    return cfg


def run(args) -> int:
    from ..config import ConfigError

    cfg = config_from_args(args)
    errors = cfg.validate()
    if errors:
        raise ConfigError(errors)
    if args.dry_run:
        from ..data.dataset import scan_dataset
        from ..training.loop import make_plan

        dataset = scan_dataset(cfg.data)
        print("\n".join(dataset.report.lines()))
        print("steps: " + make_plan(cfg, dataset, 1).describe(cfg, 1))
        return 0
    from ..training import TrainingStopped, train

    on_event = (lambda e: print(json.dumps(e, default=str), flush=True)) if args.json_events else None
    try:
        path = train(cfg, on_event=on_event)
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun every process returns here
        print(f"saved {path}")
    return 0
