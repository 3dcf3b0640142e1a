"""`<lora:NAME:W>` prompt syntax (A1111 / Forge / Civitai), resolved against a folder of LoRA files.

A1111's order is `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`: one number sets both, two numbers set the text
encoder first, then the UNet. Named forms `te=` / `unet=` are accepted too. Block weights: the LoRA
Block Weight extension's `lbw=PRESET` / `lbw=1,0,...` and sdnext's `in=` / `mid=` / `out=`
(block_weights.py). The tags are removed from the prompt before it is encoded, so the text encoder
never sees them.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .block_weights import block_options, normalize_block_weights

# `<lora:...>` and the older LyCORIS extension's `<lyco:...>`; case-insensitive like A1111.
_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class PromptLora:
    """One `<lora:...>` tag: the name as written, its weights (UNet and text encoder) and block weights."""

    name: str
    weight: float  # UNet weight
    te_weight: float
    tag: str  # the tag as it appeared in the prompt
    block_weights: str | None = None  # canonical text (block_weights.normalize_block_weights)


def parse_lora_prompt(prompt: str) -> tuple[str, list[PromptLora]]:
    """Split `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>` tags out of `prompt`.

    Returns (prompt without the tags, tags in order). Raises ValueError on a tag that cannot be read
    (unclosed, empty name, a weight that is not a number) with the tag quoted, so the user can fix it.

    >>> parse_lora_prompt("a cat <lora:ink:0.8>, film")
    ('a cat, film', [PromptLora(name='ink', weight=0.8, te_weight=0.8, tag='<lora:ink:0.8>', block_weights=None)])
    """
    loras: list[PromptLora] = []
    for m in _TAG.finditer(prompt):
        loras.append(_parse_tag(m.group(0), m.group(2)))
    rest = _TAG.sub("", prompt)
    unclosed = _OPEN.search(rest)
    if unclosed:
        snippet = rest[unclosed.start(): unclosed.start() + 40]
        raise ValueError(f"unclosed LoRA tag in the prompt: {snippet!r}. Write it as <lora:NAME:WEIGHT>.")
    return _tidy(rest), loras


# Options of the LoRA Block Weight extension that change weights during sampling or by random draw:
# fused weights are fixed for a whole image, so they are refused by name rather than ignored.
_UNSUPPORTED = {"lbwe": "elemental block weights", "start": "a start step", "stop": "a stop step", "step": "a step range"}


def _parse_tag(tag: str, body: str) -> PromptLora:
    parts = [p.strip() for p in body.split(":")]
    name, args = parts[0], parts[1:]
    if not name:
        raise ValueError(f"LoRA tag {tag!r} has no name. Write it as <lora:NAME:WEIGHT>.")
    positional: list[float] = []
    named: dict[str, float] = {}
    lbw = None
    for a in args:
        key, eq, value = a.partition("=")
        if eq:
            key = key.strip().lower()
            if key == "lbw":
                lbw = value
            elif key in ("te", "unet", "in", "mid", "out"):
                named[key] = _number(tag, value)
            elif key in _UNSUPPORTED:
                raise ValueError(f"LoRA tag {tag!r}: {key}= ({_UNSUPPORTED[key]}, LoRA Block Weight extension) is not "
                                 "supported: the LoRA is fused into the weights for the whole image. Use lbw= only.")
            else:
                raise ValueError(f"LoRA tag {tag!r}: unknown option {key!r} (known: te=, unet=, lbw=, in=, mid=, out=).")
        else:
            if named:
                raise ValueError(f"LoRA tag {tag!r}: a plain weight cannot follow te=/unet=.")
            positional.append(_positional(tag, a))
    if len(positional) > 2:
        # A1111's third number is a "dynamic dim" for DyLoRA; we do not truncate ranks, so refuse it
        # rather than silently ignoring what the user asked for.
        raise ValueError(
            f"LoRA tag {tag!r} has {len(positional)} numbers; expected <lora:NAME:W> or <lora:NAME:TE_W:UNET_W> "
            "(the dynamic-dim argument is not supported)."
        )
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    unet, blocks = block_options(unet, lbw, named.get("in"), named.get("mid"), named.get("out"), where=f"LoRA tag {tag!r}: lbw")
    return PromptLora(name=name, weight=unet, te_weight=te, tag=tag, block_weights=blocks)


def _positional(tag: str, text: str) -> float:
    """A plain weight; a block weight preset or vector written where the extension's old syntax put it
    (`<lora:NAME:1:OUTD>`, which A1111 1.5+ reads as a UNet weight) gets told the lbw= spelling."""
    try:
        return _number(tag, text)
    except ValueError as not_a_number:
        try:
            normalize_block_weights(text)
        except (ValueError, TypeError):
            raise not_a_number from None
        raise ValueError(f"LoRA tag {tag!r}: write block weights as lbw={text} (e.g. <lora:NAME:1:lbw={text}>).") from None


def _number(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"LoRA tag {tag!r}: weight {text!r} is not a number (e.g. 0.8 or -0.5).") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"LoRA tag {tag!r}: weight {text!r} must be a finite number.")
    return value


def _tidy(prompt: str) -> str:
    """Remove what a deleted tag leaves behind: doubled spaces, a space before a comma, empty commas."""
    p = re.sub(r"[ \t]+", " ", prompt)
    p = re.sub(r"\s+,", ",", p)
    p = re.sub(r",(\s*,)+", ",", p)
    return p.strip().strip(",").strip()


def available_loras(lora_dir: str | os.PathLike) -> dict[str, Path]:
    """LoRA files under `lora_dir` (recursively) by name: the file stem, and `sub/stem` for files in subfolders.

    A stem found in two subfolders is listed only by its `sub/stem` names (it is ambiguous on its own).
    """
    root = Path(lora_dir)
    if not root.is_dir():
        raise ValueError(f"LoRA folder {str(root)!r} does not exist; pass --lora-dir with the folder of your .safetensors files.")
    by_stem: dict[str, list[Path]] = {}
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in LORA_SUFFIXES:
            rel = path.relative_to(root).with_suffix("").as_posix()
            names[rel] = path
            by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            names.setdefault(stem, paths[0])
    return names


def resolve_lora_name(name: str, lora_dir: str | os.PathLike, names: dict[str, Path] | None = None) -> Path:
    """The file for `<lora:NAME...>` in `lora_dir`; unknown names raise ValueError listing close matches."""
    names = available_loras(lora_dir) if names is None else names
    key = name.replace("\\", "/")
    for suffix in LORA_SUFFIXES:  # `<lora:ink.safetensors:1>` is a common slip
        if key.lower().endswith(suffix):
            key = key[: -len(suffix)]
    if key in names:
        return names[key]
    lower = {k.lower(): v for k, v in names.items()}
    if key.lower() in lower:
        return lower[key.lower()]
    ambiguous = [k for k in names if k.rsplit("/", 1)[-1] == key]
    if ambiguous:
        raise ValueError(f"LoRA name {name!r} is in several subfolders of {lora_dir}; write one of: {', '.join(sorted(ambiguous))}.")
    close = difflib.get_close_matches(key, list(names), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else (
        f" Available: {', '.join(sorted(names)[:20])}." if names else " The folder has no LoRA files."
    )
    raise ValueError(f"no LoRA named {name!r} in {lora_dir}.{hint}")


def prompt_to_stack(prompt: str, lora_dir: str | os.PathLike | None):
    """(prompt without tags, [LoraSpec]) for a prompt with `<lora:...>` tags resolved in `lora_dir`."""
    from .spec import LoraSpec

    clean, tags = parse_lora_prompt(prompt)
    if tags and lora_dir is None:
        raise ValueError(f"the prompt has LoRA tags ({tags[0].tag}...) but no LoRA folder was given (--lora-dir).")
    names = available_loras(lora_dir) if tags else {}
    specs = [LoraSpec(resolve_lora_name(t.name, lora_dir, names), weight=t.weight, te_weight=t.te_weight,
                      block_weights=t.block_weights) for t in tags]
    return clean, specs
