"""`sd-lora inspect FILE [--json]`: what a LoRA file is, what it targets, and whether it is healthy."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a LoRA file's format, architecture, ranks, trigger words and metadata")
    p.add_argument("path", help="LoRA .safetensors file (kohya, LyCORIS, diffusers or PEFT), or a PEFT folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-strict", action="store_true", help="skip keys of unknown formats instead of failing")
    p.set_defaults(func=run)


def inspect_lora(path, strict: bool = True) -> dict:
    """A summary of a LoRA file as plain data (what `sd-lora inspect --json` prints)."""
    from collections import Counter
    from pathlib import Path

    from ..fields import recorded_settings
    from ..infotext import file_hashes
    from ..formats.lora_file import is_finite
    from ..formats.read import load_lora
    from ..formats.kohya import lora_file_state_dict
    from ..methods import dora

    lora = load_lora(path, strict=strict)
    ranks = Counter(m.rank for m in lora.modules.values() if m.rank is not None)
    alphas = Counter(m.alpha for m in lora.modules.values() if m.alpha is not None)
    kinds = Counter(m.kind + ("+dora" if m.has_dora else "") for m in lora.modules.values())
    output_axis = len(dora.output_axis_modules(lora_file_state_dict(lora)))
    dora_modules = sum(m.has_dora for m in lora.modules.values())
    targets = Counter()
    for name in lora.modules:
        for prefix, label in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder")):
            if name.startswith(prefix):
                targets[label] += 1
                break
    non_finite = [n for n, m in lora.modules.items() if any(t.is_floating_point() and not is_finite(t) for t in m.tensors.values())]
    p = Path(path)
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return {
        "path": str(path),
        "format": lora.format,
        "architecture": lora.arch or "unknown",
        "modules": len(lora.modules),
        "targets": dict(targets),
        "kinds": dict(kinds),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "file_bytes": size,
        "tensor_bytes": lora.num_bytes(),
        "trigger_words": lora.trigger_words,
        # DoRA modules by the axis of their magnitude: A1111 and ComfyUI apply only "input" as written
        "dora_axes": {"input": dora_modules - output_axis, "output": output_axis} if dora_modules else {},
        "dora_note": dora.OUTPUT_AXIS_NOTE if output_axis else None,
        "nan_or_inf_modules": non_finite,
        "hashes": file_hashes(p) if p.is_file() else {},  # what Civitai and A1111 look the file up by
        "settings": recorded_settings(lora.metadata),  # what sd-lora trained it with ({} for other tools' files)
        "metadata": lora.metadata,
    }


def _changed_settings(settings: dict) -> dict:
    """The recorded settings whose value is not the key's default (unknown keys, from a newer version, kept)."""
    from ..config import config_keys

    defaults = {k.name: k.default for k in config_keys()}
    return {k: v for k, v in sorted(settings.items()) if k not in defaults or defaults[k] != v}


def run(args) -> int:
    from ..fields import CONFIG_METADATA_KEY

    info = inspect_lora(args.path, strict=not args.no_strict)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if not info["nan_or_inf_modules"] else 1
    md = info.pop("metadata")
    for key in ("path", "format", "architecture", "modules", "targets", "kinds", "ranks", "alphas", "file_bytes", "trigger_words"):
        value = info[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(value) or "-"
        elif key == "file_bytes":
            value = f"{value / 1e6:.1f} MB"
        print(f"{key.replace('_', ' ')}: {value}")
    if info["hashes"]:
        h = info["hashes"]
        print(f"hashes: AutoV2 {h['autov2']} (A1111 model hash), AutoV3 {h['autov3']} (A1111 \"Lora hashes\"), sha256 {h['sha256']}")
    if info["dora_axes"]:
        axes = info["dora_axes"]
        print(f"DoRA magnitudes: {axes['input']} modules per input column, {axes['output']} per output row"
              + (f" (note: {info['dora_note']})" if info["dora_note"] else ""))
    bad = info["nan_or_inf_modules"]
    print(f"NaN/inf check: {'FAILED in ' + str(len(bad)) + ' modules (first: ' + bad[0] + ')' if bad else 'ok'}")
    settings = info["settings"]
    if settings:
        changed = _changed_settings(settings)
        print(f"trained with (settings not at their default, of {len(settings)} recorded):")
        for k, v in changed.items():
            print(f"  {k} = {json.dumps(v)}")
    if md:
        print("metadata:")
        for k in sorted(md):
            if k == CONFIG_METADATA_KEY and settings:
                continue  # shown above
            v = md[k]
            print(f"  {k}: {v if len(v) <= 200 else v[:200] + '...'}")
    return 0 if not bad else 1
