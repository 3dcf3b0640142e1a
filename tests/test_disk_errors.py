"""Disk full and read-only output: a clear error at the save, and nothing good is overwritten.

Simulated two ways: a read-only output folder (chmod; skipped when running as root, which ignores
permissions, in favour of the ENOSPC path), and `write`/`fsync` raising OSError(ENOSPC) part way
through a file, which is what a full disk does.
"""

from __future__ import annotations

import builtins
import importlib
import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from sd_lora.formats.kohya import save_lora
from sd_lora.io import atomic_write, load_safetensors, save_safetensors_atomic

SD = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("writer", ["save_lora", "save_safetensors_atomic", "atomic_write"])
def test_disk_full_keeps_the_previous_file_and_leaves_no_partial_file(tmp_path, writer):
    target = tmp_path / "lora.safetensors"
    save_lora(target, SD, dtype="fp32")
    good = target.read_bytes()
    with pytest.MonkeyPatch.context() as m:
        _full(m)
        with pytest.raises(OSError) as err:
            if writer == "save_lora":
                save_lora(target, {k: v * 2 for k, v in SD.items()}, dtype="fp32")
            elif writer == "save_safetensors_atomic":
                save_safetensors_atomic({"x": torch.zeros(1000)}, target)
            else:
                with atomic_write(target) as f:
                    f.write(b"x" * 10_000)
    assert err.value.errno == errno.ENOSPC and "No space left" in str(err.value)
    assert target.read_bytes() == good  # the previous file is untouched ...
    assert _only(tmp_path) == ["lora.safetensors"]  # ... and no temporary is left behind
    tensors, _ = load_safetensors(target)
    assert torch.equal(tensors[next(iter(SD))], SD[next(iter(SD))])


def _full(m):
    """Simulate a full disk: writes store half their bytes then raise ENOSPC; fsync fails too."""
    real_open = builtins.open

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _HalfWriter(f) if any(c in mode for c in "wax+") else f

    m.setattr(builtins, "open", open_)
    m.setattr(os, "fsync", _enospc)
    # safetensors writes from Rust, not through Python's open(): fail its save the same way.
    import safetensors.torch as st

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        _enospc()

    m.setattr(st, "save_file", save_file)


class _HalfWriter:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        _enospc()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_umask_modes_not_0600(tmp_path, umask):
    """mkstemp makes 0600 files and safetensors writes its own 0600 temporaries: what we write gets the
    mode open() would give (0644 under the usual umask), like every other file the user has."""
    from sd_lora.stack.grid import save_png

    old = os.umask(umask)
    try:
        save_lora(tmp_path / "lora.safetensors", SD, dtype="fp32")
        save_safetensors_atomic({"x": torch.zeros(4)}, tmp_path / "state.safetensors")
        with atomic_write(tmp_path / "events.json", "w") as f:
            f.write("{}")
        from PIL import Image

        save_png(Image.new("RGB", (8, 8)), tmp_path / "sample.png", "a prompt")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["lora.safetensors", "state.safetensors", "events.json", "sample.png"], 0o666 & ~umask)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"
    save_lora(target, SD)
    good = target.read_bytes()
    target.parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError) as err:
            save_lora(target, SD, dtype="fp32")
        assert str(target.parent) in str(err.value)
        assert target.read_bytes() == good
    finally:
        target.parent.chmod(stat.S_IRWXU)


# ---- the trainer ---------------------------------------------------------------------------------
def test_training_on_a_full_disk_stops_with_the_error_and_keeps_the_last_checkpoint(tiny_training_root, tmp_path, monkeypatch):
    """The disk fills up at the step-4 save: the run fails there with ENOSPC, and the step-2
    checkpoint and LoRA are whole, so `--resume` continues once space is freed."""
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.training import train
    from sd_lora.training.checkpoint import latest_checkpoint
    loop = importlib.import_module("sd_lora.training.loop")

    def cfg(**kw):
        return TrainConfig(model=str(tiny_training_root / "model"), output=str(tmp_path / "lora.safetensors"),
                           data=DataConfig(path=str(tiny_training_root / "data"), resolution=64), steps=6, save_every=2, seed=1,
                           network={"rank": 2, "preset": "attention", "train_text_encoder": False}, **kw)

    real = loop._Trainer._save_lora

    def save_lora_until_full(self, path, step):
        if step >= 4:
            with pytest.MonkeyPatch.context() as m:
                _full(m)
                return real(self, path, step)
        return real(self, path, step)

    monkeypatch.setattr(loop._Trainer, "_save_lora", save_lora_until_full)
    with pytest.raises(OSError) as err:
        train(cfg())
    assert err.value.errno == errno.ENOSPC
    assert latest_checkpoint(tmp_path / "lora-checkpoints").name == "step-00000002"
    load_safetensors(tmp_path / "lora-step000002.safetensors")
    assert not (tmp_path / "lora-step000004.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial temporaries
    monkeypatch.setattr(loop._Trainer, "_save_lora", real)  # space freed
    out = train(cfg(resume="latest"))
    load_safetensors(out)
