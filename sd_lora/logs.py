"""Where log lines go: sd-lora's own lines to the console, the libraries' chatter only with --verbose.

A newcomer's console (and a web UI job's log.txt) should show the dataset report, the step
arithmetic, "resumed from", "saved" and our warnings, not torchvision fallbacks, "modules that should
be kept in float32: []", bitsandbytes kernel notices or "Loading pipeline components" bars. So:

- our loggers (`sd_lora.*`, `webui.*`) print at INFO (DEBUG with verbose);
- every other logger, and Python warnings raised outside sd_lora, print only from ERROR up, unless
  verbose: then everything does;
- diffusers and transformers configure their own handlers lazily (their `_configure_library_root_logger`
  sets the level from DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY at first use, after anything we
  set on the logger), so their level is set through those variables; their progress bars are turned
  off by `quiet_libraries` once the command is about to import them anyway.
- `debug_log`: a file that gets every record (ours and theirs, DEBUG up), for a job folder.

Torch-free and cheap to import: the CLI calls `setup_logging` before any command runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

OURS = ("sd_lora", "webui", "__main__")
_FORMAT = "%(message)s"


def _is_ours(record: logging.LogRecord) -> bool:
    if record.name == "py.warnings":  # logging.captureWarnings: the message starts with the file's path
        return f"{os.sep}sd_lora{os.sep}" in str(record.getMessage()).split(":", 1)[0]
    return record.name.split(".", 1)[0] in OURS


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        return record.levelno >= (logging.INFO if _is_ours(record) else logging.ERROR)


def setup_logging(verbose: bool = False, debug_log: str | Path | None = None, stream=None) -> None:
    """Configure the root logger for a command or a training process (replaces earlier handlers of ours)."""
    os.environ["DIFFUSERS_VERBOSITY"] = os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    if not verbose:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' and huggingface_hub's bars
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_sd_lora", False)]:
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT))
    console.addFilter(_ConsoleFilter(verbose))
    handlers = [console]
    if debug_log is not None:
        f = logging.FileHandler(debug_log, encoding="utf-8")
        f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(f)
    for h in handlers:
        h._sd_lora = True
        root.addHandler(h)
    root.setLevel(logging.DEBUG if (verbose or debug_log is not None) else logging.INFO)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def quiet_libraries(verbose: bool = False) -> None:
    """Before a command loads models: diffusers' and transformers' loggers go through ours (so the
    filter above and the debug log see them) and, unless verbose, their progress bars are off.
    Imports diffusers (and so torch): call it where the command is about to anyway."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity(logging.INFO if verbose else logging.WARNING)
        lib.disable_default_handler()
        lib.enable_propagation()  # to the root handlers of setup_logging (filtered there)
        if not verbose:
            lib.disable_progress_bar()
