"""Safe file reading and atomic writing, shared by every module that touches model files.

Why our own code: safetensors' own errors on a damaged file are terse ("MetadataIncompleteBuffer")
and say nothing about which file or what to do; a `.ckpt` must never be unpickled; and every file we
write must appear whole or not at all (a killed process or a full disk never leaves half a file).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A safetensors header larger than this is refused: real LoRA/model headers are well under 10 MB,
# and a hostile length field must not make us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64",
}


class CheckpointError(ValueError):
    """A model or LoRA file that cannot be read safely. The message names the file and the fix."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Validate a .safetensors file's structure and return (tensor table, metadata) without reading tensors.

    Checks the header length, the JSON, every tensor's dtype/shape/offsets against the file size, so a
    truncated or malformed file gives a clear error here rather than a crash (or a hang) later.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes long).")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{path}: damaged or truncated safetensors file (header says {n} bytes, file has {size - 8} "
                    "after the length field). Download or copy the file again."
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors file (header is not valid JSON: {e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors file (header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: damaged safetensors file (__metadata__ must map strings to strings).")
    data_len = size - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: damaged safetensors file (bad entry for tensor {name!r}).") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}.")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {[start, end]!r}.")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} but the file holds "
                f"{data_len} data bytes). Download or copy the file again."
            )
        numel = 1
        for s in shape:
            numel *= s
        itemsize = 1 if dtype in ("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2") else 2 if dtype in ("F16", "BF16", "I16", "U16") else 4 if dtype in ("F32", "I32", "U32") else 8
        if numel * itemsize != end - start:
            raise CheckpointError(f"{path}: tensor {name!r} size does not match its shape {shape} and dtype {dtype}.")
        end_max = max(end_max, end)
    return header, metadata


def _torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name, None when torch has no such dtype (U16/U32/U64).
    torch is imported here, not at the top: atomic_write and the header reader serve torch-free code
    (captions, the CLI, config checks)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
        "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }.get(name)


def stream_safetensors(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Yield (name, tensor) of a validated .safetensors file one tensor at a time, read with plain file
    reads (no memory map); floating-point tensors are converted to `dtype` when given.

    Why not safetensors' own reader: it memory-maps the file, and every page a tensor touched stays
    resident, and counted in the process's memory, until the whole file is unmapped. Converting an
    fp32 SD1.5 UNet to bf16 that way peaks at the 3.4 GB of fp32 pages plus the 1.7 GB bf16 copy;
    reading tensor by tensor peaks at the converted weights plus one fp32 tensor.
    """
    header, _ = read_safetensors_header(path)
    try:
        with open(path, "rb") as f:
            data_start = _data_start(f)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                yield name, _read_tensor(f, data_start, path, name, info, dtype)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror or e}") from e


def read_safetensors_tensor(path: str | os.PathLike, name: str, info: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a .safetensors file (`info`: its entry of `read_safetensors_header`), read with plain
    file reads like `stream_safetensors`, for code that wants the weights of one layer at a time."""
    try:
        with open(path, "rb") as f:
            return _read_tensor(f, _data_start(f), path, name, info, dtype)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror or e}") from e


def _data_start(f) -> int:
    """Offset of the first tensor byte: after the 8-byte header length and the header."""
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def _read_tensor(f, data_start: int, path, name: str, info: dict, dtype: torch.dtype | None) -> torch.Tensor:
    import torch

    source = _torch_dtype(info["dtype"])
    if source is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which torch cannot hold.")
    start, end = info["data_offsets"]
    buf = bytearray(end - start)
    f.seek(data_start + start)
    if f.readinto(buf) != len(buf):
        raise CheckpointError(f"{path}: the file ended inside tensor {name!r}. Copy the file again.")
    tensor = (torch.frombuffer(buf, dtype=source) if buf else torch.empty(0, dtype=source)).reshape(info["shape"])
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a validated .safetensors file: (tensors, metadata)."""
    from safetensors import safe_open

    _, metadata = read_safetensors_header(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own SafetensorError type
        raise CheckpointError(f"{path}: cannot read tensors: {e}") from e
    return tensors, metadata


def load_pickle_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .ckpt/.pt/.bin with `torch.load(weights_only=True)`: tensors only, nothing executed.

    Anything that would need real unpickling (custom classes, `__reduce__` tricks) is refused.
    """
    import torch

    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a hostile pickle makes torch.load raise anything (IndexError, struct.error, ...)
        raise CheckpointError(
            f"{path}: refused to load. This pickle file contains more than plain tensors, or is damaged, "
            "and loading it could run code. Convert it to .safetensors with a tool you trust, or use a "
            f"safetensors download of the same model. ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    return obj


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any supported weights file: .safetensors (validated) or .ckpt/.pt/.bin (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return load_pickle_checkpoint(path), {}
    raise CheckpointError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors or .ckpt.")


def _umask() -> int:
    # Read without changing it where the kernel says (os.umask would briefly change it for all threads).
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() would give under the process's current umask (0644 / 0755 usually)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`.

    A crash, a full disk or an exception leaves any previous `path` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # After the writer: mkstemp makes 0600 files, and a writer may replace the file with its own
        # 0600 temporary (safetensors 0.8's save_file does). The result gets what open() would give.
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Open a file object whose contents replace `path` atomically when the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` to a temporary file, then an atomic rename (never a half-written file)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
