"""Workspace confinement: every path the web UI accepts from a browser must stay inside the workspace.

Why: the UI takes folder and file names typed into text boxes (or sent straight to its API by any
script). Without a check, `../../etc` or a symlink planted in a dataset folder would let a browser
read or write anywhere the server user can. So each user-given path is resolved (symlinks followed,
`..` collapsed) and must land inside the resolved workspace root, or it is refused with a message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path


class PathError(ValueError):
    """A path from the browser that is outside the workspace (or otherwise not acceptable)."""


class Workspace:
    """The one folder the UI may read and write. Subfolders by convention:

    datasets/  image folders (one per dataset)     loras/    LoRA files (the library)
    models/    base models                          jobs/     one folder per training job
    outputs/   generated images                     configs/  training configs saved from the Train tab
    """

    SUBDIRS = ("datasets", "loras", "models", "jobs", "outputs", "configs")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in self.SUBDIRS:
            (self.root / sub).mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def path(self, user_path: str | os.PathLike, must_exist: bool = False, kind: str = "path", relative_ok: bool = True) -> Path:
        """Resolve a browser-given path (relative to the workspace, or absolute inside it).

        Raises PathError for anything that resolves outside the workspace, including through
        symlinks, and for NUL bytes. `kind` names the field in the message ("dataset folder");
        `relative_ok=False` for paths whose reader does not take them from the workspace (kohya configs).
        """
        text = os.fspath(user_path).strip()
        if "\x00" in text:
            raise PathError(f"{kind}: contains a NUL byte; type a plain folder or file name")
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = self.root / p
        # resolve(strict=False) follows every symlink that exists and collapses `..`, so a link
        # inside the workspace pointing out of it is caught here too.
        resolved = p.resolve()
        if not _inside(resolved, self.root):
            link = _link_out(p, self.root)
            if link:  # listed inside the workspace, but a symlink leads out: say so, and what to do
                raise PathError(
                    f"{kind}: {text!r} is a symbolic link (at {link.relative_to(self.root).as_posix()}) whose target {resolved} is outside "
                    f"the workspace {self.root}; the UI reads only files inside it. Move or copy the files into the "
                    "workspace (a link may point only inside it), or start the UI with --workspace set to a folder "
                    "that holds them"
                )
            raise PathError(
                f"{kind}: {text!r} is outside the workspace {self.root}; use a path inside it"
                + (" (relative paths are taken from the workspace)" if relative_ok else "")
            )
        if must_exist and not resolved.exists():
            raise PathError(f"{kind}: {text!r} does not exist in the workspace {self.root}")
        return resolved

    def relative(self, path: str | os.PathLike) -> str:
        """A workspace-relative display form of a path inside the workspace."""
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.root)) or "."
        except ValueError:
            return str(p)

    def child(self, parent: Path, name: str, kind: str = "name") -> Path:
        """`parent / name` for a single user-given file or folder name (no separators, no dots-only)."""
        name = safe_name(name, kind)
        return self.path(parent / name, kind=kind)


def map_config_paths(cfg, fn):
    """`cfg` with every path value replaced by `fn(path, key_name)`.

    Which keys are paths is asked of the config's fields (their `path` marker), so a new path key is
    handled as soon as it is declared; there is no list here to forget it in.
    """
    from sd_lora.config import config_keys

    for key in config_keys():
        path = key.path_value(key.get(cfg))
        if path is not None:
            key.set(cfg, fn(path, key.name))
        for i, table in enumerate(key.get(cfg) if key.items is not None else []):  # [[data.subsets]]: their paths too
            for sub in key.item_keys():
                path = sub.path_value(sub.get(table))
                if path is not None:
                    sub.set(table, fn(path, f"{key.name}[{i + 1}].{sub.attr}"))
    return cfg


def confine_config(ws: Workspace, cfg, snapshot: bool = True):
    """Every path in a browser-given training config resolved inside the workspace (absolute), or PathError.

    A kohya dataset config (data.dataset_config_path) names folders of its own: each is checked too
    (`confine_dataset_config`); with `snapshot` the config then points at the checked copy."""
    if cfg.data.dataset_config_path:
        cfg.data.dataset_config_path = str(confine_dataset_config(ws, cfg.data.dataset_config_path, snapshot))
    cfg = map_config_paths(cfg, lambda path, name: str(ws.path(path, kind=name)))
    for i, table in enumerate(cfg.data.subsets):
        if table.metadata_path:
            confine_metadata_images(ws, table.metadata_path, table.path or None, f"data.subsets[{i + 1}].metadata_path")
    return cfg


def confine_metadata_images(ws: Workspace, metadata_path: str, image_dir: str | None, where: str) -> None:
    """PathError when a fine-tuning metadata file (JSON of image -> caption) names an image outside the
    workspace: its keys are paths too (absolute, or relative to the subset's folder), read by the scan."""
    from sd_lora.data.kohya_config import read_metadata

    try:
        pairs, _missing = read_metadata(metadata_path, image_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # not readable as metadata: the dataset scan refuses it with its own message
    for image, _caption in pairs:
        ws.path(Path(image).absolute(), kind=f"{where}: {Path(metadata_path).name} names an image")  # as the reader sees it


SNAPSHOTS = "configs/.kohya-snapshots"  # checked copies of kohya dataset configs (no browser call writes a dot folder)
MAX_DATASET_CONFIG_BYTES = 1_000_000


def confine_dataset_config(ws: Workspace, user_path: str, snapshot: bool = True) -> Path:
    """A kohya dataset config inside the workspace whose every folder and file (image_dir, metadata_file,
    conditioning_data_dir, ... as sd_lora.data.kohya_config.dataset_config_paths lists them, from every
    table) is an absolute path inside it; PathError naming each one that is not.

    Relative paths are refused: kohya reads them from the folder the trainer runs in first, which is not
    the UI's (a job runs elsewhere), so what was checked could differ from what is read. With `snapshot`
    the bytes that were checked are copied to SNAPSHOTS/<name>-<sha256>.<ext> and that copy is returned:
    a job queued now reads them, not a file edited after the check."""
    import hashlib

    from sd_lora.data.kohya_config import KohyaConfigError, dataset_config_paths

    kind = "data.dataset_config_path"
    src = ws.path(user_path, must_exist=True, kind=kind)
    if not src.is_file() or src.suffix.lower() not in (".toml", ".json"):
        raise PathError(f"{kind}: {user_path!r} is not a kohya dataset config file (.toml or .json)")
    data = src.read_bytes()
    if len(data) > MAX_DATASET_CONFIG_BYTES:
        raise PathError(f"{kind}: {user_path!r} is {len(data)} bytes; a dataset config is text of a few kB")
    checked = src
    if snapshot:
        digest = hashlib.sha256(data).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_+-]", "_", src.stem)[:64]
        checked = ws.root / SNAPSHOTS / f"{stem}-{digest}{src.suffix.lower()}"
        if not checked.is_file():
            from sd_lora.io import atomic_write

            with atomic_write(checked) as f:
                f.write(data)
    try:
        named = dataset_config_paths(checked)
    except KohyaConfigError as e:
        raise PathError(f"{kind}: {e}") from e
    shown, problems = ws.relative(src), []
    for where, value in named:
        if not isinstance(value, str):
            continue  # not a path: the reader refuses it with its line
        if not Path(value).expanduser().is_absolute():
            problems.append(f"{shown}: {where} = {value!r} is a relative path; write it as the absolute path of the "
                            f"folder inside the workspace (e.g. {ws.root / 'datasets' / Path(value).name})")
            continue
        try:
            ws.path(value, kind=f"{shown}: {where}", relative_ok=False)
        except PathError as e:
            problems.append(str(e))
    if not problems:  # the metadata files' image entries (fine-tuning subsets), once their folders are known good
        from sd_lora.data.kohya_config import read_dataset_config

        try:
            subsets = read_dataset_config(checked).subsets
        except ValueError:
            subsets = []  # validate() lists the file's problems, and a config with problems does not start
        for where, table in subsets:
            if table.metadata_path:
                try:
                    confine_metadata_images(ws, table.metadata_path, table.path or None, f"{shown}: {where}.metadata_file")
                except PathError as e:
                    problems.append(str(e))
    if problems:
        raise PathError("\n".join(problems))
    return checked


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}$")


def safe_name(name: str, kind: str = "name") -> str:
    """A single file/folder name typed by a user: letters, digits, space, `._+-`, no path parts."""
    name = (name or "").strip()
    if not _SAFE.match(name) or name in (".", ".."):
        raise PathError(
            f"{kind}: {name!r} is not a plain name; use letters, digits, spaces and . _ + - "
            "(no slashes, not starting with a dot), at most 128 characters"
        )
    return name


def _link_out(path: Path, root: Path) -> Path | None:
    """The first symlink on `path` (a path under `root`, `..` not yet collapsed) if the path lies inside
    `root` when read without following links; None when it leads out by itself (`../x`, an absolute path)."""
    try:
        parts = Path(os.path.normpath(path)).relative_to(root).parts
    except ValueError:
        return None
    for i in range(1, len(parts) + 1):
        if (root.joinpath(*parts[:i])).is_symlink():
            return root.joinpath(*parts[:i])
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass). The password may contain colons; both parts must be non-empty."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD with both parts non-empty, e.g. --auth me:s3cret")
    return user, password


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """The warning to print when the UI listens beyond this machine without a password."""
    if is_loopback(host) or auth:
        return None
    return (
        f"WARNING: the web UI listens on {host} without --auth: anyone who can reach this machine can "
        "read and write files in the workspace and run training jobs. Add --auth USER:PASSWORD, or "
        "bind to 127.0.0.1 (the default) and use an SSH tunnel."
    )
