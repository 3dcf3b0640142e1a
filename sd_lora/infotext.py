"""A1111's "infotext": the `parameters` text chunk of a PNG that A1111, Forge, ComfyUI's A1111 readers
and Civitai read, written and read back here, with the hashes they match models and LoRAs by.

Torch-free. Facts from AUTOMATIC1111/stable-diffusion-webui (read at commit 036500223de0, v1.10-era
code; the same lines are in Forge):

- Layout (modules/processing.py `create_infotext`): the prompt; a line `Negative prompt: ...` only when
  there is one; then one line of `Key: value` pairs joined by ", " in a fixed order (Steps, Sampler,
  Schedule type, CFG scale, Seed, Size, Model hash, Model, VAE hash, VAE, ..., the extra parameters
  such as "Lora hashes", then Version). Pairs whose value is None are left out. A value containing
  ",", ":" or a newline is written as a JSON string (modules/infotext_utils.py `quote`).
- Reading (infotext_utils.py `parse_generation_parameters`): the last line holds the pairs if the
  pair pattern finds at least 3 in it; lines before it up to "Negative prompt:" are the prompt, the
  rest the negative prompt; a JSON-quoted value is unquoted; a `WxH` value becomes `Key-1` / `Key-2`.
  `parse_infotext` follows that code (`re_param` copied as a fact, not the surrounding UI code).
- Model hash (modules/hashes.py `calculate_sha256`, sd_models.py `shorthash = sha256[0:10]`): the
  first 10 hex digits of the SHA-256 of the whole checkpoint file ("AutoV2" on Civitai).
- Lora hashes (extensions-builtin/Lora/network.py `set_hash`: `shorthash = hash[0:12]`, from
  `hashes.sha256(..., use_addnet_hash=True)` = `addnet_hash_safetensors`): the first 12 hex digits of
  the SHA-256 of the file's tensor bytes, everything after the 8-byte length and the JSON header
  (= kohya's `sshs_model_hash`, so metadata edits do not change it); the name as mentioned, with ":"
  and "," removed (extra_networks_lora.py), pairs "name: hash" joined by ", ".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# modules/infotext_utils.py re_param_code (a fact: what A1111 accepts as one `Key: value` pair)
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
MODEL_HASH_DIGITS = 10  # AutoV2
LORA_HASH_DIGITS = 12  # A1111's LoRA shorthash of the addnet (tensor-bytes) hash
_CHUNK = 1 << 20
_hash_cache: dict[tuple, str] = {}  # (kind, path, size, mtime_ns) -> hex; A1111 keeps the same in cache.json


def quote(value) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds ",", ":" or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """The `parameters` text: `params` in the order given (A1111's order is the caller's), None left out."""
    pairs = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters` (without its UI defaults): {"Prompt", "Negative prompt",
    key: value as text, ...}; "Size: 512x768" gives "Size-1": "512", "Size-2": "768"."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: it is part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = _SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    return res


def read_png_infotext(path: str | os.PathLike) -> str:
    """The `parameters` text of a PNG, or a ValueError saying that it has none."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters")
    if not text:
        raise ValueError(f"{str(path)!r} has no `parameters` text (not written by sd-lora, A1111 or Forge, "
                         "or its metadata was stripped); pass the settings on the command line instead")
    return text


def model_hash(path: str | os.PathLike) -> str:
    """AutoV2: the first 10 hex digits of the checkpoint file's SHA-256 (A1111's "Model hash").

    A diffusers folder has no file A1111 or Civitai would hash, so its hash is ours alone: the SHA-256
    of its weight files' bytes (*.safetensors, *.bin), in sorted relative-path order, each preceded by
    that path, so that any changed component (UNet, text encoder, VAE) or renamed file changes it.
    It identifies the folder for `--from-png`; it will not match a Civitai page."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(_cached("file", f, lambda f=f: _sha256(f))))
        return h.hexdigest()[:MODEL_HASH_DIGITS]
    return _cached("file", path, lambda: _sha256(path))[:MODEL_HASH_DIGITS]


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's "Lora hashes" entry: the first 12 hex digits of the SHA-256 of a .safetensors file's
    tensor bytes (the addnet hash; for another file type A1111 hashes the whole file)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return _cached("addnet", path, lambda: _sha256(path, after_header=True))[:LORA_HASH_DIGITS]
    return _cached("file", path, lambda: _sha256(path))[:LORA_HASH_DIGITS]


def file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """The hashes a LoRA file is looked up by (Civitai's names): `sha256` of the whole file, `autov2`
    its first 10 hex digits (A1111's model hash), `autov3` the first 12 of the tensor-bytes hash
    (A1111's "Lora hashes" entry; it survives metadata edits)."""
    path = Path(path)
    full = _cached("file", path, lambda: _sha256(path))
    return {"sha256": full, "autov2": full[:MODEL_HASH_DIGITS], "autov3": lora_hash(path)}


def lora_hash_name(name: str) -> str:
    """A LoRA's name as A1111 writes it in "Lora hashes" (':' and ',' would break the list)."""
    return name.replace(":", "").replace(",", "")


def _cached(kind: str, path: Path, compute) -> str:
    st = path.stat()
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = compute()
    return _hash_cache[key]


def _sha256(path: Path, after_header: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
