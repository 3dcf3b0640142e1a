"""The service's LoRA folder: which names a request may use, and whether each file fits the base.

Each file is read (through the shared LoRA cache, so the worker's first apply reads nothing again)
and matched against the loaded pipeline once per version of the file (path, size, mtime): a LoRA for
another architecture, or one whose modules fit no layer of the base, is listed with its problem and
refused at request time, before anything reaches the model."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import RequestError

# resolve_lora_name writes this where it would write the folder's path: a client is not told the
# server's directory layout.
_FOLDER_WORDS = "the server's LoRA folder"


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: Path
    architecture: str | None  # what the file says it is for ("sd1", "sd2", "sdxl"; None: it does not say)
    problem: str | None  # why it cannot be used with this base (None: it can)
    trigger_words: tuple[str, ...]
    hash: str | None  # A1111's LoRA hash (the one in the PNG's "Lora hashes")

    def info(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "compatible": self.problem is None,
                "problem": self.problem, "trigger_words": list(self.trigger_words), "hash": self.hash}


class LoraCatalog:
    def __init__(self, lora_dir, pipe):
        from ..models import architecture_of
        from ..stack import available_loras

        self.dir = Path(lora_dir)
        available_loras(self.dir)  # a missing folder is refused now, with the message that says so
        self.pipe = pipe
        self.architecture = architecture_of(pipe).arch
        self._checked: dict[tuple, LoraEntry] = {}
        self._lock = threading.Lock()

    def names(self) -> dict[str, Path]:
        from ..stack import available_loras

        return available_loras(self.dir)

    def entries(self) -> list[LoraEntry]:
        return [self._entry(name, path) for name, path in sorted(self.names().items())]

    def lookup(self, name: str, names: dict[str, Path] | None = None) -> LoraEntry:
        """The entry for a request's LoRA name: RequestError 404 (unknown, with the closest names) or
        422 (a file that does not fit the base)."""
        from ..stack import resolve_lora_name

        names = self.names() if names is None else names
        try:
            path = resolve_lora_name(name, _FOLDER_WORDS, names)
        except ValueError as e:
            raise RequestError(404, str(e)) from None
        found = next(k for k, v in names.items() if v == path)
        entry = self._entry(found, path)
        if entry.problem:
            raise RequestError(422, f"LoRA {name!r} cannot be used with this server's base model: {entry.problem}")
        return entry

    def _entry(self, name: str, path: Path) -> LoraEntry:
        from ..formats.read import match_lora
        from ..infotext import lora_hash
        from ..stack.cache import default_cache, file_key

        key = (name, file_key(path))
        with self._lock:
            if key in self._checked:
                return self._checked[key]
        arch = problem = lhash = None
        words: tuple[str, ...] = ()
        try:
            _, lora = default_cache().get(path)
            arch, words, lhash = lora.arch, tuple(lora.trigger_words), lora_hash(path)
            match_lora(lora, self.pipe, strict=True)  # architecture, names and shapes: what apply_loras checks first
        except (ValueError, OSError) as e:
            problem = str(e).replace(str(path), name)
        entry = LoraEntry(name, path, arch, problem, words, lhash)
        with self._lock:
            self._checked[key] = entry
        return entry
