"""The web UI driven through its API with gradio_client, on the tiny SD1 model: caption a folder, train,
stop and resume, generate with a two-LoRA stack, inspect the library; then train and generate on the tiny SDXL model.

One server for the module (starting Gradio and the training processes is the slow part); the tests run
in file order, and the job tests use only their own jobs."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workspace(root: Path) -> Path:
    """A workspace with the tiny SD1 model, a 4-image dataset and two LoRA files with non-zero weights."""
    import torch

    from sd_lora import NetworkConfig, inject_network, save_lora
    from sd_lora.testing import tiny_pipeline

    tiny_pipeline("sd1").save_pretrained(root / "models" / "tiny")
    data = root / "datasets" / "shapes"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["red_circle_01", "blue_square_02", "green_star_03", "red_circle_04"]):
        arr = np.full((64, 64, 3), (i * 60) % 255, dtype=np.uint8)
        arr[16:48, 16:48] = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(data / f"{name}.png")
    for seed, name in ((1, "ink"), (2, "glow")):
        pipe = tiny_pipeline("sd1")
        net = inject_network(pipe, NetworkConfig(rank=4, alpha=4, preset="attention"))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_lora(root / "loras" / f"{name}.safetensors", net, metadata={"ss_tag_frequency": json.dumps({"1_x": {name: 3, "shape": 1}})})
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from webui.app import launch, stop

    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    port = free_port()
    demo = launch(ws, port=port, block=False, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, ws, demo
    stop(demo)


def toml_for(ws: Path, output: str, steps: int, extra: str = "") -> str:
    # workspace-relative paths, as a user types them in the TOML box
    return f"""
model = "models/tiny"
output = "loras/{output}.safetensors"
steps = {steps}
seed = 1
{extra}
[data]
path = "datasets/shapes"
resolution = 64
[network]
rank = 4
alpha = 4.0
preset = "attention"
"""


def value(out):
    """A dropdown output through the API: an update dict {"__type__": "update", "value": ...} or the value."""
    return out["value"] if isinstance(out, dict) else out


def wait_status(client: Client, job_id: str, until, timeout: float = 150.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(job_id, api_name="/job_status")
        if until(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the state; last: {st}")


def test_caption_folder_edit_and_check(server):
    client, ws, _ = server
    data = ws / "datasets" / "shapes"
    assert not list(data.glob("*.txt"))
    summary = client.predict("datasets/shapes", "filename", "fill", "", "", "", api_name="/auto_caption")[2]
    assert "wrote 4 caption" in summary
    assert (data / "red_circle_01.txt").read_text().strip() == "red circle"
    # one caption edited by hand, then a bulk trigger word
    client.predict("datasets/shapes", "blue_square_02.png", "a blue square", api_name="/save_caption")
    assert (data / "blue_square_02.txt").read_text().strip() == "a blue square"
    status = client.predict("datasets/shapes", "add trigger word", "sks", "", api_name="/bulk_caption")[2]
    assert "changed 4" in status
    assert (data / "blue_square_02.txt").read_text().strip() == "sks, a blue square"
    # the gallery shows the captions the trainer will read
    gallery, note = client.predict("datasets/shapes", api_name="/dataset_gallery")
    assert len(gallery) == 4 and "0 without a caption" in note
    assert sorted(item["caption"] for item in gallery)[0].endswith("sks, a blue square")
    report = client.predict("datasets/shapes", 3, 64, api_name="/check_dataset")
    assert "4 training images" in report and "12 samples per epoch" in report and "4 from .txt" in report


def test_start_job_and_poll_to_completion(server):
    client, ws, _ = server
    bad = client.predict(toml_for(ws, "first", 0), api_name="/validate_config")
    assert "steps" in bad and "problem" in bad
    toml = toml_for(ws, "first", 4, 'sample_every = 2\nsample_prompts = ["sks, a red circle"]\nsample_steps = 2\nsave_every = 2')
    assert "Config OK" in client.predict(toml, api_name="/validate_config")
    job_id, message = client.predict(toml, api_name="/start_job")
    job_id = value(job_id)
    assert job_id and "Queued" in message
    seen_steps = set()

    def finished(st):
        seen_steps.add(st["step"])
        return st["status"] in ("done", "failed", "stopped")

    st = wait_status(client, job_id, finished)
    assert st["status"] == "done", st
    assert st["step"] == st["total_steps"] == 4
    assert len(seen_steps) >= 2  # progress was visible while it ran, not only at the end
    assert (ws / "loras" / "first.safetensors").is_file()
    assert len(st["samples"]) == 2 and all(Path(p).is_file() for p in st["samples"])
    # the library lists the trained file with its metadata
    frame = client.predict(api_name="/library")[0]
    assert "first" in [row[0] for row in frame["data"]]
    details = client.predict("first", api_name="/inspect_lora")[0]
    assert details["summary"]["base_model"] == "SD 1.x" and details["summary"]["modules"] > 0


def test_stop_and_resume_second_job(server):
    client, ws, _ = server
    job_id = value(client.predict(toml_for(ws, "second", 10, "save_every = 100"), api_name="/start_job")[0])
    wait_status(client, job_id, lambda st: st["step"] >= 1 or st["status"] not in ("queued", "running"))
    client.predict(job_id, api_name="/stop_job")
    st = wait_status(client, job_id, lambda st: st["status"] not in ("queued", "running", "stopping"))
    assert st["status"] == "stopped", st
    stopped_at = st["step"]
    assert 1 <= stopped_at < 10
    assert st["checkpoints"], "stop must leave a resumable checkpoint"
    new_id, message = client.predict(job_id, api_name="/resume_job")
    new_id = value(new_id)
    assert new_id != job_id and "resuming" in message
    st2 = wait_status(client, new_id, lambda st: st["status"] not in ("queued", "running", "stopping"))
    assert st2["status"] == "done", st2
    assert st2["resume_of"] == job_id and st2["step"] == 10
    # the resumed run started where the first stopped: its first step event is the next step
    events = [json.loads(x) for x in (ws / "jobs" / new_id / "events.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps[0] == stopped_at + 1 and steps[-1] == 10
    with pytest.raises(AppError, match="only queued or running"):
        client.predict(new_id, api_name="/stop_job")


def test_generate_with_two_lora_stack(server):
    client, ws, _ = server
    common = ["models/tiny", "a red circle", "", 3, 2, 64, 64, 1.0]
    rows = ["ink", 1.0, None, "glow", 0.8, 0.5, "", 1.0, None, "", 1.0, None]
    images, info = client.predict(*common, True, *rows, api_name="/generate")
    assert [im["caption"] for im in images] == ["base", "ink", "glow", "stack"]
    arrays = [np.asarray(Image.open(im["image"])) for im in images]
    assert not np.array_equal(arrays[0], arrays[3]), "the stack must change the image"
    assert not np.array_equal(arrays[1], arrays[3])
    assert "ink x1" in info and "glow x0.8 (TE x0.5)" in info and "Trigger words" in info
    # each PNG carries generate()'s parameters text, with that image's own stack
    texts = [Image.open(im["image"]).info["parameters"] for im in images]
    # (A1111's infotext layout since issue #21: no LoRA fields without LoRAs, a quoted LoRAs value)
    assert "Seed: 3, Size: 64x64, Model hash: " in texts[0] and ", Model: tiny, Version: " in texts[0]
    assert "LoRAs" not in texts[0] and "Lora hashes" not in texts[0] and 'LoRAs: "ink:1:1 glow:0.8:0.5"' in texts[3]
    # the same stack through <lora:...> tags in the prompt gives the same image as the sliders
    tagged = ["models/tiny", "a red circle <lora:ink:1> <lora:glow:0.5:0.8>", "", 3, 2, 64, 64, 1.0]
    images2, _ = client.predict(*tagged, False, *(["", 1.0, None] * 4), api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(images2[0]["image"])), arrays[3])
    # and the pipeline is back to the base afterwards (exact restore)
    base_again, _ = client.predict(*common, False, *(["", 1.0, None] * 4), api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(base_again[0]["image"])), arrays[0])


def test_sdxl_train_and_generate(server):
    """The same UI calls on the tiny SDXL model: a short training job, then its LoRA in a generate call
    (with guidance rescale, the sampler option that rides at the end of the generate inputs)."""
    from sd_lora.testing import tiny_pipeline

    client, ws, _ = server
    tiny_pipeline("sdxl").save_pretrained(ws / "models" / "tiny-sdxl")
    toml = toml_for(ws, "xl", 2, "lr = 0.01").replace('model = "models/tiny"', 'model = "models/tiny-sdxl"')
    job_id = value(client.predict(toml, api_name="/start_job")[0])
    st = wait_status(client, job_id, lambda st: st["status"] in ("done", "failed", "stopped"))
    assert st["status"] == "done" and st["step"] == 2, st
    details = client.predict("xl", api_name="/inspect_lora")[0]
    assert details["summary"]["modules"] > 0 and "XL" in details["summary"]["base_model"]
    rows = ["xl", 1.0, None] + ["", 1.0, None] * 3
    images, info = client.predict("models/tiny-sdxl", "a red circle", "", 3, 2, 64, 64, 5.0, True, *rows, 0.7, False,
                                  api_name="/generate")
    assert [im["caption"] for im in images] == ["base", "xl"] and "xl x1" in info
    base, lora = (np.asarray(Image.open(im["image"])) for im in images)
    assert base.shape == (64, 64, 3) and not np.array_equal(base, lora), "the trained SDXL LoRA must change the image"
    # zero terminal SNR is for v-prediction models: this epsilon model is refused with the reason
    with pytest.raises(AppError, match="needs a v-prediction model"):
        client.predict("models/tiny-sdxl", "a red circle", "", 3, 1, 64, 64, 5.0, False, *rows, 0.7, True, api_name="/generate")


def test_presets_and_toml_round_trip(server):
    client, _, _ = server
    out = client.predict('model = "models/tiny"\nsteps = 10\n', "8 GB - SD1.5 512 px", "~19 MB SD1.5 / ~114 MB SDXL (rank 16)",
                         api_name="/apply_preset")
    toml = out[0]
    assert 'mixed_precision = "fp16"' in toml and "optimizer = \"adamw8bit\"" in toml
    assert "rank = 16" in toml and 'model = "models/tiny"' in toml and "steps = 10" in toml


# ---- the train form, without a server ------------------------------------------------------------------


def test_train_form_reads_values_as_their_keys_types():
    from webui.tabs.train import FORM_KEYS, apply_form, form_values, parse_toml

    cfg = parse_toml('model = "models/tiny"\nepochs = 3\n[data]\npath = "datasets/shapes"\n')
    values = dict(zip(FORM_KEYS, form_values(cfg)))
    # what Gradio sends: floats from number boxes, strings from text boxes
    values.update({"steps": 40.0, "batch_size": "2", "lr": "3e-4", "network.rank": 8.0, "network.alpha": "4",
                   "data.resolution": 64.0, "save_every": 0, "sample_every": 0.0, "output": "style",
                   "sample_prompts": "a red circle\n\na blue square", "network.train_text_encoder": False, "seed": ""})
    cfg = apply_form(cfg, [values[k] for k in FORM_KEYS])
    assert (cfg.steps, cfg.epochs, cfg.batch_size, cfg.lr, cfg.network.rank, cfg.network.alpha) == (40, None, 2, 3e-4, 8, 4.0)
    assert all(isinstance(v, int) for v in (cfg.steps, cfg.batch_size, cfg.network.rank, cfg.data.resolution))
    assert (cfg.save_every, cfg.sample_every, cfg.output) == (0, 0, "loras/style.safetensors")  # 0: never
    assert cfg.sample_prompts == ["a red circle", "a blue square"] and cfg.network.train_text_encoder is False
    assert cfg.validate(check_paths=False) == ["seed: must be a whole number (got None)"]  # an emptied box, named by key
    values["network.rank"] = 2.5
    with pytest.raises(ValueError, match=r"^network.rank: must be a whole number \(got 2.5\)"):
        apply_form(cfg, [values[k] for k in FORM_KEYS])


def test_train_form_dropdowns_offer_the_keys_choices():
    import gradio as gr

    from sd_lora.config import config_key
    from webui.tabs.train import _field

    with gr.Blocks():
        for name in ("network.method", "network.preset", "optimizer", "mixed_precision"):
            dropdown = _field(name, name)
            assert isinstance(dropdown, gr.Dropdown)
            assert [value for _, value in dropdown.choices] == list(config_key(name).choices)
        assert isinstance(_field("gradient_checkpointing", "gc"), gr.Checkbox)


def test_train_presets_set_valid_values_of_real_keys():
    from sd_lora.config import config_key
    from webui.tabs.train import GPU_PRESETS, SIZE_PRESETS, apply_presets, default_config

    for preset in [*GPU_PRESETS.values(), *SIZE_PRESETS.values()]:
        cfg = apply_presets(default_config(), preset)  # a key that does not exist raises KeyError
        assert [config_key(name).problem(config_key(name).get(cfg)) for name in preset] == [None] * len(preset), preset


# ---- the job queue's on-disk state, without a server -------------------------------------------------


def test_event_tail_reads_only_complete_lines(tmp_path):
    from webui.jobs import EventTail

    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "start", "total_steps": 10}\n{"event": "step", "step": 1, "loss": 0.5, "it_per_s": 2.0, "eta_s": 4.5}\n{"event": "st')
    tail = EventTail(path)
    p = tail.update()
    assert (p.step, p.total_steps, p.loss, p.losses) == (1, 10, 0.5, [(1, 0.5)])
    with open(path, "a") as f:  # the half-written line completes; nothing is read twice
        f.write('ep", "step": 2, "loss": 0.25}\n{"event": "sample", "step": 2, "paths": ["a.png"]}\n')
    p = tail.update()
    assert p.losses == [(1, 0.5), (2, 0.25)] and p.samples == ["a.png"]


def test_job_progress_reads_only_fields_the_trainer_sends():
    """Every event field the job page folds in is in the trainer's schema (no reading of never-sent fields)."""
    import ast
    import inspect

    from sd_lora.training.events import EVENTS
    from webui.jobs import fold_event

    tree = ast.parse(inspect.getsource(fold_event))
    read = {n.args[0].value for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "e"}
    kinds = {c.value for n in ast.walk(tree) if isinstance(n, ast.Compare) and isinstance(n.left, ast.Name)
             and n.left.id == "kind" for c in n.comparators if isinstance(c, ast.Constant)}
    assert read and kinds
    assert read <= {"event"} | {f for fields in EVENTS.values() for f in fields}, read
    assert kinds <= set(EVENTS), kinds


def test_library_picture_and_listing_use_the_run_names(tmp_path):
    """The library's picture for a LoRA is its run's last-step sample (by sd_lora.artifacts, not by sorting
    file names); files inside a run's checkpoint/sample folders are not listed as LoRAs."""
    from sd_lora import artifacts
    from webui.security import Workspace
    from webui.tabs.common import list_loras
    from webui.tabs.library import sample_image

    lib = tmp_path / "loras"
    lora = lib / "style.safetensors"
    for step, index in ((9, 0), (10, 1), (10, 0), (100, 0)):
        p = artifacts.sample_image(lora, step, index) if step != 100 else artifacts.samples_dir(lora) / "step-100-x.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)
    assert sample_image(lora) == artifacts.sample_image(lora, 10, 0)  # last step, first prompt; step-100-x is no sample
    lora.with_suffix(".preview.png").write_bytes(b"")
    assert sample_image(lora) == lora.with_suffix(".preview.png")  # a preview next to the file wins

    lora.write_bytes(b"")
    artifacts.intermediate_lora(lora, 20).write_bytes(b"")
    ckpt = artifacts.checkpoint_root(lora) / artifacts.checkpoint_name(20)
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"")
    (artifacts.samples_dir(lora) / "odd.safetensors").write_bytes(b"")
    assert sorted(list_loras(Workspace(tmp_path))) == ["style", "style-step000020"]


def test_server_restart_finalizes_orphaned_jobs(tmp_path):
    """A job recorded as running whose process is gone (server killed) gets its real end state at start-up."""
    from webui.jobs import JobQueue

    for job_id, events in (("20260101-000000-aaaaaa", '{"event": "stopped", "step": 3}\n'), ("20260101-000001-bbbbbb", "")):
        d = tmp_path / job_id
        d.mkdir()
        (d / "events.jsonl").write_text(events)
        (d / "state.json").write_text(json.dumps({"id": job_id, "status": "running", "pid": 2**22 + 12345, "stop_file": str(d / "STOP")}))
    q = JobQueue(tmp_path)
    states = {j["id"]: j for j in q.jobs()}
    assert states["20260101-000000-aaaaaa"]["status"] == "stopped"
    assert states["20260101-000001-bbbbbb"]["status"] == "failed" and "restarted" in states["20260101-000001-bbbbbb"]["message"]


def test_loss_chart_draws_raw_and_smoothed(tmp_path):
    import re

    from webui.tabs.train import loss_svg

    svg = loss_svg([(s, 1.0 / s) for s in range(1, 3001)], 0.9)
    lines = re.findall(r'<polyline points="([^"]+)"', svg)
    assert len(lines) == 2 and lines[0] != lines[1]
    assert 500 <= len(lines[0].split()) <= 700  # 3000 steps drawn with ~600 points
    assert "no steps yet" in loss_svg([], 0.5)


def test_library_convert_merge_resize(server):
    client, ws, _ = server
    from sd_lora import load_lora

    assert "diffusers format" in client.predict("ink", "diffusers", "ink-diff", api_name="/convert_lora")
    assert load_lora(ws / "loras" / "ink-diff.safetensors").format == "diffusers"
    msg = client.predict(["ink", "glow"], "1, 0.5", "inkglow", api_name="/merge_loras")
    assert "wrote loras/inkglow.safetensors" in msg and "relative delta error 0.0000" in msg
    msg = client.predict("inkglow", 2, "", api_name="/resize_lora")
    assert "wrote loras/inkglow-r2.safetensors" in msg
    assert {m.rank for m in load_lora(ws / "loras" / "inkglow-r2.safetensors").modules.values()} == {2}
    with pytest.raises(AppError, match="not a plain name"):
        client.predict("ink", "kohya", "../../evil", api_name="/convert_lora")
