"""Config keys that describe themselves.

Every field of TrainConfig / DataConfig / NetworkConfig is declared with `setting(...)`, which stores
its help text, choices, unit, path marker, flag spelling and kohya spellings in the dataclass field's
metadata. `describe()` turns those fields into `Key`s, and everything else is derived from them:

    CLI flags, metavars, defaults in --help, kohya aliases     sd_lora/commands/train.py
    TOML type checks, relative-path resolution                 sd_lora/config.py (load_config)
    choice / type / minimum checks with "did you mean"         problems() below
    web UI dropdowns, value coercion, workspace confinement    webui/tabs/train.py
    the key table in docs/training.md                          markdown_table() / `python -m sd_lora.fields`

So adding a training option is one `setting(...)` line (plus the code that uses it): no list
elsewhere has to learn about it. Torch-free: the CLI's --help and the config checks import this.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import PurePath
from typing import Any

PATH_KINDS = ("dir", "file", "path")  # what a path key names: a folder, a file, or either


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, choices=None, unit: str | None = None,
            path: str | None = None, lines: bool = False, keywords: tuple[str, ...] = (), flag: str | None = None,
            metavar: str | None = None, kohya: dict | tuple = (), minimum: float | None = None, zero: str | None = None,
            default_text: str | None = None, excludes: str | None = None, ss: str | bool | None = None, items: Any = None):
    """A dataclass field that describes itself.

    help: one line for --help, the docs table and the UI.   choices: a tuple, or a function returning one
    (read when asked, e.g. the method registry).             unit: "px", "steps" ... shown after values.
    path: "dir" | "file" | "path": a filesystem path (resolved against a TOML file's folder, confined to
    the web UI's workspace). lines: the value may instead be text lines (a list, or a string with
    newlines), which are not a path. keywords: string values that are not paths ("latest").
    flag: the CLI flag when not --<name-with-dashes>. kohya: kohya sd-scripts spellings meaning the same:
    a name (takes our value) or {name: constant} for kohya's value-less switches.
    minimum: smallest allowed number (checked generically); zero: what 0 means ("never") when allowed.
    default_text: the default described in words when the stored default is None.
    excludes: another key of the same section that this one replaces (steps <-> epochs): a flag given
    for this key clears that one from a config file.
    ss: where the value goes in a trained file's metadata (`settings_metadata`): "ss_<name>" is the kohya
    key that means the same (str(value), as kohya writes it); False: not recorded (machine-local: threads,
    folders, log intervals). Every key not marked False is recorded in the CONFIG_METADATA_KEY JSON.
    items: for a list of tables (`[[data.subsets]]`), the dataclass describing one table (or a function
    returning it); its fields are keys too (`data.subsets[].path`). Such a key is TOML-only: no flag, no form box.
    """
    if ss not in (None, False) and not (isinstance(ss, str) and ss.startswith("ss_")):
        raise ValueError(f"ss must be a kohya metadata key ('ss_...') or False, got {ss!r}")
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    metadata = {"help": help, "choices": choices, "unit": unit, "path": path, "lines": lines, "keywords": tuple(keywords),
                "flag": flag, "metavar": metavar, "kohya": dict.fromkeys(kohya) if isinstance(kohya, (tuple, list)) else dict(kohya),
                "minimum": minimum, "zero": zero, "default_text": default_text, "excludes": excludes, "ss": ss,
                "items": items}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_SCALARS = ("bool", "int", "float", "str")


@dataclass(frozen=True)
class Key:
    """One config key as users write it: `lr`, `data.path`, `network.rank`."""

    name: str
    section: str | None
    attr: str
    annotation: str
    default: Any
    meta: dict

    # ---- what the field says about itself ----------------------------------------------------------
    @property
    def help(self) -> str:
        return self.meta.get("help", "")

    @property
    def choices(self) -> tuple | None:
        c = self.meta.get("choices")
        return tuple(c() if callable(c) else c) if c is not None else None

    @property
    def unit(self) -> str | None:
        return self.meta.get("unit")

    @property
    def path(self) -> str | None:
        return self.meta.get("path")

    @property
    def kohya(self) -> dict:
        return self.meta.get("kohya") or {}

    @property
    def minimum(self):
        return self.meta.get("minimum")

    @property
    def ss(self) -> str | bool | None:
        return self.meta.get("ss")

    @property
    def excludes(self) -> str | None:
        return self.meta.get("excludes")

    @property
    def partner(self) -> str | None:
        """The full name of the key this one replaces (`excludes`, in the same section), else None."""
        other = self.excludes
        return (f"{self.section}.{other}" if self.section else other) if other else None

    @property
    def items(self) -> type | None:
        """The dataclass of one table, for a list-of-tables key (see setting's `items`); else None."""
        c = self.meta.get("items")
        return c if c is None or isinstance(c, type) else c()

    def item_keys(self) -> tuple[Key, ...]:
        """The keys of one table of a list-of-tables key, named `data.subsets[].path`; get/set act on one table."""
        if self.items is None:
            return ()
        return tuple(Key(f"{self.name}[].{k.attr}", None, k.attr, k.annotation, k.default, k.meta) for k in describe(self.items, {}))

    @property
    def types(self) -> tuple[str, ...]:
        """The annotation's parts without their element types: 'list[str] | str | None' -> ('list', 'str', 'None')."""
        return tuple(p.strip().split("[")[0] for p in self.annotation.split("|"))

    @property
    def optional(self) -> bool:
        return "None" in self.types

    @property
    def kind(self) -> str:
        """The main value type: bool, int, float, str, list or dict."""
        return next((t for t in self.types if t != "None"), "str")

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.attr.replace("_", "-")

    @property
    def metavar(self) -> str | None:
        if self.meta.get("metavar"):
            return self.meta["metavar"]
        if self.choices is not None:
            return "{" + ",".join(map(str, self.choices)) + "}"
        if self.path:
            return self.path.upper()
        return {"int": "N", "float": "X", "dict": "JSON", "bool": None}.get(self.kind, "TEXT")

    def default_words(self) -> str | None:
        """The default as a user reads it ('512 px', 'off', 'the base model's'), None when there is nothing to say."""
        if self.meta.get("default_text"):
            return self.meta["default_text"]
        d = self.default
        if d is MISSING or d is None or d == "":
            return None
        if isinstance(d, bool):
            return "on" if d else "off"
        text = d if isinstance(d, str) else _toml_value(d)
        return f"{text} {self.unit}" if self.unit else text

    def help_line(self) -> str:
        """Help with what 0 means and the default, as --help shows it."""
        notes = [f"0: {self.meta['zero']}"] if self.meta.get("zero") else []
        words = self.default_words()
        if words:
            notes.append(f"default: {words}")
        return f"{self.help} ({'; '.join(notes)})" if notes else self.help

    # ---- values ----------------------------------------------------------------------------------
    def get(self, cfg) -> Any:
        return getattr(getattr(cfg, self.section) if self.section else cfg, self.attr)

    def set(self, cfg, value) -> None:
        setattr(getattr(cfg, self.section) if self.section else cfg, self.attr, value)

    def path_value(self, value) -> str | None:
        """The filesystem path in `value`, or None when it holds none (unset, prompt lines, a keyword).

        Only keys marked `lines` treat a string with a newline as text; for every other path key any
        non-empty string is a path, so nothing can slip past the workspace check by looking like text.
        """
        if not self.path or not isinstance(value, str) or not value.strip():
            return None
        if value in self.meta.get("keywords", ()) or (self.meta.get("lines") and "\n" in value):
            return None
        return value

    def coerce(self, value):
        """A value from a form box or a flag (a string or a number) as this key's type; '' -> None.

        Raises ValueError('<key>: must be ...') when it cannot be read.
        """
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            return None
        kind = self.kind
        try:
            if kind == "bool":
                if isinstance(value, bool):
                    return value
                text = str(value).lower()
                if text in ("true", "1", "yes", "on"):
                    return True
                if text in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if kind == "int":
                if isinstance(value, bool):
                    raise ValueError
                number = float(value) if isinstance(value, str) and any(c in value for c in ".eE") else value
                if isinstance(number, float) and not number.is_integer():
                    raise ValueError
                return int(number)
            if kind == "float":
                if isinstance(value, bool):
                    raise ValueError
                number = float(value)
                if number != number:
                    raise ValueError
                return number
            if kind == "dict":
                parsed = json.loads(value) if isinstance(value, str) else value
                if not isinstance(parsed, dict):
                    raise ValueError
                return parsed
        except (TypeError, ValueError, json.JSONDecodeError):
            raise ValueError(f"{self.name}: must be {_type_words(self.types)} (got {value!r})") from None
        choices = self.choices
        if choices is not None and value not in choices:
            # kohya and other tools spell the same choice differently: AdamW8bit, PagedAdamW8bit, BF16
            loose = {str(c).replace("_", "").lower(): c for c in choices}
            value = loose.get(str(value).replace("_", "").lower(), value)
        return value

    def type_problem(self, value) -> str | None:
        """'must be ...' when `value` has the wrong type for the annotation, else None."""
        allowed = tuple(t for p in self.types for t in _PY_TYPES.get(p, (object,)))
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)  # TOML true is not 1
        if ok and isinstance(value, float) and value != value:
            return "must be a number, not nan"
        if ok and isinstance(value, (list, dict)):  # element types: list[str], dict[str, int] ...
            marker = "list[" if isinstance(value, list) else "dict[str,"
            inner = self.annotation.split(marker, 1)
            inner_type = _PY_TYPES.get(inner[1].split("]")[0].strip(), ()) if len(inner) == 2 else ()
            items = value if isinstance(value, list) else list(value.values())
            bad = [x for x in items if inner_type and (not isinstance(x, inner_type) or (isinstance(x, bool) and bool not in inner_type))]
            if bad:
                return f"has an element of the wrong type ({bad[0]!r})"
        if ok:
            return None
        return f"must be {_type_words(self.types)} (got {value!r})"

    def problem(self, value) -> str | None:
        """The generic problem with a value (type, choice, minimum) as 'key: ...', else None."""
        if value is None and self.optional:
            return None
        wrong = self.type_problem(value)
        if wrong:
            return f"{self.name}: {wrong}"
        choices = self.choices
        if choices is not None and value not in choices:
            return f"{self.name}: unknown {value!r}{suggest(value, choices)}; choose one of {', '.join(map(str, choices))}"
        low = self.minimum
        if low is not None and isinstance(value, (int, float)) and value < low:
            zero = f" ({low}: {self.meta['zero']})" if self.meta.get("zero") and low == 0 else ""
            whole = "a whole number " if self.kind == "int" else ""
            return f"{self.name}: must be {whole}>= {low}{zero} (got {value!r})"
        return None


_PY_TYPES: dict[str, tuple] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,), "dict": (dict,),
                               "None": (type(None),)}


def _type_words(types) -> str:
    words = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false", "list": "a list",
             "dict": "a table"}
    return " or ".join(words[t] for t in types if t in words)


def suggest(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(top: type, sections: dict[str, type]) -> tuple[Key, ...]:
    """The Keys of a config dataclass and its section dataclasses (fields named like the sections)."""
    keys = []
    for section, cls in ((None, top), *sections.items()):
        for f in fields(cls):
            if section is None and f.name in sections:
                continue
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else MISSING)
            name = f"{section}.{f.name}" if section else f.name
            keys.append(Key(name, section, f.name, str(f.type), default, dict(f.metadata)))
    return tuple(keys)


def problems(obj, keys: tuple[Key, ...], section: str | None) -> list[str]:
    """The generic problems (types, choices, minimums) of one dataclass instance's fields."""
    out = []
    for key in keys:
        if key.section == section:
            message = key.problem(getattr(obj, key.attr))
            if message:
                out.append(message)
    return out


def keys_of(message: str) -> set[str]:
    """The keys a message is about: 'steps/epochs: ...' -> {'steps', 'epochs'}; 'data.path: ...' -> {'data.path'}."""
    head = message.split(":", 1)[0]
    prefix = head.rsplit(".", 1)[0] + "." if "." in head.split("/")[0] else ""
    parts = head.split("/")
    return {parts[0]} | {p if "." in p else prefix + p for p in parts[1:]}


def assign(cfg, keys: tuple[Key, ...], values: dict[str, Any]) -> None:
    """Set keys the way flags or a form do: a value for `steps` also clears `epochs` (and the other way
    round) unless that one is given too, so a flag overrides a config file's choice of training length."""
    by_name = {k.name: k for k in keys}
    for name, value in values.items():
        by_name[name].set(cfg, value)
    for name, value in values.items():
        key = by_name[name]
        if value is not None and key.partner and key.partner not in values:
            by_name[key.partner].set(cfg, None)


# ---- the settings in a trained file's metadata ---------------------------------------------------------

# The JSON of every recorded setting (key as users write it -> value), so a file says how it was trained
# even for options kohya has no `ss_` key for. Read back by `recorded_settings`.
CONFIG_METADATA_KEY = "sd_lora.config"


def settings_metadata(cfg, keys: tuple[Key, ...]) -> dict[str, str]:
    """The metadata entries a config's settings give a trained file: each key's kohya `ss_` entry where
    it declares one, and all recorded keys in CONFIG_METADATA_KEY. Paths are written as their last part
    only (a file must not carry the trainer's folders). Unset values (None, "") get no `ss_` entry."""
    md, recorded = {}, {}
    for key in keys:
        if key.ss is False:
            continue
        value = key.get(cfg)
        if key.path_value(value) is not None:
            value = PurePath(value).name
        if key.items is not None:  # [[data.subsets]]: the keys each table sets, paths as their last part too
            value = [{sub.attr: PurePath(v).name if sub.path_value(v) is not None else v for sub in key.item_keys()
                      if (v := sub.get(table)) is not None} if isinstance(table, key.items) else table for table in value or []]
        recorded[key.name] = value
        if isinstance(key.ss, str) and value is not None and value != "":
            md[key.ss] = str(value)
    md[CONFIG_METADATA_KEY] = json.dumps(recorded, sort_keys=True, default=str)
    return md


def recorded_settings(metadata: dict[str, str]) -> dict[str, Any]:
    """The settings a file was trained with ({} when it has none or they do not parse)."""
    try:
        value = json.loads(metadata.get(CONFIG_METADATA_KEY) or "{}")
    except (json.JSONDecodeError, TypeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- the key table in the docs -------------------------------------------------------------------------

TABLE_BEGIN = "<!-- keys:begin (generated by `python -m sd_lora.fields docs/training.md`; do not edit) -->"
TABLE_END = "<!-- keys:end -->"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(keys: tuple[Key, ...]) -> str:
    """Every key with its flag, type, default, choices, kohya metadata key and help, as a Markdown table."""
    rows = ["| key | flag | type | default | values | metadata | what it does |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        rows.append(_row(k, table=False))
        rows += [_row(sub, table=True) for sub in k.item_keys()]
    return "\n".join(rows)


def _row(k: Key, table: bool) -> str:
    """One key's table row; `table`: a key of a list of tables (TOML only, kohya names are dataset-config keys)."""
    if table or k.items is not None:
        flag = "TOML only" + (" (kohya: " + ", ".join(f"`{name}`" for name in k.kohya) + ")" if k.kohya else "")
    else:
        flag = f"`{k.flag}`" if k.kind != "bool" else f"`{k.flag}` / `--no-{k.flag[2:]}`"
        if k.kohya:
            flag += " (kohya: " + ", ".join(f"`--{name}`" for name in k.kohya) + ")"
    kind = k.kind + (f" ({k.path})" if k.path else "") + (" or unset" if k.optional else "")
    values = ", ".join(f"`{c}`" for c in k.choices) if k.choices is not None else ""
    if k.minimum is not None:
        values = f">= {k.minimum}" + (f" (0: {k.meta['zero']})" if k.meta.get("zero") else "")
    if k.unit:
        values = (values + " " if values else "") + k.unit
    recorded = "not recorded" if k.ss is False else f"`{k.ss}`" if k.ss else ""
    return f"| `{k.name}` | {flag} | {kind} | {_cell(k.default_words() or '')} | {_cell(values)} | {recorded} | {_cell(k.help)} |"


def replace_table(text: str, table: str) -> str:
    """`text` with the part between the key-table markers replaced by `table`."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"the key-table markers are missing; put {TABLE_BEGIN!r} and {TABLE_END!r} where the table goes")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}"


def table_in(text: str) -> str:
    """The table currently between the markers of `text`."""
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    import sys
    from pathlib import Path

    from .config import config_keys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sd_lora.fields docs/training.md   (rewrites the key table between its markers)", file=sys.stderr)
        return 2
    path = Path(args[0])
    path.write_text(replace_table(path.read_text(encoding="utf-8"), markdown_table(config_keys())), encoding="utf-8")
    print(f"wrote the key table of {len(config_keys())} keys into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

