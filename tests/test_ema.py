"""EMA of the adapter weights (#18 item 3): the NAME-ema file equals the moving average computed by
hand from the per-step raw weights, honours ema_update_every and the warm-up, resumes exactly, and is
off by default."""

from __future__ import annotations


import pytest
import torch

from sd_lora import artifacts
from sd_lora.config import DataConfig, TrainConfig
from sd_lora.io import load_safetensors
from sd_lora.training import train
from sd_lora.training.ema import EMA_METADATA_KEY, AdapterEMA
from sd_lora.testing import assert_same_tensors

from test_resume import stop_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(root, out, steps=4, **kw):
    return TrainConfig(model=str(root / "model"), output=str(out), data=DataConfig(path=str(root / "data"), resolution=64),
                       steps=steps, lr=3e-3, seed=3, network={"rank": 2, "alpha": 1, "preset": "attention"}, **kw)


def _record(mp) -> dict:
    """Patch the trainer's AdapterEMA to keep itself ("ema") and the raw (training) weights after every
    optimizer step ("weights": step -> tensors) in the returned dict."""
    seen = {"weights": {}, "ema": None}
    original, original_init = AdapterEMA.after_step, AdapterEMA.__init__

    def init(self, params, *args, **kw):
        seen["weights"][0] = [p.detach().clone() for p in params]  # where the EMA starts
        original_init(self, params, *args, **kw)

    def after_step(self, step):
        seen["ema"] = self
        seen["weights"][step] = [p.detach().clone() for p in self.params]
        original(self, step)

    mp.setattr(AdapterEMA, "after_step", after_step)
    mp.setattr(AdapterEMA, "__init__", init)
    return seen


@pytest.fixture
def recorded(monkeypatch):
    return _record(monkeypatch)


def _by_hand(weights: dict[int, list[torch.Tensor]], steps, decays):
    """The EMA after updates at `steps` with decays `decays`, from the weights at the start (step 0).
    The first decay is 0, so it (nearly: e - (e - w) in float32) copies the weights."""
    ema = weights[0]
    for step, d in zip(steps, decays):
        ema = [e - (1 - d) * (e - x) for e, x in zip(ema, weights[step])]
    return ema


def _tensors(path):
    return load_safetensors(path)[0]


@pytest.fixture(scope="module")
def full_run(tiny_training_root, tmp_path_factory):
    """4 steps with ema_decay 0.5, a LoRA + EMA file saved after every step; the recording of it."""
    mp = pytest.MonkeyPatch()
    seen = _record(mp)
    out = tmp_path_factory.mktemp("ema_full") / "lora.safetensors"
    try:
        train(_config(tiny_training_root, out, ema_decay=0.5, save_every=1))
    finally:
        mp.undo()
    return out, seen


def test_ema_file_equals_the_formula(full_run):
    out, seen = full_run
    weights, ema = seen["weights"], seen["ema"]
    assert sorted(weights) == [0, 1, 2, 3, 4]
    # the EMA the trainer kept is the formula, bit for bit (same float32 operations as EMAModel.step)
    expected = _by_hand(weights, [1, 2, 3, 4], [0.0, 0.5, 0.5, 0.5])
    for e, s in zip(expected, ema.ema.shadow_params):
        assert torch.equal(e, s)
    # each saved EMA file (fp16) is the formula over the raw files of the steps so far
    files = {s: artifacts.intermediate_lora(out, s) for s in (1, 2, 3)} | {4: out}
    raw = {s: {k: v.float() for k, v in _tensors(p).items()} for s, p in files.items()}
    for s, path in files.items():
        ema_file = artifacts.ema_lora(path)
        got, meta = load_safetensors(ema_file)
        assert meta[EMA_METADATA_KEY] == "true" and EMA_METADATA_KEY not in load_safetensors(path)[1]
        assert '"ema_decay": 0.5' in meta["sd_lora.config"]
        assert got.keys() == raw[s].keys()
        by_hand = None
        for t in range(1, s + 1):
            by_hand = dict(raw[t]) if by_hand is None else {k: v - 0.5 * (v - raw[t][k]) for k, v in by_hand.items()}
        for k in got:
            torch.testing.assert_close(got[k].float(), by_hand[k], rtol=2e-3, atol=2e-5)
        if s > 1:  # after the first update the average lags the weights
            assert any(not torch.equal(got[k], _tensors(path)[k]) for k in got if "lora_up" in k)


def test_update_every_and_warmup(tiny_training_root, tmp_path, recorded):
    out = tmp_path / "lora.safetensors"
    train(_config(tiny_training_root, out, ema_decay=0.9, ema_update_every=2, ema_warmup=True))
    weights, ema = recorded["weights"], recorded["ema"]
    assert ema.ema.optimization_step == 2  # updates at steps 2 and 4 only
    # warm-up: the k-th update's decay is min(decay, 1 - k^-2/3) (0 at the first): 0.370 < 0.9 at k = 2
    expected = _by_hand(weights, [2, 4], [0.0, min(0.9, 1 - 2 ** (-2 / 3))])
    for e, s in zip(expected, ema.ema.shadow_params):
        assert torch.equal(e, s)


def test_warmup_decay_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([p], decay=0.99, warmup=True)
    by_hand = p.detach().clone()
    for k in range(1, 30):
        with torch.no_grad():
            p.copy_(torch.tensor([k, -k, k * k], dtype=torch.float32))
        ema.after_step(k)
        d = 0.0 if k == 1 else min(0.99, 1 - k ** (-2 / 3))
        assert ema.ema.cur_decay_value == d
        by_hand = by_hand - (1 - d) * (by_hand - p.detach())
        assert torch.equal(ema.ema.shadow_params[0], by_hand)
    # without warm-up the decay is the set one from the second update on
    q = torch.nn.Parameter(torch.zeros(1))
    flat = AdapterEMA([q], decay=0.9)
    flat.after_step(1)
    flat.after_step(2)
    assert flat.ema.cur_decay_value == 0.9
    # sampling/saving with the EMA weights leaves the training weights exactly as they were
    with torch.no_grad():
        p.copy_(torch.tensor([0.1, 0.2, 0.3]))
    before = p.detach().clone()
    with ema.swapped_in():
        assert torch.equal(p.detach(), ema.ema.shadow_params[0])
    assert torch.equal(p.detach(), before)


def test_resume_is_exact(full_run, tiny_training_root, tmp_path):
    ref, _ = full_run
    out = tmp_path / "lora.safetensors"
    stop_at_step(_config(tiny_training_root, out, ema_decay=0.5), 2)
    train(_config(tiny_training_root, out, ema_decay=0.5, resume="latest"))
    for a_path, b_path in ((ref, out), (artifacts.ema_lora(ref), artifacts.ema_lora(out))):
        assert_same_tensors(a_path, b_path, b_path.name)


def test_off_by_default_then_on_at_resume(tiny_training_root, tmp_path):
    out = tmp_path / "lora.safetensors"
    assert TrainConfig().ema_decay is None
    train(_config(tiny_training_root, out, steps=1))
    assert out.is_file() and not artifacts.ema_lora(out).exists()
    assert EMA_METADATA_KEY not in load_safetensors(out)[1]
    # extended with EMA on: its checkpoint has no EMA state, so the average starts there, said in a warning
    events = []
    train(_config(tiny_training_root, out, steps=2, ema_decay=0.5, resume="latest"), on_event=events.append)
    assert any(e["event"] == "warning" and e["message"].startswith("ema_decay:") for e in events)
    assert artifacts.ema_lora(out).is_file()


def test_decay_must_be_below_one(tiny_training_root, tmp_path):
    errors = _config(tiny_training_root, tmp_path / "x.safetensors", ema_decay=1.0).validate()
    assert any(e.startswith("ema_decay:") for e in errors)


def test_ema_samples_render_with_the_ema_weights(tiny_training_root, tmp_path, recorded, monkeypatch):
    from sd_lora.training import sampling

    during, original = [], sampling.render_samples

    def render(*args, **kw):
        during.append([p.detach().clone() for p in recorded["ema"].params])
        return original(*args, **kw)

    monkeypatch.setattr(sampling, "render_samples", render)
    out = tmp_path / "lora.safetensors"
    train(_config(tiny_training_root, out, steps=2, ema_decay=0.5, ema_samples=True, sample_prompts=["red circle"],
                  sample_steps=1))
    ema, raw = recorded["ema"], recorded["weights"][2]
    assert len(during) == 1 and artifacts.sample_image(out, 2, 0).is_file()
    assert all(torch.equal(d, s) for d, s in zip(during[0], ema.ema.shadow_params))  # EMA weights while rendering
    assert any(not torch.equal(d, r) for d, r in zip(during[0], raw))
    assert all(torch.equal(p.detach(), r) for p, r in zip(ema.params, raw))  # training weights back afterwards


def test_ema_options_need_ema_decay(tiny_training_root, tmp_path):
    errors = _config(tiny_training_root, tmp_path / "x.safetensors", ema_samples=True, ema_update_every=3).validate()
    assert {e.split(":")[0] for e in errors} >= {"ema_samples", "ema_update_every"}


def test_ema_file_names():
    from pathlib import Path

    out = Path("out/style.safetensors")
    assert artifacts.ema_lora(out) == Path("out/style-ema.safetensors")
    step = artifacts.ema_lora(artifacts.intermediate_lora(out, 100))
    assert step == Path("out/style-step000100-ema.safetensors")
    assert artifacts.intermediate_step(step) is None  # an EMA file is not read as a step's raw LoRA
    assert artifacts.is_run_output(artifacts.ema_lora(out)) and not artifacts.is_run_output(out)
