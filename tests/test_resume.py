"""Stop mid-run and resume: the result equals the uninterrupted run, tensor for tensor."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from sd_lora.config import OPTIMIZERS, DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import TrainingStopped, train
from sd_lora.training.checkpoint import list_checkpoints
from sd_lora.training.events import read_events
from sd_lora.testing import assert_same_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sd_lora.testing import tiny_pipeline, write_noise_images

    root = tmp_path_factory.mktemp("resume")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "2_thing", 3, [f"red, circle, {p}, small" for p in ("left", "right", "top")])
    return root


def stop_at_step(cfg: TrainConfig, step: int) -> TrainingStopped:
    """Train `cfg` and stop it after `step` as the web UI's Stop button does (from another thread);
    returns the TrainingStopped it ended with."""
    stop = threading.Event()
    with pytest.raises(TrainingStopped) as err:
        train(cfg, on_event=lambda e: stop.set() if e["event"] == "step" and e["step"] == step else None, stop_event=stop)
    return err.value


def step_losses(events: Path) -> dict:
    """{step: loss} of a run's step events."""
    return {e["step"]: e["loss"] for e in read_events(events) if e["event"] == "step"}


def _config(root, out, **kw):
    # Everything random is on: flips, caption shuffle + dropout, adapter dropout, TE training,
    # an 8-bit optimizer, accumulation and a decaying LR schedule.
    data = DataConfig(path=str(root / "data"), resolution=64, flip=True, shuffle_captions=True, keep_tokens=1, caption_dropout=0.2)
    return TrainConfig(
        model=str(root / "model"), output=str(out), data=data, steps=8, batch_size=2, gradient_accumulation=2,
        lr=1e-3, optimizer="adamw8bit", lr_scheduler="cosine", seed=7,
        network={"rank": 4, "alpha": 2, "preset": "attention", "dropout": 0.1, "train_text_encoder": True}, **kw,
    )


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    full = tmp_path / "full" / "lora.safetensors"
    train(_config(setup, full))

    out = tmp_path / "parts" / "lora.safetensors"
    stopped = stop_at_step(_config(setup, out), 3)
    assert stopped.step == 3 and stopped.checkpoint.name == "step-00000003"
    assert not out.exists()

    # second stretch: stopped by the STOP file, resumed from the newest checkpoint ("--resume")
    cfg = _config(setup, out, resume="latest")

    def stop_file_at_6(event):
        if event["event"] == "step" and event["step"] == 6:
            cfg.stop_file.touch()

    with pytest.raises(TrainingStopped) as err:
        train(cfg, on_event=stop_file_at_6)
    assert err.value.step == 6 and not cfg.stop_file.exists()
    assert [p.name for p in list_checkpoints(cfg.checkpoint_root)] == ["step-00000003", "step-00000006"]

    # last stretch: resumed from an explicit checkpoint folder ("--resume PATH")
    train(_config(setup, out, resume=str(cfg.checkpoint_root / "step-00000006")))

    assert_same_tensors(full, out)
    # the same per-step losses as well, and a loss history that spans all three stretches
    assert step_losses(full.parent / "lora.events.jsonl") == step_losses(out.parent / "lora.events.jsonl")
    assert [e["event"] for e in read_events(out.parent / "lora.events.jsonl")].count("stopped") == 2


def test_resume_without_checkpoint_says_what_to_do(setup, tmp_path):
    # validate() names keys (the CLI adds the flag: "resume (--resume): ...")
    with pytest.raises(ValueError, match="no checkpoint in .* yet; start without resume"):
        train(_config(setup, tmp_path / "x.safetensors", resume="latest"))


def test_a_finished_run_extends_from_its_last_step(setup, tmp_path):
    """A finished 6-step run keeps a checkpoint of step 6; `--resume --steps 8` continues from it (not
    from an earlier save) and ends equal to an uninterrupted 8-step run. (A constant LR: a decaying
    schedule over 6 steps is another run than one over 8; test_extended_schedule covers the rest.)"""

    def config(out, steps=8, **kw):
        cfg = _config(setup, out, **kw)
        cfg.steps, cfg.lr_scheduler = steps, "constant"
        return cfg

    full = tmp_path / "full" / "lora.safetensors"
    train(config(full))

    out = tmp_path / "ext" / "lora.safetensors"
    short = config(out, 6, save_every=4)
    train(short)
    assert [p.name for p in list_checkpoints(short.checkpoint_root)] == ["step-00000004", "step-00000006"]

    train(config(out, resume="latest"))
    events = read_events(out.parent / "lora.events.jsonl")
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["step"] == 6 and [s for s, _ in resumed["losses"]] == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(full, out)
    second = events[events.index(resumed):]
    assert [e["step"] for e in second if e["event"] == "step"] == [7, 8]

    # fewer steps than the checkpoint holds: said, with what to set
    with pytest.raises(ValueError, match="at step 8, past this run's 6 steps; set steps to more than 8"):
        train(config(out, 6, resume="latest"))


def test_extended_schedule_sets_the_rate_of_the_longer_run():
    """Loading a 6-step cosine schedule's state into an 8-step one: the optimizer's rate is the 8-step
    schedule's at step 6 (torch saves no schedule function, so it held the 6-step rate, 0)."""
    from sd_lora.training.loop import follow_schedule
    from sd_lora.training.optim import make_scheduler

    def schedule(total):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, make_scheduler("cosine", opt, 0, total)

    opt6, s6 = schedule(6)
    opt8, s8 = schedule(8)
    for _ in range(6):
        opt6.step(), s6.step(), opt8.step(), s8.step()
    opt, s = schedule(8)
    opt.load_state_dict(opt6.state_dict())
    s.load_state_dict(s6.state_dict())
    assert opt.param_groups[0]["lr"] == 0.0  # the shorter run's rate at its end
    follow_schedule(s)
    assert opt.param_groups[0]["lr"] == opt8.param_groups[0]["lr"] > 0
    assert s.get_last_lr() == s8.get_last_lr()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_resumes_exactly(name, tmp_path):
    """2 steps, a checkpoint, a fresh optimizer + schedule loaded from it, 2 more steps == 4 steps straight:
    the optimizer state (8-bit state, Prodigy's d, schedule-free's z and weight sum, Adafactor's factors)
    goes through checkpoint.py's files and back exactly. A decaying schedule where the optimizer allows one."""
    from sd_lora.training.checkpoint import load_checkpoint, save_checkpoint
    from sd_lora.training.optim import choose_optimizer, run_scheduler

    fixed = name in ("adamw_schedulefree", "adafactor")  # schedule-free / its own schedule: constant
    cfg = TrainConfig(optimizer=name, lr=1.0 if name in ("prodigy", "dadapt_adam") else 1e-2,
                      lr_scheduler="constant" if fixed else "cosine_with_restarts", lr_scheduler_num_cycles=2,
                      lr_warmup_steps=0 if name == "adafactor" else 1)

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)  # 4096 weights: bitsandbytes' 8-bit state
        choice = choose_optimizer(cfg, 4)
        opt = choice.build([{"params": list(model.parameters()), "lr": choice.lr or 0.0, "name": "unet"}])
        return model, opt, run_scheduler(cfg, opt, choice, 4)

    def steps(model, opt, sched, n, start):
        for i in range(start, start + n):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
            (model(x) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    straight = fresh()
    steps(*straight, 4, 0)

    first = fresh()
    steps(*first, 2, 0)
    folder = save_checkpoint(tmp_path, 2, {"m": first[0]}, first[1], first[2], None, {})
    second = fresh()
    load_checkpoint(folder, {"m": second[0]}, second[1], second[2], None)
    steps(*second, 2, 2)
    for a, b in zip(straight[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b), name


def test_schedule_free_saves_the_averaged_weights_and_resumes_exactly(setup, tmp_path):
    """adamw_schedulefree in the trainer: the LoRA files hold the averaged (eval) weights, the checkpoint the
    training ones; a save in the middle of the run (eval, then the training weights back) changes nothing,
    so 2 + 2 steps equal 4."""
    from sd_lora.training.checkpoint import latest_checkpoint

    def config(out, **kw):
        cfg = _config(setup, out, **kw)
        cfg.steps, cfg.optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps = 4, "adamw_schedulefree", "constant", 2
        cfg.batch_size, cfg.gradient_accumulation, cfg.network.train_text_encoder = 1, 1, False  # small: 3 runs
        return cfg

    full = tmp_path / "full" / "lora.safetensors"
    train(config(full, save_every=2))
    out = tmp_path / "parts" / "lora.safetensors"
    stop_at_step(config(out), 2)
    train(config(out, resume="latest"))
    a, meta = load_safetensors(full)
    assert_same_tensors(a, out)
    assert meta["ss_optimizer"].startswith("schedulefree.adamw_schedulefree.AdamWScheduleFree(weight_decay=0.01,warmup_steps=2")
    # the file is not the training point y that the checkpoint keeps
    trained, _ = load_safetensors(latest_checkpoint(config(full).checkpoint_root) / "trainable.safetensors")
    up = next(k for k in a if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
    y = next(v for k, v in trained.items() if k.startswith("unet.") and "lora_B" in k and v.shape == a[up].shape)
    assert not any(torch.equal(y, v) for k, v in a.items() if v.shape == y.shape)


def test_resume_is_exact_with_every_augmentation_on(setup, tmp_path, monkeypatch):
    """Flip, random crop, colour, tag dropout, shuffle, caption dropout and wildcards (#19) each draw from the step's
    seeded generator, never a global stream: stopping at step 2 and resuming to 4 gives the same losses and weights
    as 4 straight steps. The images overhang their bucket (96x64 into 64x64), so the random crop has room."""
    import numpy as np
    from PIL import Image

    from sd_lora.data import cache
    from sd_lora.training import loop

    # what the steps really trained: the crops that reach the loss (SDXL's time ids), colours, captions
    seen = {"crops": set(), "colours": 0, "captions": set()}

    def crops(*args, **kw):
        seen["crops"].update(p.crop for p in args[6])
        return compute_loss(*args, **kw)

    def colours(img, shift):
        seen["colours"] += 1
        return apply_color(img, shift)

    def captions(*args, **kw):
        text = step_caption(*args, **kw)
        seen["captions"].add(text)
        return text

    compute_loss, apply_color, step_caption = loop.compute_loss, cache.apply_color, loop.step_caption
    monkeypatch.setattr(loop, "compute_loss", crops)
    monkeypatch.setattr(cache, "apply_color", colours)
    monkeypatch.setattr(loop, "step_caption", captions)

    folder = setup / "aug" / "1_thing"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(1)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"thing, red, {{circle|square}}, small, {i}\nthing, blue, big, {{left|right}}")

    def config(out, **kw):
        data = DataConfig(path=str(folder.parent), resolution=64, flip=True, random_crop=True, color_aug=True,
                          caption_tag_dropout=0.3, shuffle_captions=True, keep_tokens=1, caption_dropout=0.2, wildcards=True,
                          cache_latents="none")
        return TrainConfig(model=str(setup / "model"), output=str(out), data=data, steps=4, batch_size=2, lr=1e-3, seed=4,
                           network={"rank": 4, "alpha": 2, "preset": "attention"}, **kw)

    full = tmp_path / "full" / "lora.safetensors"
    train(config(full))
    out = tmp_path / "parts" / "lora.safetensors"
    stop_at_step(config(out), 2)
    train(config(out, resume="latest"))
    assert_same_tensors(full, out)
    assert step_losses(full.parent / "lora.events.jsonl") == step_losses(out.parent / "lora.events.jsonl")
    assert len(step_losses(full.parent / "lora.events.jsonl")) == 4
    assert len(seen["crops"]) > 2 and seen["colours"] > 0  # not only the centre crop (0, 16), and its mirror
    # one line of the two per use, its {a|b} chosen (seed 4 draws both lines; a line's tags may be dropped)
    assert not any("{" in c or "\n" in c for c in seen["captions"])
    assert any("blue" in c or "big" in c for c in seen["captions"]) and any("red" in c or "small" in c for c in seen["captions"])
