"""Crash recovery: SIGKILL `sd-lora train` at random points, resume, and get the uninterrupted result.

Each attempt is a real process running the `sd-lora train` CLI, killed with SIGKILL (no handler,
no cleanup: what a power cut, the OOM killer or `kill -9` does). Starting a fresh Python that
imports torch + diffusers costs 3-5 s on 2 cores, so the attempts are forked from a
multiprocessing *forkserver* that has imported them once: every attempt is still its own process
with its own memory, killed for real, at ~0.1 s start-up cost.

Kill points:
  - 20+ timing kills: seeded random delays spread over a whole run (setup, latent caching, steps,
    LoRA and checkpoint saves). Where each landed is classified from the run's event log.
  - deterministic kills inside the child (test-only monkeypatches, no hook in the trainer): half
    way through writing a latent-cache entry, a checkpoint's trainable.safetensors, the optimizer
    state and the LoRA file; and just before the rename that publishes a finished file.

After every kill every visible file must be whole (safetensors files validate and load, complete
checkpoints load, the event log parses), and the final LoRA of each chain of killed + resumed
attempts must equal the uninterrupted run's tensor for tensor, with the same per-step losses.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_lora.io import load_safetensors
from sd_lora.training.checkpoint import list_checkpoints
from sd_lora.training.events import read_events
from sd_lora.testing import assert_same_tensors

STEPS = 4
# What a training run imports (diffusers and transformers import most of it lazily, on first use).
PRELOAD = [
    "torch", "accelerate", "peft", "peft.tuners.lora", "bitsandbytes", "PIL.PngImagePlugin", "tomli_w",
    "diffusers", "diffusers.pipelines.pipeline_utils", "diffusers.pipelines.onnx_utils",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "diffusers.optimization",
    "transformers", "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip",
    "sd_lora.cli", "sd_lora.commands.train", "sd_lora.training.loop", "sd_lora.training.checkpoint", "sd_lora.models",
    "sd_lora.network.inject", "sd_lora.formats.kohya", "sd_lora.data.cache",
]
RANDOM_KILLS = 20
SEED = 20261125


# ---- the child side (runs in a forked process) ---------------------------------------------------
def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(kill: tuple[str, int] | None) -> None:
    """Test-only: make this child SIGKILL itself at the n-th call of a file-writing function."""
    if kill is None:
        return
    what, n = kill
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if what in ("cache_entry", "trainable", "lora"):
        import safetensors.torch as st

        real_save = st.save_file

        def save_file(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            kind = "cache_entry" if "latent" in tensors else "lora" if any(k.startswith("lora_") for k in tensors) else "trainable"
            if kind == what and due():
                size = os.path.getsize(filename)
                os.truncate(filename, size // 2)  # half the bytes reached the disk
                _die()

        st.save_file = save_file
    elif what == "optimizer":
        real_torch_save = torch.save

        def torch_save(obj, f, *a, **kw):
            if due():
                f.write(b"PK\x03\x04 half an optimizer state")
                f.flush()
                _die()
            return real_torch_save(obj, f, *a, **kw)

        torch.save = torch_save
    elif what == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if due():
                _die()  # the temporary file is complete, the rename has not happened
            return real_replace(src, dst)

        os.replace = replace
    else:
        raise ValueError(what)


def _attempt(argv: list[str], log: str, kill) -> None:
    """Body of one attempt: `sd-lora train ARGV`, stdout/stderr to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars in the log (and no tqdm locks left by a kill)
    torch.set_num_threads(1)
    _install_kill(kill)
    from sd_lora.cli import main

    sys.exit(main(argv))


# ---- the parent side -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx():
    ctx = multiprocessing.get_context("forkserver")
    # Imported once by the fork server; ignored if another test started the server already.
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sd_lora.testing import tiny_pipeline, write_noise_images

    root = tmp_path_factory.mktemp("crash")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "2_thing", 3, [f"red, circle, {p}" for p in ("left", "right", "top")])
    return root


def _argv(root: Path, out: Path, cache: Path, resume: bool) -> list[str]:
    argv = [
        "train", "--model", str(root / "model"), "--data", str(root / "data"), "--output", str(out / "lora.safetensors"),
        "--resolution", "64", "--steps", str(STEPS), "--batch-size", "2", "--save-every", "1", "--keep-checkpoints", "2",
        "--rank", "4", "--preset", "attention", "--seed", "5", "--lr", "1e-3", "--lr-scheduler", "cosine",
        # random draws that a resume must repeat: flips, caption shuffle/dropout, adapter dropout
        "--flip", "--shuffle-captions", "--caption-dropout", "0.2", "--dropout", "0.1",
        "--cache-latents", "disk", "--cache-dir", str(cache),
    ]
    return argv + (["--resume"] if resume else [])


def _start(ctx, root, out, cache, kill=None):
    resume = bool(list_checkpoints(out / "lora-checkpoints"))
    out.parent.mkdir(parents=True, exist_ok=True)
    p = ctx.Process(target=_attempt, args=(_argv(root, out, cache, resume), str(out.parent / f"{out.name}.log"), kill))
    p.start()
    return p


def _check_files_whole(out: Path, cache: Path) -> set[Path]:
    """Every visible file is whole; returns the hidden temporaries left behind."""
    for f in out.glob("*.safetensors"):
        tensors, _ = load_safetensors(f)
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values()), f
    for folder in list_checkpoints(out / "lora-checkpoints"):
        load_safetensors(folder / "trainable.safetensors")
        torch.load(folder / "optimizer.pt", weights_only=True)
        json.loads((folder / "trainer.json").read_text())
    for f in cache.glob("*.safetensors"):
        load_safetensors(f)
    if (out / "lora.events.jsonl").exists():
        lines = (out / "lora.events.jsonl").read_text().splitlines()
        bad = [ln for ln in lines if ln.strip() and not _parses(ln)]
        assert len(bad) <= 1 and (not bad or bad[0] == lines[-1]), bad  # at most a torn last line
    return {p for p in [*out.rglob(".*"), *cache.glob(".*")]}


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _phase(out: Path) -> str:
    """Where the last kill landed, from the events the killed attempt wrote."""
    events = read_events(out / "lora.events.jsonl") if (out / "lora.events.jsonl").exists() else []
    last = events[-1]["event"] if events else None
    return {None: "setup", "dataset": "setup", "start": "model load / caching", "cache": "caching",
            "step": "step", "checkpoint": "step", "saved": "save"}.get(last, last or "setup")


def _assert_same_run(out: Path, ref: Path) -> None:
    assert not list((out / "lora-checkpoints").glob(".step-*")), "temporary checkpoint folders of killed runs are left"
    assert_same_tensors(ref / "lora.safetensors", out / "lora.safetensors")
    ref_loss = {e["step"]: e["loss"] for e in read_events(ref / "lora.events.jsonl") if e["event"] == "step"}
    steps = [e for e in read_events(out / "lora.events.jsonl") if e["event"] == "step"]
    assert steps and all(e["loss"] == ref_loss[e["step"]] for e in steps)  # steps repeated after a kill agree too


def _run_to_end(ctx, root, out, cache) -> float:
    t = time.time()
    p = _start(ctx, root, out, cache)
    p.join(120)
    assert p.exitcode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    return time.time() - t


@pytest.fixture(scope="module")
def reference(ctx, data, tmp_path_factory):
    """The uninterrupted run, and how long one run takes (the range of the random kill delays)."""
    root = tmp_path_factory.mktemp("reference")
    warm = ctx.Process(target=os.getpid)  # starts the fork server (imports PRELOAD once)
    warm.start()
    warm.join()
    return root / "ref", _run_to_end(ctx, data, root / "ref", root / "cache")


def test_random_sigkills_then_resume_give_the_uninterrupted_lora(ctx, data, reference, tmp_path):
    ref, t_ref = reference

    rng = random.Random(SEED)
    kills, phases, leftovers, chain = 0, [], set(), 0
    while kills < RANDOM_KILLS:
        chain += 1
        out, cache = tmp_path / f"chain{chain}", tmp_path / f"cache{chain}"  # cold cache: kills land in caching too
        for _ in range(6):
            p = _start(ctx, data, out, cache)
            # most kills after the set-up (steps and saves), some during loading and caching
            p.join(t_ref * (rng.uniform(0.45, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.45)))
            if p.exitcode is not None:  # finished before its kill time
                assert p.exitcode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
                break
            p.kill()
            p.join()
            kills += 1
            phases.append(_phase(out))
            leftovers |= _check_files_whole(out, cache)
        else:
            _run_to_end(ctx, data, out, cache)
        _check_files_whole(out, cache)
        _assert_same_run(out, ref)
    print(f"\n{kills} random SIGKILLs in {chain} chains; landed in: "
          + ", ".join(f"{k} x{phases.count(k)}" for k in sorted(set(phases))) + f"; hidden temporaries seen: {len(leftovers)}")
    assert len(set(phases)) >= 3  # the kills spread over setup, caching, steps and saves


# Each attempt of this chain dies at the next of these points; the last attempt runs to the end.
WRITE_KILLS = [
    ("cache_entry", 2),  # half of the second latent-cache entry written
    ("trainable", 1),  # half of a checkpoint's trainable.safetensors
    ("optimizer", 1),  # half of a checkpoint's optimizer.pt
    ("lora", 2),  # half of an intermediate LoRA file
    ("rename", 2),  # a finished temporary file, not yet renamed into place
]


def test_kills_half_way_through_writes_then_resume(ctx, data, reference, tmp_path):
    ref, _ = reference
    out, cache = tmp_path / "out", tmp_path / "cache"
    for kill in WRITE_KILLS:
        p = _start(ctx, data, out, cache, kill=kill)
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, f"{kill}: the kill point was never reached"
        _check_files_whole(out, cache)
    _run_to_end(ctx, data, out, cache)
    _check_files_whole(out, cache)
    _assert_same_run(out, ref)
