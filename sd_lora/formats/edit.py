"""Edit a LoRA file's user-facing metadata (title, description, trigger words, output name, cover
image) in place, keeping every tensor byte.

How: a safetensors file is an 8-byte header length, a JSON header (the tensor table and
`__metadata__`, strings only) and the tensor data, whose offsets are relative to the data's start.
So only the header is rewritten: the tensor table is copied as it was and the data bytes are copied
verbatim after it. The result is checked before it replaces the file (same table, same SHA-256 of
the data), and written with sd_lora.io's atomic writer: a crash leaves the old file, never half a new
one.

What stays valid: `sshs_model_hash` (kohya / additional-networks) and A1111's "Lora hashes" entry
hash the tensor bytes only (metadata.py, infotext.lora_hash), `modelspec.hash_sha256` likewise (SAI
spec: "a hash of all tensor content"). `sshs_legacy_hash` hashes 64 KiB at 1 MiB into the file as
saved with only its `ss_*` metadata, so it changes with `ss_output_name` / `ss_tag_frequency`: it is
recomputed (as kohya's precalculate_safetensors_hashes does) when the file has one.

Keys written (SAI model spec, Stability-AI/ModelSpec README.md at commit
02f627930582cd4ccc9c330835bb66ca9dddc715; kohya's ss_ keys):
  title -> `modelspec.title`, description -> `modelspec.description`, output_name -> `ss_output_name`,
  trigger words -> `modelspec.trigger_phrase` (comma-separated) and `ss_tag_frequency`,
  cover -> `modelspec.thumbnail` ("a (very small!) thumbnail icon in data-image format ... 256x256
  is a recommended size"): a JPEG data URI at most COVER_SIZE pixels on its longer side.

Trigger words live in `ss_tag_frequency` ({folder: {tag: count}}), which is what A1111, Civitai and
metadata.trigger_words() read. They are written as kohya `N_name` folders whose captions are the
word (`"1_ohwx": {"ohwx": n}`), placed first: trigger_words() lists such instance tokens before the
other tags, so the words come back first and in the order given. The folders added are recorded in
`sd_lora_trigger_folders`, so the next edit replaces them instead of piling up. (A word with an
underscore cannot be such a folder name, which trigger_words() reads with spaces: it is still counted
above every training tag, but comes after the training's own instance tokens, if it has any.)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path

from ..io import MAX_HEADER_BYTES, CheckpointError, atomic_path, read_safetensors_header

COVER_SIZE = 256  # longer side, pixels (the SAI spec's recommendation)
COVER_QUALITY = 85
MAX_COVER_PIXELS = 64 * 1024 * 1024  # a bigger image is refused before it is decoded (decompression bombs)
TRIGGER_FOLDERS_KEY = "sd_lora_trigger_folders"
_COPY_CHUNK = 1 << 20


def edit_metadata(
    path: str | os.PathLike,
    *,
    title: str | None = None,
    description: str | None = None,
    trigger_words: str | list[str] | None = None,
    cover=None,
    output_name: str | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Change a .safetensors LoRA's metadata and write it back atomically, tensors byte for byte.

    Args:
        path: the .safetensors file.
        title / description / output_name: new text; None leaves it, "" removes the key.
        trigger_words: a list or a comma-separated string; None leaves them, [] or "" removes ours.
        cover: an image file path or a PIL image, stored as a small JPEG data URI; "" removes it.
        out: write the edited file there instead of replacing `path`.

    Returns the new metadata. Raises ValueError (CheckpointError) naming the file for anything it
    cannot rewrite safely: not a safetensors file, a damaged or hostile header, an unreadable cover.
    """
    path = Path(path)
    out = path if out is None else Path(out)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors files can be edited (their metadata is a JSON header); "
                              "convert the file first: sd-lora convert FILE --to kohya")
    table, metadata, data_start = _read(path)
    new = dict(metadata)
    for key, value in (("modelspec.title", title), ("modelspec.description", description), ("ss_output_name", output_name)):
        if value is not None:
            _set(new, key, _text(value, key))
    if trigger_words is not None:
        _set_trigger_words(new, _words(trigger_words))
    if cover is not None:
        _set(new, "modelspec.thumbnail", cover_data_uri(cover) if cover != "" else "")
    if _ss(new) != _ss(metadata) and "sshs_legacy_hash" in metadata:
        new["sshs_legacy_hash"] = _legacy_hash(path, new)
    _write(path, out, table, new, data_start)
    return new


def _read(path: Path) -> tuple[dict, dict[str, str], int]:
    """(tensor table, metadata, data start) of a file that is safe to rewrite, else CheckpointError."""
    table, metadata = read_safetensors_header(path)  # length, JSON, dtypes, shapes, offsets, strings only
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{path}: the header names a key twice ({sorted(k for k in set(keys) if keys.count(k) > 1)[:3]}); "
                                  "readers disagree on which one counts: refusing to rewrite it")
        return dict(pairs)

    json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats)
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in table.items())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:  # safetensors itself refuses such files; a rewrite must not bless them
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data: not a file safetensors "
                                  "writes; refusing to rewrite it")
    return table, metadata, 8 + n


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key}: expected text, got {type(value).__name__}")
    return value.strip()


def _set(md: dict[str, str], key: str, value: str) -> None:
    if value:
        md[key] = value
    else:
        md.pop(key, None)


def _words(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    words: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"trigger words must be text, got {type(item).__name__}")
        word = " ".join(item.split())
        if word and word.lower() not in {w.lower() for w in words}:
            words.append(word)
    return words


def _set_trigger_words(md: dict[str, str], words: list[str]) -> None:
    """Our instance-token folders first in ss_tag_frequency (replacing the ones of an earlier edit),
    counted above every training tag, and modelspec.trigger_phrase."""
    try:
        freq = json.loads(md.get("ss_tag_frequency") or "{}")
        ours = json.loads(md.get(TRIGGER_FOLDERS_KEY) or "[]")
    except (json.JSONDecodeError, RecursionError):
        raise ValueError("ss_tag_frequency or sd_lora_trigger_folders is not valid JSON; fix or remove it "
                         "before setting trigger words") from None
    if not isinstance(freq, dict) or not isinstance(ours, list):
        raise ValueError("ss_tag_frequency must be a JSON object {folder: {tag: count}} to set trigger words")
    _set(md, "modelspec.trigger_phrase", ", ".join(words))
    if not words and not ours:
        return  # nothing of ours to take out: ss_tag_frequency stays as it was, byte for byte
    for folder in ours:
        freq.pop(folder, None)
    top = max((n for tags in freq.values() if isinstance(tags, dict) for n in tags.values()
               if isinstance(n, (int, float)) and not isinstance(n, bool)), default=0)
    folders = {f"1_{w}": {w: int(top) + len(words) - i} for i, w in enumerate(words)}
    freq = {**folders, **{k: v for k, v in freq.items() if k not in folders}}
    _set(md, "ss_tag_frequency", json.dumps(freq) if freq else "")  # json.dumps' defaults, as kohya writes it
    _set(md, TRIGGER_FOLDERS_KEY, json.dumps(list(folders)) if folders else "")


def cover_data_uri(image) -> str:
    """`data:image/jpeg;base64,...` of an image (a path or a PIL image), fitted in COVER_SIZE x COVER_SIZE."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, Image.Image):
            im = image.convert("RGB")  # JPEG: no alpha or palette
        else:
            with Image.open(image) as src:
                if src.width * src.height > MAX_COVER_PIXELS:
                    raise ValueError(f"cover {str(image)!r}: {src.width}x{src.height} is too large for a cover image")
                im = src.convert("RGB")
        im.thumbnail((COVER_SIZE, COVER_SIZE), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cover {str(image)!r}: not an image Pillow can read ({e})") from None
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=COVER_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_cover(metadata: dict[str, str]):
    """The cover image (`modelspec.thumbnail`) as a PIL image, None when there is none or it is unreadable."""
    from PIL import Image

    uri = metadata.get("modelspec.thumbnail") or ""
    head, sep, data = uri.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        return None
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        if im.width * im.height > MAX_COVER_PIXELS:
            return None
        im.load()
        return im
    except (ValueError, OSError, Image.DecompressionBombError):
        return None


def _ss(md: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in md.items() if k.startswith("ss_")}


def _legacy_hash(path: Path, metadata: dict[str, str]) -> str:
    from ..io import load_safetensors
    from .metadata import compute_sshs_hashes

    tensors, _ = load_safetensors(path)
    return compute_sshs_hashes(tensors, metadata)[1]


def _write(path: Path, out: Path, table: dict, metadata: dict[str, str], data_start: int) -> None:
    header = json.dumps({"__metadata__": metadata, **table}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors pads the header so the data starts 8-aligned
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: the new header would be {len(header)} bytes, above the {MAX_HEADER_BYTES} "
                         "that readers accept; use a shorter description or a smaller cover")
    before = _data_sha256(path, data_start)
    with atomic_path(out) as tmp:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(len(header).to_bytes(8, "little"))
            dst.write(header)
            src.seek(data_start)
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
        # Check before the rename: the same tensors at the same offsets, the same bytes.
        new_table, new_md = read_safetensors_header(tmp)
        if new_table != table or new_md != metadata or _data_sha256(tmp, 8 + len(header)) != before:
            raise CheckpointError(f"{path}: the rewritten file would change its tensors; left unchanged")


def _data_sha256(path: Path, data_start: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(data_start)
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()
