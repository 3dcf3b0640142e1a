"""A byte-bounded LRU of parsed LoRA files, so switching back to a recently used file reads nothing.

Entries are `LoraFile`s exactly as read (low-rank factors in the file's dtype: an SD1.5 r16 attention
LoRA is ~9 MB), not dense deltas, so even a small bound holds dozens of files. A file is keyed by
its resolved path, size and modification time: an edited or replaced file is read again.

Optionally (`dense_bytes` > 0) the cache also keeps the dense deltas of modules whose delta has to
be computed densely anyway (LoHa, LoKr, LoCon with a CP core, full "diff" modules), in a second LRU
with its own bound: switching back to such a file then skips the Hadamard/Kronecker products. Plain
LoRA/LoCon modules never get a dense copy (their fused `addmm` from the factors costs no more than
adding a stored delta would), nor do modules whose delta depends on the base weight (DoRA, OFT:
`LoraModule.needs_base`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

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
    """LRU of parsed LoRA files bounded by `max_bytes` (the files' tensor bytes), and optionally of
    dense deltas bounded by `dense_bytes` (0, the default, keeps none)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, dense_bytes: int = 0):
        if max_bytes < 0 or dense_bytes < 0:
            raise ValueError("max_bytes and dense_bytes must be >= 0 (0 disables that cache)")
        self.max_bytes = int(max_bytes)
        self.dense_bytes = int(dense_bytes)
        self._entries: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._bytes = 0
        self._dense: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._dense_used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.dense_hits = 0

    @property
    def num_bytes(self) -> int:
        return self._bytes

    @property
    def dense_num_bytes(self) -> int:
        return self._dense_used

    def dense_delta(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached dense delta for `key`, or `compute()` (kept if it fits `dense_bytes`).

        The returned tensor may be shared with the cache: callers must not modify it in place.
        """
        if self.dense_bytes <= 0:
            return compute()
        with self._lock:
            delta = self._dense.get(key)
            if delta is not None:
                self._dense.move_to_end(key)
                self.dense_hits += 1
                return delta
        delta = compute()
        size = delta.numel() * delta.element_size()
        with self._lock:
            if size <= self.dense_bytes and key not in self._dense:
                self._dense[key] = delta
                self._dense_used += size
                self._evict_dense()
        return delta

    def _evict_dense(self) -> None:
        while self._dense_used > self.dense_bytes and self._dense:
            _, evicted = self._dense.popitem(last=False)
            self._dense_used -= evicted.numel() * evicted.element_size()

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

    def resize(self, max_bytes: int, dense_bytes: int | None = None) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.num_bytes()
            if dense_bytes is not None:
                self.dense_bytes = int(dense_bytes)
                self._evict_dense()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._dense.clear()
            self._dense_used = 0


_default_cache = LoraCache()


def default_cache() -> LoraCache:
    return _default_cache


def set_cache_limit(max_bytes: int, dense_bytes: int | None = None) -> None:
    """Set the memory bounds of the shared LoRA cache: parsed files (`max_bytes`; 0 disables caching)
    and, optionally, dense deltas of LoHa/LoKr/full modules (`dense_bytes`; default 0: none kept)."""
    _default_cache.resize(max_bytes, dense_bytes)
