"""`sd-lora model-info PATH`: load a base model offline and report its architecture."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("model-info", help="detect a base model's architecture (SD1 / SD2 / SD2-v / SDXL)")
    p.add_argument("path", help="diffusers folder or single .safetensors/.ckpt file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..models import ARCH_DESCRIPTIONS, architecture_of, detect_architecture, load_base
    from ..models import _checkpoint_shapes  # header-only for single files: no weights loaded

    path = Path(args.path)
    if path.is_file():
        arch = detect_architecture(_checkpoint_shapes(path))
        info = {"path": str(path), "architecture": arch, "description": ARCH_DESCRIPTIONS[arch]}
    else:
        a = architecture_of(load_base(path))
        info = {"path": str(path), "architecture": a.arch, "description": a.description, "prediction_type": a.prediction_type}
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0
