"""The Train tab's pieces without a browser: saved configs (configs/ of the workspace), the repeats
field, the speed shown as the trainer prints it, errors kept for the page's message box, and the
start-up hint naming our --share. tests/test_webui_browser_train.py checks the same on the page."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sd_lora.config import ConfigError, load_config
from webui.security import PathError, Workspace

TOML = """model = "models/tiny"
output = "loras/saved.safetensors"
steps = 7
sample_prompts = ["a red circle"]

[data]
path = "datasets/shapes"
repeats = 3

[network]
rank = 4
"""


@pytest.fixture
def ws(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (ws.root / "models" / "tiny").mkdir()
    (ws.root / "datasets" / "shapes").mkdir()
    return ws


def test_saved_config_trains_the_same_from_a_shell_and_loads_back(ws):
    from webui.tabs.train import list_configs, load_config_file, save_config_file

    dest = save_config_file(ws, TOML, "my run.toml")  # a typed ".toml" is not doubled
    assert dest == ws.root / "configs" / "my run.toml" and list_configs(ws) == ["configs/my run.toml"]
    text = dest.read_text()
    assert 'model = "../models/tiny"' in text  # relative to the file, as `sd-lora train FILE` reads it
    cli = load_config(dest)
    assert Path(cli.model).resolve() == ws.root / "models" / "tiny"
    assert Path(cli.data.path).resolve() == ws.root / "datasets" / "shapes"
    assert (cli.steps, cli.data.repeats, cli.network.rank) == (7, 3, 4)
    back = load_config_file(ws, "configs/my run.toml")  # the page shows workspace-relative paths again
    assert (back.model, back.data.path, back.output) == ("models/tiny", "datasets/shapes", "loras/saved.safetensors")
    assert back.sample_prompts == ["a red circle"]  # prompt lines are not paths


def test_saved_configs_stay_in_the_workspace(ws):
    from webui.tabs.train import load_config_file, save_config_file

    for bad in ("../evil", "a/b", ".hidden", ""):
        with pytest.raises(PathError, match="config name"):
            save_config_file(ws, TOML, bad)
    with pytest.raises(PathError, match="outside the workspace"):
        save_config_file(ws, TOML.replace('"models/tiny"', '"/etc"'), "escape")
    with pytest.raises(ConfigError, match="stepz: unknown key"):
        save_config_file(ws, TOML + "stepz = 3\n", "typo")
    # loading: only .toml files in configs/, and their paths must stay inside the workspace too
    (ws.root / "datasets" / "x.toml").write_text(TOML)
    with pytest.raises(PathError, match="configs/"):
        load_config_file(ws, "datasets/x.toml")
    with pytest.raises(PathError, match="outside the workspace"):
        load_config_file(ws, "../outside.toml")
    (ws.root / "configs" / "planted.toml").write_text(TOML.replace('"models/tiny"', '"../../../etc"'))
    with pytest.raises(PathError, match="model: .* is outside the workspace"):
        load_config_file(ws, "configs/planted.toml")
    with pytest.raises(PathError, match="choose a saved config"):
        load_config_file(ws, "")


def test_form_has_a_repeats_field():
    from webui.tabs.train import FORM_KEYS, apply_form, default_config, form_values

    cfg = default_config()
    values = dict(zip(FORM_KEYS, form_values(cfg)))
    assert values["data.repeats"] == 1
    values["data.repeats"] = 10.0  # a number box sends a float
    cfg = apply_form(cfg, [values[k] for k in FORM_KEYS])
    assert cfg.data.repeats == 10 and isinstance(cfg.data.repeats, int)


def test_an_empty_learning_rate_box_is_the_optimizers_default():
    from sd_lora.config import TrainConfig
    from webui.tabs.train import FORM_KEYS, apply_form, form_values

    values = dict(zip(FORM_KEYS, form_values(TrainConfig(optimizer="prodigy"))))
    assert values["lr"] == ""  # lr unset: the box (a text box: optional numbers) starts empty
    for empty in (None, ""):  # what an emptied number box sends
        cfg = apply_form(TrainConfig(optimizer="prodigy"), [empty if k == "lr" else values[k] for k in FORM_KEYS])
        assert cfg.lr is None and cfg.unet_lr == 1.0
    assert apply_form(TrainConfig(optimizer="prodigy"), [0.5 if k == "lr" else values[k] for k in FORM_KEYS]).lr == 0.5


def test_speed_is_shown_as_the_trainer_prints_it():
    from tqdm import tqdm

    from webui.jobs import Progress
    from webui.tabs.train import progress_html, rate_text

    # tqdm's own line for the trainer's bar (unit="step", average since the start)
    fast = tqdm.format_meter(n=199, total=500, elapsed=100, unit="step")
    slow = tqdm.format_meter(n=2, total=500, elapsed=7, unit="step")
    assert "1.99step/s" in fast and "3.50s/step" in slow
    assert rate_text(1.99) == "1.99 step/s" and rate_text(2 / 7) == "3.50 s/step" and rate_text(None) == "- step/s"
    page = progress_html({"status": "running", "name": "x"}, Progress(step=199, total_steps=500, it_per_s=1.99, eta_s=151))
    assert "1.99 step/s" in page and "it/s" not in page


def test_status_line_shows_the_latest_validation_loss():
    from webui.jobs import Progress
    from webui.tabs.train import progress_html

    p = Progress(step=40, total_steps=100, loss=0.2, val_losses=[(20, 0.31), (40, 0.2875)])
    assert "validation loss 0.2875 (step 40)" in progress_html({"status": "running", "name": "x"}, p)
    assert "validation" not in progress_html({"status": "running", "name": "x"}, Progress(step=40, total_steps=100, loss=0.2))


def test_trainer_bar_and_events_report_the_same_speed(tiny_training_root, tmp_path, capsys, caplog):
    """The log (the trainer's tqdm bar on a terminal, its step lines elsewhere) and the step events
    (what the page shows) give one number."""
    import logging

    import torch

    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.training import train

    events = []

    def on_event(e):
        events.append(e)
        if e["event"] == "step" and e["step"] == 2:
            time.sleep(1.5)  # a slow stretch early on (as a sample or a checkpoint makes): recent speed != average

    cfg = TrainConfig(model=str(tiny_training_root / "model"), output=str(tmp_path / "out" / "speed.safetensors"),
                      data=DataConfig(path=str(tiny_training_root / "data"), resolution=64),
                      network={"rank": 2, "alpha": 2, "preset": "attention"}, steps=12, seed=1, log_every=1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="sd_lora")
    try:
        train(cfg, on_event=on_event)
    finally:
        torch.set_num_threads(n)
    # each line the bar printed while running ("5/12 [00:03<00:04,  1.80step/s, ...") or, without a terminal, each
    # step line ("step 5/12: loss 0.1234, 1.80 step/s") against the event of that step
    text = capsys.readouterr().err + "\n" + "\n".join(r.getMessage() for r in caplog.records)
    printed = re.findall(r"(\d+)/12(?: \[|: )[^\]\n\r]*?([\d.]+) ?(step/s|s/step)", text)
    rates = {e["step"]: e["it_per_s"] for e in events if e["event"] == "step"}
    pairs = [(rates[int(n)], float(x) if unit == "step/s" else 1 / float(x)) for n, x, unit in printed if int(n) in rates]
    assert len(pairs) >= 3, printed
    assert [bar for _, bar in pairs] == pytest.approx([event for event, _ in pairs], rel=0.05), pairs


def test_errors_are_kept_for_the_message_box():
    import gradio as gr

    from webui.tabs.train import Problems

    problems = Problems()

    @problems.guard
    def start(text: str):
        if text == "config":
            raise ConfigError(["steps: must be at least 1 (got 0)", "data.path: set a dataset folder"])
        raise PathError("output name: 'a/b' is not a plain name")

    page, other = SimpleNamespace(session_hash="page"), SimpleNamespace(session_hash="other")
    with pytest.raises(gr.Error, match="not a plain name"):  # still a toast, and an error for API callers
        start(page, "path")
    assert "not a plain name" not in problems.show(other)  # another browser tab's error is not shown here
    box = problems.show(page)
    assert 'data-kind="error"' in box and "output name: &#x27;a/b&#x27; is not a plain name" in box
    with pytest.raises(gr.Error):
        start(page, "config")
    box = problems.show(page)
    assert "<li>steps: must be at least 1 (got 0)</li>" in box and "<li>data.path: set a dataset folder</li>" in box
    # Gradio hands the request to the wrapper (its first parameter is annotated gr.Request)
    from gradio.helpers import special_args

    args, *_ = special_args(start, ["path"], request="REQ")
    assert args == ["REQ", "path"]


def test_app_start_hint_validation_words_and_config_endpoints(ws, capsys):
    from gradio_client import Client

    from test_webui import free_port
    from webui.app import launch, stop

    port = free_port()
    demo = launch(ws.root, port=port, block=False)
    try:
        out = capsys.readouterr().out
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # validation in the tab names config keys, never the CLI's flags
        bad = client.predict(TOML.replace("steps = 7", "steps = 0").replace("rank = 4", "rank = 0"), api_name="/validate_config")
        assert "steps:" in bad and "network.rank:" in bad and "--" not in bad
        # save, then load back through the page's endpoints
        choices, note = client.predict(TOML, "from-api", api_name="/save_config")
        assert "configs/from-api.toml" in note and (ws.root / "configs" / "from-api.toml").is_file()
        loaded = client.predict("configs/from-api.toml", api_name="/load_config")
        assert 'model = "models/tiny"' in loaded[0] and "steps = 7" in loaded[0] and "Loaded" in loaded[-1]
    finally:
        stop(demo)
    assert "Running on local URL:  http://127.0.0.1:" in out
    assert "sd-lora ui --share --auth USER:PASSWORD" in out and "share=True" not in out


def test_form_starts_with_the_default_config(ws):
    """A fresh page's form shows the default config (the TOML box's), so the first edit of one field
    does not write empty numbers (0) for all the others into the TOML."""
    import gradio as gr

    from webui.app import build_app
    from webui.tabs.train import FORM_KEYS, apply_form, default_config, dump_config, form_values, parse_toml

    demo = build_app(ws)
    try:
        toml_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-toml")
        # the form is the inputs of a form edit (toml box first, then the fields in FORM_KEYS order)
        edit = next(fn for fn in demo.fns.values() if fn.inputs and fn.inputs[0] is toml_box and len(fn.inputs) == 1 + len(FORM_KEYS))
        start = [c.value for c in edit.inputs[1:]]
        assert start == [v if v != "" or k not in ("model", "data.path") else None
                         for k, v in zip(FORM_KEYS, form_values(default_config()))]
        assert all(isinstance(c, gr.components.Component) for c in edit.inputs[1:])
        # what one edit of `steps` writes: the default config with only that value changed
        values = list(start)
        values[FORM_KEYS.index("steps")] = 77
        after = apply_form(parse_toml(toml_box.value), values)
        expected = default_config()
        expected.steps = 77
        expected.model = expected.data.path = None  # empty dropdowns send None: the keys are left out, as unset
        assert dump_config(after) == dump_config(expected)
    finally:
        demo.close()


# ---- issue #17: every key is on the form, the rare ones under "Advanced" ----------------------------------

def test_every_config_key_has_a_form_field_or_a_reason():
    from sd_lora.config import config_keys
    from webui.tabs.train import ADVANCED_KEYS, BASIC_KEYS, FORM_KEYS, NOT_ON_FORM

    names = [k.name for k in config_keys()]
    assert sorted(FORM_KEYS + list(NOT_ON_FORM)) == sorted(names)
    assert FORM_KEYS == BASIC_KEYS + ADVANCED_KEYS and len(set(FORM_KEYS)) == len(FORM_KEYS)


def test_advanced_fields_round_trip_their_keys_types():
    from sd_lora.config import config_key
    from webui.tabs.train import ADVANCED_KEYS, FORM_KEYS, apply_form, default_config, form_values

    # what the page's boxes send for a value of each kind (numbers as floats, JSON as text)
    sent = {"epochs": 3.0, "text_encoder_lr": "5e-5", "base_precision": "bf16", "prediction_type": "v_prediction",
            "network.block_ranks": '{"down": 4, "up": 8}', "data.caption_extension": ".caption", "data.flip": True,
            "network.dropout": 0.1, "cpu_threads": 2.0, "comment": "hi there"}
    assert set(sent) <= set(ADVANCED_KEYS)
    cfg = default_config()
    values = dict(zip(FORM_KEYS, form_values(cfg)))
    values.update(sent)
    cfg = apply_form(cfg, [values[k] for k in FORM_KEYS])
    got = {k: config_key(k).get(cfg) for k in sent}
    assert got == {"epochs": 3, "text_encoder_lr": 5e-5, "base_precision": "bf16", "prediction_type": "v_prediction",
                   "network.block_ranks": {"down": 4, "up": 8}, "data.caption_extension": ".caption", "data.flip": True,
                   "network.dropout": 0.1, "cpu_threads": 2, "comment": "hi there"}
    assert isinstance(cfg.epochs, int) and isinstance(cfg.cpu_threads, int)
    assert cfg.steps is None  # the edited epochs wins over the form's steps, as a flag would
    # the form shows what it wrote, and writing it again changes nothing
    again = dict(zip(FORM_KEYS, form_values(cfg)))
    assert again["network.block_ranks"] == '{"down": 4, "up": 8}' and again["epochs"] == "3"
    assert apply_form(cfg, [again[k] for k in FORM_KEYS]).to_dict() == cfg.to_dict()
    # the "default" entry of an optional dropdown, an emptied JSON box and an emptied text box
    again.update({"base_precision": "", "network.block_ranks": "", "data.caption_extension": ""})
    cfg = apply_form(cfg, [again[k] for k in FORM_KEYS])
    assert (cfg.base_precision, cfg.network.block_ranks, cfg.data.caption_extension) == (None, None, "")
    again["network.block_ranks"] = "[1, 2"
    with pytest.raises(ValueError, match=r"^network.block_ranks: must be a table"):
        apply_form(cfg, [again[k] for k in FORM_KEYS])


def test_advanced_section_is_built_from_the_keys(tmp_path):
    import gradio as gr

    from sd_lora.config import config_key
    from webui.app import build_app
    from webui.security import Workspace
    from webui.tabs.train import ADVANCED_KEYS

    demo = build_app(Workspace(tmp_path))
    try:
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert isinstance(by_id["train-advanced"], gr.Accordion) and by_id["train-advanced"].open is False
        for name in ADVANCED_KEYS:
            comp, key = by_id["adv-" + name.replace(".", "-")], config_key(name)
            assert comp.info.startswith(key.help), name
            kind = (gr.Dropdown if key.choices else gr.Checkbox if key.kind == "bool"
                    else gr.Number if key.kind in ("int", "float") and (not key.optional or name == "steps") else gr.Textbox)
            assert isinstance(comp, kind), name
        assert [c[1] for c in by_id["adv-base_precision"].choices][0] == ""  # optional: "default" first
    finally:
        demo.close()


def test_optional_numbers_are_text_boxes_that_stay_unset():
    """Gradio's Number box shows None as 0 and sends 0 with the next edit of any field: a form that
    used one set lr = 0, max_timestep = 0, cpu_threads = 0 ... as soon as anything was typed."""
    import gradio as gr

    from sd_lora.config import TrainConfig, config_key
    from webui.tabs.train import FORM_KEYS, _field, apply_form, form_values

    optional = [k for k in FORM_KEYS if config_key(k).kind in ("int", "float") and config_key(k).optional
                and config_key(k).choices is None]
    optional.remove("steps")  # a Number box (webui/tabs/train.py _text_number)
    assert {"lr", "cpu_threads", "max_timestep", "epochs"} <= set(optional)
    with gr.Blocks():
        assert all(isinstance(_field(k, k), gr.Textbox) for k in optional)
        assert isinstance(_field("batch_size", "batch size"), gr.Number)  # a number that always has a value stays one
    values = form_values(TrainConfig())
    assert all(values[FORM_KEYS.index(k)] == "" for k in optional)
    cfg = apply_form(TrainConfig(), values)
    assert all(config_key(k).get(cfg) is None for k in optional)
    edited = [("3e-4" if k == "lr" else "2" if k == "cpu_threads" else v) for k, v in zip(FORM_KEYS, values)]
    cfg = apply_form(TrainConfig(), edited)
    assert cfg.lr == 3e-4 and cfg.cpu_threads == 2
    assert form_values(cfg)[FORM_KEYS.index("lr")] == "0.0003"
