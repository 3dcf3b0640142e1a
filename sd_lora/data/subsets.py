"""Subsets: the image folders of a dataset, each with its repeats, caption options, flip and resolution.

Three ways to describe them give one result, a list of `Subset` with every option decided:

    data.path (+ data.reg_path)       each kohya `N_name` folder is a subset (N = repeats, name = prompt);
                                      a folder without them is one subset with data.repeats
    [[data.subsets]] tables           our TOML; a key a table leaves out takes the [data] value
    data.dataset_config_path          a kohya sd-scripts dataset config (sd_lora/data/kohya_config.py),
                                      whose [general] < [[datasets]] < [[datasets.subsets]] values are
                                      merged into one table per subset, then read as [[data.subsets]]

Which options a table may set, and their descriptions, are the fields of config.SubsetConfig (each
copies the [data] field it overrides), so this module only merges values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..config import DataConfig, SubsetConfig

REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class Subset(SubsetConfig):
    """A subset with every option decided (no None left but prompt and metadata_path)."""

    name: str = ""  # as reports and ss_dataset_dirs / ss_tag_frequency show it ("10_dotted", "reg:1_dog")
    source: str = ""  # where it was described, for messages ("data.subsets[2]", "data.path", "x.toml: datasets[1]...")
    key: str = "data.path"  # the config key to name in messages about its folder
    recursive: bool = True  # images of sub-folders too (kohya's dataset config reads the folder itself only)


def inherited_fields() -> list[str]:
    """The SubsetConfig keys that take the [data] value when a table leaves them out."""
    return [f.name for f in fields(SubsetConfig) if f.metadata.get("inherits")]


def resolve(table: SubsetConfig, data: DataConfig, name: str, source: str, key: str, recursive: bool = True) -> Subset:
    """One table with the [data] value for each key it leaves out."""
    values = {f.name: getattr(table, f.name) for f in fields(SubsetConfig)}
    for attr in inherited_fields():
        if values[attr] is None:
            values[attr] = getattr(data, SubsetConfig.__dataclass_fields__[attr].metadata["inherits"])
    if values["prompt"] is None:
        values["prompt"] = data.class_prompt if table.is_reg else data.instance_prompt
    return Subset(**values, name=name, source=source, key=key, recursive=recursive)


def folder_subsets(root: Path, data: DataConfig, is_reg: bool) -> list[Subset]:
    """The subsets of a kohya-layout folder: one per `N_name` folder, or the folder itself when it has none."""
    key = "data.reg_path" if is_reg else "data.path"
    tag = "reg:" if is_reg else ""
    named = sorted(p for p in root.iterdir() if p.is_dir() and REPEATS_FOLDER.match(p.name)) if root.is_dir() else []
    if not named:
        return [resolve(SubsetConfig(path=str(root), is_reg=is_reg), data, tag + root.name, key, key)]
    out = []
    for p in named:
        m = REPEATS_FOLDER.match(p.name)
        prompt = (data.class_prompt if is_reg else data.instance_prompt) or m[2].replace("_", " ").strip()
        table = SubsetConfig(path=str(p), is_reg=is_reg, repeats=max(1, int(m[1])), prompt=prompt)
        out.append(resolve(table, data, tag + p.name, key, key))
    return out


def dataset_subsets(data: DataConfig) -> list[Subset]:
    """Every subset of `data`: from the kohya dataset config, the [[data.subsets]] tables, or the folders."""
    if data.dataset_config_path:
        from .kohya_config import read_dataset_config

        kohya = read_dataset_config(data.dataset_config_path)
        return _named([resolve(t, data, "", f"{data.dataset_config_path}: {where}", f"{data.dataset_config_path}: {where}.path",
                               recursive=False) for where, t in kohya.subsets])
    if data.subsets:
        return _named([resolve(t, data, "", f"data.subsets[{i + 1}]", f"data.subsets[{i + 1}].path")
                       for i, t in enumerate(data.subsets)])
    out = folder_subsets(Path(data.path), data, False)
    if data.reg_path:
        out += folder_subsets(Path(data.reg_path), data, True)
    return out


def validation_subsets(data: DataConfig) -> list[Subset]:
    """The subsets of data.validation_path (validation loss, #18): read as a kohya-layout folder, every image held
    out (validation_split 1.0, as kohya marks a validation folder in its dataset config)."""
    if not data.validation_path:
        return []
    out = []
    for s in folder_subsets(Path(data.validation_path), data, False):
        out.append(replace(s, name="val:" + s.name, source="data.validation_path", key="data.validation_path",
                           validation_split=1.0))
    return out


def _named(subsets: list[Subset]) -> list[Subset]:
    """Names for listed subsets: the folder's name (`reg:` for regularization), made unique (the same folder may
    be listed twice, e.g. at two resolutions)."""
    out, seen = [], {}
    for s in subsets:
        base = ("reg:" if s.is_reg else "") + (Path(s.path).name if s.path else Path(s.metadata_path or "subset").stem)
        seen[base] = seen.get(base, 0) + 1
        out.append(replace(s, name=base if seen[base] == 1 else f"{base}#{seen[base]}"))
    return out
