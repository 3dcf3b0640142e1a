"""kohya's config files: sd-scripts dataset configs (`--dataset_config`), read as sd-lora subsets, and
kohya_ss GUI saved configs (JSON), turned into an sd-lora training config (`sd-lora import-kohya`).

The format, as kohya-ss/sd-scripts documents and checks it (docs/config_README-en.md and
library/config_util.py at commit 48d368fa: ConfigSanitizer's schemas, BlueprintGenerator's fallbacks):

    [general]                  options for every dataset and subset
    [[datasets]]               resolution, batch_size, bucket options (+ subset options for its subsets)
      [[datasets.subsets]]     image_dir (DreamBooth style: caption files) or metadata_file (fine-tuning
                               style: one JSON of captions), num_repeats, class_tokens, is_reg, caption options

A value set lower wins (subset > dataset > general). What the file leaves out takes sd-lora's [data]
value (flags included), as kohya falls back to its command line. Every key is either mapped or refused
with its line: unknown keys, keys in a table kohya does not allow them in, and kohya features sd-lora
does not have (face crops, token warm-up ...) set to anything but their off value.

The kohya spellings come from the fields (`kohya=` on each setting of config.SubsetConfig); this module
holds only what is kohya's own: which table a key may sit in, and the keys we accept but do not use.
Relative paths are taken from the current folder, as kohya does, and else from the config file's folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import IMAGE_EXTENSIONS, SubsetConfig, config_key
from ..fields import suggest

# library/config_util.py ConfigSanitizer: DATASET_ASCENDABLE_SCHEMA (per dataset or [general], never in a subset)
DATASET_KEYS = ("batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso", "min_bucket_reso",
                "resolution", "network_multiplier", "validation_seed", "validation_split", "resize_interpolation")
# DB_SUBSET_DISTINCT_SCHEMA / FT_SUBSET_DISTINCT_SCHEMA: only in [[datasets.subsets]]
SUBSET_ONLY_KEYS = ("image_dir", "is_reg", "metadata_file", "alpha_mask", "conditioning_data_dir")
# kohya options sd-lora does not have, with the value that means "off" (BaseSubsetParams' defaults): accepted
# at that value, refused at any other. cache_info only speeds up kohya's own scan: any value is fine.
NOT_SUPPORTED = {"face_crop_aug_range": None, "token_warmup_min": 1, "token_warmup_step": 0,
                 "custom_attributes": None, "network_multiplier": 1.0, "resize_interpolation": None}
# accepted at any value: they change nothing that is trained here (validation_split / validation_seed are read: #18)
IGNORED = {"cache_info": "kohya's scan cache; not needed here"}


class KohyaConfigError(ValueError):
    """A kohya dataset config with problems; `errors` lists them all, each with its line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass
class KohyaDataset:
    subsets: list[tuple[str, SubsetConfig]]  # ("datasets[1].subsets[2]", the merged table in sd-lora's keys)
    batch_size: int | None = None  # when the file sets one (the same for every dataset)
    notes: list[str] = field(default_factory=list)  # keys accepted at their off value


def _kohya_names() -> dict[str, tuple[str, object]]:
    """kohya key -> (SubsetConfig attr, constant or None), from the fields' kohya spellings. A field without
    one is spelled as kohya spells it (keep_tokens, caption_extension, is_reg ...)."""
    names = {}
    for key in config_key("data.subsets").item_keys():
        if key.kohya:
            names.update({name: (key.attr, const) for name, const in key.kohya.items()})
        else:
            names[key.attr] = (key.attr, None)
    return names


def _lines(text: str) -> dict[tuple, int]:
    """The line of each key of a TOML dataset config: ("general", k), ("datasets", i, k), ("datasets", i, j, k)."""
    out, table, i, j = {}, None, -1, -1
    for n, line in enumerate(text.splitlines(), 1):
        head = re.match(r"^\s*\[\[?\s*([\w.]+)\s*\]\]?", line)
        if head:
            table = head[1]
            if table == "datasets":
                i, j = i + 1, -1
            elif table == "datasets.subsets":
                j += 1
            continue
        key = re.match(r"^\s*['\"]?([\w.-]+)['\"]?\s*=", line)
        if key:
            where = {"general": ("general",), "datasets": ("datasets", i), "datasets.subsets": ("datasets", i, j)}.get(table, (table,))
            out.setdefault(where + (key[1],), n)
    return out


def _resolve_path(value: str, base: Path) -> str:
    p = Path(value)
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return str(p)
    return str(base / p)


def _read_file(path: Path) -> tuple[str, object]:
    """(text, parsed values) of a dataset config: JSON by its suffix, else TOML."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
        return text, json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except OSError as e:
        raise KohyaConfigError([f"{path}: cannot read the dataset config ({e.strerror or e})"]) from e
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KohyaConfigError([f"{path}: not a valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} file ({e})"]) from e


def dataset_config_paths(path: str | Path) -> list[tuple[str, object]]:
    """Every file or folder a dataset config names: (where, value as written), e.g.
    ("datasets[1].subsets[2].image_dir", "/data/dog"), for the keys that are paths (image_dir, metadata_file,
    conditioning_data_dir, ...: the path fields of config.SubsetConfig, by their kohya names). Every table
    is searched, also where kohya does not allow the key and unknown tables, so a checker (the web UI's
    workspace confinement) sees every path the reader could open. A value that is not a string is listed as
    it is. Raises KohyaConfigError when the file is not TOML / JSON."""
    path = Path(path)
    _text, values = _read_file(path)
    item_keys = {k.attr: k for k in config_key("data.subsets").item_keys()}
    names = {name for name, (attr, _const) in _kohya_names().items() if item_keys[attr].path}
    found: list[tuple[str, object]] = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in names:
                    found.append((here, value))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i + 1}]")

    walk(values, "")
    return found


def read_dataset_config(path: str | Path) -> KohyaDataset:
    """The subsets a kohya dataset config describes, in sd-lora's keys. Raises KohyaConfigError listing every problem."""
    path = Path(path)
    text, values = _read_file(path)
    if not isinstance(values, dict):
        raise KohyaConfigError([f"{path}: not a kohya dataset config (expected [general] and [[datasets]] tables)"])
    lines = _lines(text) if path.suffix.lower() != ".json" else {}
    errors: list[str] = []
    notes: list[str] = []

    def at(where: tuple, key: str) -> str:
        n = lines.get(where + (key,))
        return f"{path}" + (f" line {n}" if n else "")

    def name(where: tuple, key: str) -> str:
        if where == ("general",):
            return f"[general] {key}"
        if len(where) == 2:
            return f"datasets[{where[1] + 1}].{key}"
        return f"datasets[{where[1] + 1}].subsets[{where[2] + 1}].{key}"

    for top in values:
        if top not in ("general", "datasets"):
            errors.append(f"{at((), top)}: {top}: unknown table (a kohya dataset config has [general] and [[datasets]])")
    general = values.get("general", {})
    datasets = values.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise KohyaConfigError(errors + [f"{path}: [general] must be a table and datasets a list of [[datasets]] tables"])
    if not datasets:
        errors.append(f"{path}: no [[datasets]] table; add one with [[datasets.subsets]] image_dir = \"...\"")
    kohya = _kohya_names()
    item_keys = {k.attr: k for k in config_key("data.subsets").item_keys()}

    def check_table(table: dict, where: tuple) -> dict[str, tuple]:
        """The keys of one table that sd-lora uses: {kohya key: (value, where)}; problems into errors."""
        level = "general" if where == ("general",) else "datasets" if len(where) == 2 else "subset"
        kept = {}
        for key, value in table.items():
            if key == "subsets" and level == "datasets":
                continue
            here = f"{at(where, key)}: {name(where, key)}"
            if level == "subset" and key in DATASET_KEYS:
                errors.append(f"{here}: kohya sets it per dataset, not per subset; move it to its [[datasets]] table")
            elif level != "subset" and key in SUBSET_ONLY_KEYS:
                errors.append(f"{here}: belongs in a [[datasets.subsets]] table")
            elif key in IGNORED:
                notes.append(f"{name(where, key)}: {IGNORED[key]}")
            elif key in NOT_SUPPORTED:
                if value != NOT_SUPPORTED[key]:
                    off = json.dumps(NOT_SUPPORTED[key])
                    errors.append(f"{here} = {json.dumps(value)}: sd-lora has no such option yet; remove it"
                                  + (f" or set it to {off}" if NOT_SUPPORTED[key] is not None else ""))
                else:
                    notes.append(f"{name(where, key)} = {json.dumps(value)}: off, as here")
            elif key == "batch_size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    errors.append(f"{here}: must be a whole number >= 1 (got {value!r})")
                else:
                    kept[key] = (value, where)
            elif key in kohya:
                kept[key] = (value, where)
            else:
                known = list(kohya) + list(DATASET_KEYS) + list(NOT_SUPPORTED) + ["batch_size", "subsets"]
                errors.append(f"{here}: unknown key{suggest(key, known)}")
        return kept

    general_kept = check_table(general, ("general",))
    subsets: list[tuple[str, SubsetConfig]] = []
    batch_sizes: list[tuple[int, str]] = []
    for i, dataset in enumerate(datasets):
        dataset_kept = check_table(dataset, ("datasets", i))
        merged_dataset = {**general_kept, **dataset_kept}
        if "batch_size" in merged_dataset:
            value, where = merged_dataset["batch_size"]
            batch_sizes.append((value, at(where, "batch_size")))
        tables = dataset.get("subsets", [])
        if not isinstance(tables, list) or not tables:
            errors.append(f"{path}: datasets[{i + 1}] has no [[datasets.subsets]] table; add one with image_dir = \"...\"")
            continue
        styles = {"metadata_file" in t for t in tables if isinstance(t, dict)}
        if len(styles) > 1:
            errors.append(f"{path}: datasets[{i + 1}] mixes DreamBooth subsets (image_dir) and fine-tuning subsets "
                          "(metadata_file); kohya needs them in separate [[datasets]]")
        for j, table in enumerate(tables):
            where = ("datasets", i, j)
            label = f"datasets[{i + 1}].subsets[{j + 1}]"
            if not isinstance(table, dict):
                errors.append(f"{path}: {label} must be a table")
                continue
            merged = {**merged_dataset, **check_table(table, where)}
            merged.pop("batch_size", None)
            if "image_dir" not in merged and "metadata_file" not in merged:
                errors.append(f"{path}: {label}: image_dir missing (the folder of its images), or metadata_file for a "
                              "fine-tuning subset")
            obj = SubsetConfig()
            for key, (value, origin) in merged.items():
                attr, const = kohya[key]
                here = f"{at(origin, key)}: {name(origin, key)}"
                if key == "resolution" and isinstance(value, list):
                    if len(value) != 2 or value[0] != value[1]:
                        errors.append(f"{here} = {value}: sd-lora buckets by one side (area = side x side); write "
                                      "resolution = N (a non-square training area is not supported)")
                        continue
                    value = value[0]
                if const is not None:  # kohya's switches: flip_aug = true -> flip = true; bucket_no_upscale = true -> upscale = false
                    if not isinstance(value, bool):
                        errors.append(f"{here}: must be true or false (got {value!r})")
                        continue
                    value = const if value else not const
                problem = item_keys[attr].type_problem(value)
                if problem:
                    errors.append(f"{here}: {problem}")
                    continue
                if item_keys[attr].path_value(value) is not None:
                    value = _resolve_path(value, path.parent)
                setattr(obj, attr, value)
            subsets.append((label, obj))
    if len({b for b, _ in batch_sizes}) > 1:
        errors.append(f"{path}: the datasets have different batch sizes ("
                      + ", ".join(f"{b} at {where.split(' line ')[-1] if ' line ' in where else where}" for b, where in batch_sizes)
                      + "); sd-lora trains every dataset at one batch size: set the same batch_size in each")
    if errors:
        raise KohyaConfigError(errors)
    return KohyaDataset(subsets, batch_sizes[0][0] if batch_sizes else None, notes)


def read_metadata(metadata_file: str | Path, image_dir: str | Path | None,
                  lines: bool = False) -> tuple[list[tuple[Path, str]], list[str]]:
    """The (image, caption) pairs of a kohya fine-tuning metadata file, and the entries whose image is missing.

    JSON {image key: {"caption": ..., "tags": ...}} (library/train_util.py FineTuningDataset), or JSON lines
    {"image_path", "caption", "tags"}. A relative key is under image_dir; a key without an extension (as
    kohya's finetune/merge_captions_to_metadata.py writes them without --full_path) is looked up with each
    image extension. The caption is the caption and the tags joined by a comma; with `lines` (enable_wildcard)
    every line of the caption is kept, each followed by the tags (library/train_util.py L2322-2330), for one line
    to be picked per use.
    """
    metadata_file = Path(metadata_file)
    text = metadata_file.read_text(encoding="utf-8")
    if metadata_file.suffix.lower() == ".jsonl":
        entries = {}
        for line in text.splitlines():
            if line.strip():
                d = json.loads(line)
                entries[d["image_path"]] = d
    else:
        entries = json.loads(text)
    found, missing = [], []
    for key, entry in entries.items():
        p = Path(key)
        if not p.is_absolute() and image_dir is not None:
            p = Path(image_dir) / p
        if not p.is_file():
            p = next((p.with_name(p.name + ext) for ext in IMAGE_EXTENSIONS if p.with_name(p.name + ext).is_file()), p)
        if not p.is_file():
            missing.append(key)
            continue
        caption = str(entry.get("caption") or "")
        tags = str(entry.get("tags") or "").strip()
        several = [" ".join(line.split()) for line in caption.splitlines() if line.strip()]
        if lines and len(several) > 1:  # kohya: the tags are one line, their newlines become separators
            tags = ", ".join(t.strip() for t in tags.splitlines() if t.strip())
            found.append((p, "\n".join(f"{line}, {tags}" if tags else line for line in several)))
            continue
        caption = " ".join(caption.splitlines()[:1]).strip()  # kohya: the first line
        found.append((p, ", ".join(x for x in (caption, tags) if x)))
    return found, missing


# ---- kohya_ss GUI saved configs (bmaltais/kohya_ss, commit 45088f04) -------------------------------------
# The GUI saves its form as JSON and turns it into sd-scripts flags (kohya_gui/lora_gui.py, train_model:
# the "config_toml_data" dict). Most keys are sd-scripts flag names, which the fields know (`kohya=`);
# these few are the GUI's own names or rules.
GUI_NAMES = {"optimizer": "optimizer_type", "max_resolution": "resolution", "learning_rate_te": "text_encoder_lr"}
# LoRA_type -> (network.method, network.preset); LoCon adds conv_dim / conv_alpha (lora_gui.py network_args)
GUI_LORA_TYPES = {"Standard": ("lora", "kohya"), "Kohya LoCon": ("lora", "full"), "LoCon": ("lora", "full"),
                  "LyCORIS/LoCon": ("lora", "full"), "LyCORIS/LoHa": ("loha", "kohya"), "Kohya LoHa": ("loha", "kohya"),
                  "LyCORIS/LoKr": ("lokr", "kohya"), "Kohya LoKr": ("lokr", "kohya")}


@dataclass
class GuiImport:
    values: dict  # the sd-lora config as TOML values ({"lr": ..., "data": {...}, "network": {...}})
    unmapped: list[tuple[str, object, str]]  # (GUI key, value, why) for each setting that is not carried over
    empty: list[str]  # GUI keys left empty, 0 or off (nothing to carry over)


def _empty(value) -> bool:
    return value is None or value == "" or value == [] or (not isinstance(value, bool) and value == 0) or value == "0"


def import_gui_config(gui: dict, hints: dict[str, str] | None = None) -> GuiImport:
    """A kohya_ss GUI saved config as sd-lora config values, naming every setting that could not be mapped.

    hints: what to use instead, for kohya flags that have no equivalent here (commands/train.py's KOHYA_HINTS)."""
    from ..config import config_keys

    hints = hints or {}
    aliases: dict[str, tuple] = {}
    for key in config_keys():
        if key.items is not None:
            continue
        for name, const in key.kohya.items():
            aliases[name] = (key, const)
        aliases.setdefault(key.attr, (key, None))  # sd-scripts flags spelled as ours: seed, lr_scheduler, noise_offset ...
    values: dict = {}
    unmapped: list[tuple[str, object, str]] = []
    empty: list[str] = []

    def put(key, value):
        (values.setdefault(key.section, {}) if key.section else values)[key.attr] = value

    gui = dict(gui)
    # the GUI's own rules first
    out_dir, out_name = gui.pop("output_dir", ""), gui.pop("output_name", "")
    if out_dir or out_name:
        values["output"] = str(Path(out_dir or ".") / f"{out_name or 'last'}.safetensors")
    epoch = gui.pop("epoch", 0)  # the GUI computes max_train_steps from it when no steps/epochs are set
    if not _empty(epoch) and _empty(gui.get("max_train_steps")) and _empty(gui.get("max_train_epochs")):
        gui["max_train_epochs"] = epoch
    unet_lr = gui.pop("unet_lr", 0)  # sd-scripts: unet_lr, when set, is the UNet's rate instead of learning_rate
    if not _empty(unet_lr):
        gui["learning_rate"] = unet_lr
    noise_type = gui.pop("noise_offset_type", "Original")
    if noise_type != "Original":  # the GUI passes noise_offset only for "Original"; Multires is another method
        unmapped.append(("noise_offset_type", noise_type, "no multi-resolution noise here (only noise_offset, kohya's \"Original\")"))
        gui.pop("noise_offset", None)
    if gui.get("model_list") == gui.get("pretrained_model_name_or_path"):
        gui.pop("model_list", None)  # the GUI's model dropdown, the same model
    lora_type = gui.pop("LoRA_type", None)
    conv = {k: gui.pop(k, 0) for k in ("conv_dim", "conv_alpha")}
    if lora_type is not None:
        if lora_type in GUI_LORA_TYPES:
            method, preset = GUI_LORA_TYPES[lora_type]
            values.setdefault("network", {}).update(method=method, preset=preset)
            if preset == "full":
                for gui_key, ours in (("conv_dim", "conv_rank"), ("conv_alpha", "conv_alpha")):
                    if not _empty(conv[gui_key]):
                        values["network"][ours] = config_key(f"network.{ours}").coerce(conv[gui_key])
        else:
            unmapped.append(("LoRA_type", lora_type, f"no such adapter here; choose one of {', '.join(GUI_LORA_TYPES)}"))
    for gui_key, ours in GUI_NAMES.items():
        if gui_key in gui and ours not in gui:
            gui[ours] = gui.pop(gui_key)
        elif gui_key in gui:
            v = gui.pop(gui_key)
            (empty.append(gui_key) if _empty(v) else unmapped.append((gui_key, v, f"{ours} is set too, and wins")))
    if isinstance(gui.get("resolution"), str) and "," in gui["resolution"]:
        w, _, h = gui["resolution"].partition(",")
        if w.strip() != h.strip():
            unmapped.append(("max_resolution", gui.pop("resolution"), "a non-square training area is not supported: "
                             "set data.resolution = N (area N x N)"))
        else:
            gui["resolution"] = w.strip()

    for name, value in gui.items():
        if name not in aliases:
            if _empty(value) or value is False:
                empty.append(name)
            else:
                unmapped.append((name, value, hints.get(name, "no equivalent in sd-lora")))
            continue
        key, const = aliases[name]
        if const is not None:  # a switch: true sets the constant; false is the switch left out
            if not isinstance(value, bool):
                unmapped.append((name, value, "expected true or false"))
            elif isinstance(const, bool):
                put(key, const if value else not const)
            elif value:
                put(key, const)
            else:
                empty.append(name)
            continue
        if _empty(value) and (key.optional or key.meta.get("zero") or key.kind == "str"):
            empty.append(name)  # 0 / "" is the GUI's "not set"
            continue
        try:
            coerced = key.coerce(value)
        except ValueError as e:
            unmapped.append((name, value, str(e)))
            continue
        problem = key.problem(coerced)
        if problem:
            unmapped.append((name, value, problem))
            continue
        put(key, coerced)
    return GuiImport(values, unmapped, sorted(set(empty)))
