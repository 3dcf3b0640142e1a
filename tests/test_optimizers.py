"""Optimizers, optimizer_args, LoRA+ groups and LR schedules: pure functions and one tiny parameter each."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sd_lora import optimizers
from sd_lora.config import OPTIMIZERS, TrainConfig
from sd_lora.training.optim import (averaged_weights, choose_optimizer, lr_factor, make_scheduler, param_groups, run_scheduler,
                                    warmup_steps)

# adaptive optimizers at their usual lr, the others at an lr that moves a weight visibly in one step
LR = {"prodigy": 1.0, "dadapt_adam": 1.0}


def _cfg(name, **kw):
    return TrainConfig(optimizer=name, lr=LR.get(name, 1e-2), **kw)


def test_config_choices_are_the_table():
    assert OPTIMIZERS == tuple(optimizers.OPTIMIZERS)
    assert {"adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "prodigy", "dadapt_adam", "adamw_schedulefree", "adafactor",
            "came"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_step_updates_the_weights(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))  # 4096 values: bitsandbytes keeps 8-bit state from this size on
    before = p.detach().clone()
    choice = choose_optimizer(_cfg(name), total_steps=10)
    assert choice.cls.__name__ == optimizers.spec(choice.spec.name).cls
    opt = choice.build([{"params": [p], "lr": choice.lr or 0.0, "name": "unet"}])
    for _ in range(2):
        (p ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(p).all()
    # Prodigy and D-Adaptation start from a tiny step size (d0 = 1e-6) and grow it: a small move is right
    assert (p - before).abs().max() > 1e-6, name


def test_paged_optimizers_fall_back_on_the_cpu_and_say_so():
    choice = choose_optimizer(_cfg("paged_adamw8bit"), 10, "cpu")
    assert choice.spec.name == "adamw8bit" and "needs CUDA" in choice.warnings[0]


def test_kohya_optimizer_args_are_parsed_as_literals():
    assert optimizers.parse_optimizer_args(["betas=0.9,0.99", "weight_decay=0.01", "decouple=True", "mode=fast"]) == {
        "betas": (0.9, 0.99), "weight_decay": 0.01, "decouple": True, "mode": "fast"}
    assert optimizers.parse_optimizer_args({"betas": [0.9, 0.99], "d_coef": 2}) == {"betas": (0.9, 0.99), "d_coef": 2}
    with pytest.raises(ValueError, match="'betas' is not key=value"):
        optimizers.parse_optimizer_args(["betas"])


def test_unknown_optimizer_argument_names_the_accepted_ones():
    errors = _cfg("prodigy", optimizer_args=["betz=0.9,0.99"]).validate(check_paths=False)
    message = next(e for e in errors if e.startswith("optimizer_args"))
    assert "takes no argument 'betz' (did you mean 'betas'?)" in message
    for accepted in ("d_coef", "decouple", "use_bias_correction", "safeguard_warmup"):  # from Prodigy's signature
        assert accepted in message
    assert any("not key=value" in e for e in _cfg("adamw", optimizer_args=["oops"]).validate(check_paths=False))
    assert not [e for e in _cfg("adamw", optimizer_args={"betas": [0.9, 0.99]}).validate(check_paths=False)
                if e.startswith("optimizer")]


def test_schedule_conflicts_are_config_errors():
    def errors(**kw):
        return [e for e in TrainConfig(**kw).validate(check_paths=False) if e.startswith(("lr_", "optimizer"))]

    assert "schedule-free" in errors(optimizer="adamw_schedulefree", lr_scheduler="cosine")[0]
    assert not errors(optimizer="adamw_schedulefree", lr_warmup_steps=10)  # becomes its own warm-up
    assert "AdafactorSchedule" in errors(optimizer="adafactor", lr_scheduler="cosine")[0]
    assert not errors(optimizer="adafactor", optimizer_args=["relative_step=False"], lr_scheduler="cosine")
    assert "has no warm-up" in errors(lr_warmup_steps=10)[0]
    assert "neither a whole number" in errors(lr_scheduler="cosine", lr_warmup_steps=2.5)[0]
    assert "below 1" in errors(lr_scheduler="cosine", lr_scheduler_min_lr_ratio=1.0)[0]


def test_ss_optimizer_is_written_as_kohya_does():
    assert choose_optimizer(_cfg("adamw"), 10).label == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    label = choose_optimizer(_cfg("prodigy", optimizer_args=["d_coef=2", "betas=0.9,0.99"]), 10).label
    assert label == "prodigyopt.prodigy.Prodigy(weight_decay=0.01,d_coef=2,betas=(0.9, 0.99))"
    ada = choose_optimizer(_cfg("adafactor"), 10)
    assert ada.label.startswith("transformers.optimization.Adafactor(relative_step=True,") and ada.lr is None
    sf = choose_optimizer(_cfg("adamw_schedulefree", lr_warmup_steps=0.1), 50)
    assert sf.kwargs["warmup_steps"] == 5


def test_adaptive_optimizers_warn_about_an_adamw_sized_lr():
    assert "set lr = 1.0" in choose_optimizer(TrainConfig(optimizer="prodigy", lr=1e-4), 10).warnings[0]
    assert not choose_optimizer(TrainConfig(optimizer="prodigy", lr=1.0), 10).warnings


def test_loraplus_puts_the_up_matrices_in_their_own_groups():
    a, b, ta, tb = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
    groups = param_groups([a, b], [ta, tb], 1e-4, 5e-5, up_params=[b, tb], unet_ratio=16, te_ratio=4)
    assert [(g["name"], g["lr"], g["params"]) for g in groups] == [
        ("unet", 1e-4, [a]), ("unet_plus", 1e-4 * 16, [b]), ("text_encoder", 5e-5, [ta]), ("text_encoder_plus", 5e-5 * 4, [tb])]
    assert [g["name"] for g in param_groups([a, b], [], 1e-4, 0, up_params=[b])] == ["unet"]  # no ratio: one group


def test_warmup_ratio_is_a_share_of_the_run():
    assert (warmup_steps(0.1, 200), warmup_steps(0.05, 30), warmup_steps(12, 200), warmup_steps(0, 200)) == (20, 1, 12, 0)


# ---- schedules against their formulas -----------------------------------------------------------------------


def _curve(name, total=20, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(name, opt, kw.pop("warmup", 0), total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_schedules_equal_diffusers_without_a_minimum(name):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    extra = {"num_cycles": 3} if name == "cosine_with_restarts" else {"power": 2.0} if name == "polynomial" else {}
    ref = get_scheduler(name, opt, num_warmup_steps=4, num_training_steps=20, **extra)
    want = []
    for _ in range(20):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    # (diffusers' polynomial ends at lr_end = 1e-7 rather than 0)
    assert _curve(name, warmup=4, **extra) == pytest.approx(want, abs=1e-6)


def test_schedule_curves_follow_their_formulas():
    total, lr = 20, 2.0
    # cosine_with_restarts really restarts: 2 cycles of 10 steps, each from lr down towards 0
    restarts = _curve("cosine_with_restarts", num_cycles=2)
    assert restarts[0] == restarts[10] == lr
    assert restarts[5] == pytest.approx(lr * 0.5) and restarts[15] == pytest.approx(lr * 0.5)
    assert restarts != _curve("cosine")
    # polynomial with power: lr (1 - t/T)^p
    assert _curve("polynomial", power=3.0) == pytest.approx([lr * (1 - t / total) ** 3 for t in range(total)])
    # minimum ratio: lr (m + (1 - m) f)
    m = 0.1
    assert _curve("cosine", min_ratio=m) == pytest.approx(
        [lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t / total))) for t in range(total)])
    assert _curve("linear", min_ratio=m) == pytest.approx([lr * (m + (1 - m) * (1 - t / total)) for t in range(total)])
    assert lr_factor("linear", total, 0, total, min_ratio=m) == pytest.approx(m)  # ends at the minimum, not 0
    # warm-up: linear from 0, then the schedule over the rest
    assert _curve("cosine", warmup=5)[:6] == pytest.approx([0, 0.4, 0.8, 1.2, 1.6, 2.0])
    assert _curve("constant", warmup=5) == [lr] * total  # constant has no warm-up (the config refuses the pair)


def test_run_scheduler_reads_the_config():
    cfg = TrainConfig(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3, lr_warmup_steps=0.25,
                      lr_scheduler_min_lr_ratio=0.2, lr=1.0)
    p = torch.nn.Parameter(torch.zeros(1))
    choice = choose_optimizer(cfg, 40)
    opt = choice.build([{"params": [p], "lr": 1.0}])
    sched = run_scheduler(cfg, opt, choice, 40)
    lrs = [sched.lr_lambdas[0](t) for t in range(40)]
    assert lrs[:10] == pytest.approx([t / 10 for t in range(10)])  # 25 % of 40 steps of warm-up
    assert lrs[10] == lrs[20] == lrs[30] == 1.0 and min(lrs[10:]) >= 0.2  # cycles of 30 / 3 steps, never below 0.2


def test_adafactor_relative_step_uses_its_own_schedule():
    cfg = TrainConfig(optimizer="adafactor", lr=1e-3)
    p = torch.nn.Parameter(torch.ones(8, 8))
    choice = choose_optimizer(cfg, 10)
    opt = choice.build([{"params": [p]}])
    sched = run_scheduler(cfg, opt, choice, 10)
    assert type(sched).__name__ == "AdafactorSchedule"
    (p ** 2).sum().backward()
    opt.step()
    sched.step()
    # the rate Adafactor used: min(1e-2, 1/sqrt(step)) x RMS(p) (scale_parameter), transformers' _get_lr
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * 1.0, rel=1e-6)


def test_schedule_free_samples_and_saves_the_averaged_weights():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    choice = choose_optimizer(TrainConfig(optimizer="adamw_schedulefree", lr=0.1), 10)
    opt = choice.build([{"params": [p], "lr": 0.1}])
    for _ in range(3):
        (p ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    y = p.detach().clone()
    ref = copy.deepcopy(opt)  # the same optimizer on a copy of p: eval() gives x
    ref_p = ref.param_groups[0]["params"][0]
    ref.eval()
    with averaged_weights(opt, choice.spec, [p]):
        assert torch.equal(p, ref_p) and not torch.equal(p, y)
    assert torch.equal(p, y) and opt.param_groups[0]["train_mode"]  # training weights back, bit for bit
    adamw = choose_optimizer(TrainConfig(optimizer="adamw"), 10)
    with averaged_weights(None, adamw.spec, [p]):  # no-op for the others
        assert torch.equal(p, y)


def test_loraplus_groups_of_a_real_network():
    from sd_lora.network.inject import inject_network
    from sd_lora.testing import tiny_pipeline
    from sd_lora.training.optim import network_param_groups

    pipe = tiny_pipeline("sd1")
    cfg = TrainConfig(lr=1e-4, text_encoder_lr=5e-5, loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4,
                      network={"rank": 2, "preset": "attention", "train_text_encoder": True})
    network = inject_network(pipe, cfg.network)
    groups = {g["name"]: g for g in network_param_groups(network, True, cfg)}
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(
        {"unet": 1e-4, "unet_plus": 16e-4, "text_encoder": 5e-5, "text_encoder_plus": 20e-5})
    names = {id(p): n for n, p in network.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups["unet_plus"]["params"] + groups["text_encoder_plus"]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups["unet"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(network.parameters())
    network.remove()
    loha = TrainConfig(loraplus_lr_ratio=16, network={"method": "loha", "rank": 2, "preset": "attention"})
    with pytest.raises(ValueError, match="has no LoRA up"):
        network_param_groups(inject_network(pipe, loha.network), False, loha)


def test_step_events_show_the_rate_prodigy_applies():
    from sd_lora.training.optim import applied_lr

    p = torch.nn.Parameter(torch.ones(8))
    cfg = TrainConfig(optimizer="prodigy", lr=1.0)
    choice = choose_optimizer(cfg, 10)
    opt = choice.build([{"params": [p], "lr": 1.0}])
    sched = run_scheduler(cfg, opt, choice, 10)
    for _ in range(3):
        (p ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    d = opt.param_groups[0]["d"]
    assert d > 1e-6 and applied_lr(opt, sched) == pytest.approx(d)  # lr 1.0 x the estimate, which has grown


def test_optimizer_args_from_toml_and_kohya_flags():
    from sd_lora.cli import build_parser
    from sd_lora.commands.train import config_from_args
    from sd_lora.config import config_from_dict

    table = config_from_dict({"optimizer": "prodigy", "optimizer_args": {"betas": [0.9, 0.99], "d_coef": 2}})
    words = config_from_dict({"optimizer": "prodigy", "optimizer_args": ["betas=0.9,0.99", "d_coef=2"]})  # a kohya TOML
    args = build_parser().parse_args(["train", "--optimizer_type", "Prodigy", "--optimizer_args", "betas=0.9,0.99", "d_coef=2",
                                      "--lr_warmup_steps", "0.1"])
    flags = config_from_args(args)
    assert flags.optimizer == "prodigy" and flags.lr_warmup_steps == 0.1
    for cfg in (table, words, flags):
        assert optimizers.parse_optimizer_args(cfg.optimizer_args) == {"betas": (0.9, 0.99), "d_coef": 2}


def test_an_unset_lr_is_the_optimizers_default():
    """lr unset: the rate of the optimizer's table entry (1.0 for the adaptive ones), without the low-lr
    warning; a rate that is set is kept, and the warning for an AdamW-sized one stays."""
    from sd_lora.config import config_from_dict

    assert TrainConfig().lr is None and TrainConfig().unet_lr == optimizers.OPTIMIZERS["adamw"].default_lr == 1e-4
    for name in ("prodigy", "dadapt_adam"):
        cfg = config_from_dict({"optimizer": name})
        assert cfg.lr is None and cfg.unet_lr == cfg.te_lr == 1.0
        choice = choose_optimizer(cfg, 10)
        assert choice.lr == 1.0 and not choice.warnings
    assert TrainConfig(optimizer="prodigy", lr=0.5, text_encoder_lr=0.25).unet_lr == 0.5
    assert TrainConfig(optimizer="prodigy", lr=0.5, text_encoder_lr=0.25).te_lr == 0.25
    assert "set lr = 1.0" in choose_optimizer(TrainConfig(optimizer="prodigy", lr=1e-4), 10).warnings[0]
    # adafactor's relative_step sets its own step size: said only when a rate was set that it ignores
    assert not choose_optimizer(TrainConfig(optimizer="adafactor"), 10).warnings
    assert "not used" in choose_optimizer(TrainConfig(optimizer="adafactor", lr=1e-3), 10).warnings[0]
    assert TrainConfig(optimizer="adafactor", optimizer_args=["relative_step=False"]).unet_lr == 1e-4
    assert "lr: must be a number > 0" in " ".join(TrainConfig(lr=0.0).validate(check_paths=False))


def test_an_unset_lr_from_the_cli():
    from sd_lora.cli import build_parser
    from sd_lora.commands.train import config_from_args

    assert config_from_args(build_parser().parse_args(["train", "--optimizer", "prodigy"])).unet_lr == 1.0
    assert config_from_args(build_parser().parse_args(["train", "--optimizer", "prodigy", "--lr", "0.5"])).lr == 0.5


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_without_lr_records_the_rate_it_used(tiny_training_root, tmp_path):
    import json

    from sd_lora.config import DataConfig
    from sd_lora.io import load_safetensors
    from sd_lora.training import train
    from sd_lora.training.events import read_events

    out = tmp_path / "p.safetensors"
    cfg = TrainConfig(model=str(tiny_training_root / "model"), output=str(out), optimizer="prodigy", steps=2, seed=1,
                      data=DataConfig(path=str(tiny_training_root / "data"), resolution=64),
                      network={"rank": 2, "alpha": 1, "preset": "attention", "train_text_encoder": False})
    train(cfg)
    md = load_safetensors(out)[1]
    assert md["ss_learning_rate"] == md["ss_unet_lr"] == "1.0"
    assert json.loads(md["sd_lora.config"])["lr"] is None  # the setting as given: unset
    last = [e for e in read_events(cfg.events_path) if e["event"] == "step"][-1]
    # 1.0 x Prodigy's estimate d (>= d0 = 1e-6); at AdamW's 1e-4 it would be 1e-10
    assert last["lrs"]["unet"] == pytest.approx(last["lr"]) and last["lr"] >= 1e-6
    assert not [e for e in read_events(cfg.events_path) if e["event"] == "warning" and "lr" in e["message"]]
