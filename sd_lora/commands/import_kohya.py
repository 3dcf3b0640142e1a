"""`sd-lora import-kohya CONFIG.json`: a kohya_ss GUI saved config as an sd-lora training config (TOML).

Every setting is either carried over (to the key the fields' kohya spellings name) or listed, with the
reason, on stderr and in a comment block at the top of the TOML; empty / 0 / off settings are named in
one line. The TOML is checked by loading it back before it is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import-kohya", help="convert a kohya_ss GUI saved config (JSON) into an sd-lora training config (TOML)",
        description="Convert a kohya_ss GUI saved config (the JSON its Save button writes) into an sd-lora TOML config. "
        "Settings that cannot be carried over are listed with the reason.")
    p.add_argument("config", help="kohya_ss GUI config (.json)")
    p.add_argument("-o", "--output", help="TOML file to write (default: the JSON's name with .toml, beside it)")
    p.add_argument("--force", action="store_true", help="overwrite the TOML file if it exists")
    p.set_defaults(func=run)


def gui_config_toml(gui: dict) -> tuple[str, list[tuple[str, object, str]], list[str]]:
    """(TOML text, unmapped settings, empty settings) for a kohya_ss GUI config. Raises ConfigError when the
    carried-over values do not make a valid config (types, choices)."""
    import tomli_w

    from ..config import config_from_dict
    from ..data.kohya_config import import_gui_config
    from .train import KOHYA_HINTS

    result = import_gui_config(gui, KOHYA_HINTS)
    config_from_dict(result.values)  # the keys and types are ours: loading it back finds any mistake
    head = ["# converted from a kohya_ss GUI config by `sd-lora import-kohya`",
            "# relative paths are as the GUI wrote them (from its own folder); sd-lora reads them from this file's folder"]
    if result.unmapped:
        head.append("# NOT carried over (kohya_ss setting = value: why):")
        head += [f"#   {k} = {json.dumps(v)}: {why}" for k, v, why in result.unmapped]
    if result.empty:
        head.append("# empty, 0 or off in the file (nothing to carry over): " + ", ".join(result.empty))
    body = tomli_w.dumps({k: v for k, v in result.values.items() if not isinstance(v, dict)}
                         | {k: v for k, v in result.values.items() if isinstance(v, dict)})
    return "\n".join(head) + "\n\n" + body.rstrip("\n") + "\n", result.unmapped, result.empty


def run(args) -> int:
    src = Path(args.config)
    try:
        gui = json.loads(src.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{src}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not a JSON file ({e}); pass the config the kohya_ss GUI saved") from None
    if not isinstance(gui, dict):
        raise ValueError(f"{src}: not a kohya_ss GUI config (expected a JSON object of settings)")
    text, unmapped, _ = gui_config_toml(gui)
    out = Path(args.output) if args.output else src.with_suffix(".toml")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it, or -o another file")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    if unmapped:
        print(f"{len(unmapped)} setting(s) NOT carried over:", file=sys.stderr)
        for k, v, why in unmapped:
            print(f"  {k} = {json.dumps(v)}: {why}", file=sys.stderr)
    return 0
