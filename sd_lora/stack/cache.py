"""A byte-bounded LRU of parsed LoRA files, so switching back to a recently used file reads nothing.

Entries are `LoraFile`s exactly as read (low-rank factors in the file's dtype: an SD1.5 r16 attention
LoRA is ~9 MB), never dense deltas, so even a small bound holds dozens of files. A file is keyed by
its resolved path, size and modification time: an edited or replaced file is read again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..formats.lora_file import LoraFile

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise FileNotFoundError(f"LoRA file {str(p)!r} not found ({e.strerror}). Check the path or the --lora-dir folder.") from e
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


class LoraCache:
    """LRU of parsed LoRA files bounded by `max_bytes` (the files' tensor bytes)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0 disables caching)")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str | os.PathLike) -> tuple[tuple, LoraFile]:
        """(key, LoraFile) for `path`, read with `load_lora` unless a current copy is cached."""
        key = file_key(path)
        with self._lock:
            lora = self._entries.get(key)
            if lora is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return key, lora
        from ..formats.read import load_lora

        lora = load_lora(path)
        if lora.path is None:
            lora.path = str(path)
        with self._lock:
            self.misses += 1
            self._put(key, lora)
        return key, lora

    def _put(self, key: tuple, lora: LoraFile) -> None:
        size = lora.num_bytes()
        if size > self.max_bytes:
            return  # larger than the whole bound: use it once, keep nothing
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.num_bytes()
        self._entries[key] = lora
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.num_bytes()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.num_bytes()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_default_cache = LoraCache()


def default_cache() -> LoraCache:
    return _default_cache


def set_cache_limit(max_bytes: int) -> None:
    """Set the memory bound of the shared LoRA file cache (bytes; 0 disables caching)."""
    _default_cache.resize(max_bytes)
