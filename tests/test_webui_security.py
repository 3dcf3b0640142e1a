"""The web UI's security promises: paths confined to the workspace (no `..`, absolute or symlink
escape, through every entry point), uploads size-limited, --auth guarding pages, files and the API,
and a warning when listening beyond this machine without a password."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from webui.security import PathError, Workspace, exposure_warning, is_loopback, parse_auth, safe_name

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ws(tmp_path):
    """A workspace with a dataset, a secret file next to (outside) it, and a symlink that points out."""
    root = tmp_path / "ws"
    w = Workspace(root)
    (root / "datasets" / "cats").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "datasets" / "cats" / "a.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOKEN-7f3a")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(outside / "b.png")
    os.symlink(outside, root / "datasets" / "escape")
    return w


# ---- Workspace.path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["..", "../outside", "datasets/../../outside/secret.txt", "/etc/passwd", "/",
                                 "datasets/escape", "datasets/escape/secret.txt", "~/x", "datasets/cats/../../../outside"])
def test_paths_outside_the_workspace_are_refused(ws, bad):
    with pytest.raises(PathError, match="outside the workspace"):
        ws.path(bad)


def test_paths_inside_resolve(ws):
    assert ws.path("datasets/cats") == ws.root / "datasets" / "cats"
    assert ws.path(str(ws.root / "datasets" / "cats")) == ws.root / "datasets" / "cats"
    assert ws.path("datasets/cats/../cats/a.png", must_exist=True) == ws.root / "datasets" / "cats" / "a.png"
    assert ws.path(".") == ws.root
    with pytest.raises(PathError, match="does not exist"):
        ws.path("datasets/dogs", must_exist=True)
    with pytest.raises(PathError, match="NUL"):
        ws.path("datasets/cats\x00/../../x")


def test_symlink_inside_the_workspace_is_allowed(ws):
    os.symlink(ws.root / "datasets" / "cats", ws.root / "datasets" / "alias")
    assert ws.path("datasets/alias/a.png") == ws.root / "datasets" / "cats" / "a.png"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", ".hidden", "x\\y", "a" * 200, "x\x00"])
def test_safe_name_refuses_path_parts(bad):
    with pytest.raises(PathError):
        safe_name(bad)
    assert safe_name("my lora-v2.1") == "my lora-v2.1"


def test_host_auth_and_warning():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    assert parse_auth("me:pa:ss") == ("me", "pa:ss")
    for bad in ("me", "me:", ":pw"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", ("u", "p")) is None
    assert "without --auth" in exposure_warning("0.0.0.0", None)


def test_every_path_key_of_a_training_config_is_confined(ws):
    """The keys to confine come from the fields' path markers: each one, set outside, is refused by name."""
    from sd_lora.config import TrainConfig, config_keys
    from webui.security import confine_config

    path_keys = [k for k in config_keys() if k.path]
    assert {"model", "output", "vae", "checkpoint_dir", "resume", "sample_prompts", "data.path", "data.reg_path",
            "data.cache_dir"} <= {k.name for k in path_keys}
    for key in path_keys:
        for bad in ("../outside", "/etc", "datasets/escape/secret.txt"):
            cfg = TrainConfig()
            key.set(cfg, bad)
            with pytest.raises(PathError, match=f"^{key.name}: .*outside the workspace"):
                confine_config(ws, cfg)
    # values that are not paths pass untouched; paths inside come back absolute
    cfg = TrainConfig(model="models/x", resume="latest", sample_prompts="a cat\na dog")
    cfg.data.path = "datasets/cats"
    confine_config(ws, cfg)
    assert (cfg.model, cfg.data.path) == (str(ws.root / "models" / "x"), str(ws.root / "datasets" / "cats"))
    assert (cfg.resume, cfg.sample_prompts) == ("latest", "a cat\na dog")
    # a newline does not turn another path key into "text" that skips the check
    cfg = TrainConfig(model="/etc\n")
    with pytest.raises(PathError):
        confine_config(ws, cfg)


def test_cli_refuses_share_without_auth(tmp_path, capsys):
    from sd_lora.cli import main

    assert main(["ui", "--workspace", str(tmp_path), "--share"]) == 1
    assert "--share publishes the UI" in capsys.readouterr().err


# ---- through the running app --------------------------------------------------------------------------


@pytest.fixture
def app(ws):
    from webui.app import launch, stop

    port = free_port()
    demo = launch(ws.root, port=port, block=False, quiet=True, max_file_size="1mb")
    yield f"http://127.0.0.1:{port}/", ws
    stop(demo)


def test_every_entry_point_refuses_escapes(app):
    url, ws = app
    client = Client(url, verbose=False)
    outside = ws.root.parent / "outside"
    for folder in ("../outside", str(outside), "datasets/escape", "/etc"):
        with pytest.raises(AppError, match="outside the workspace"):
            client.predict(folder, api_name="/dataset_gallery")
        with pytest.raises(AppError, match="outside the workspace"):
            client.predict(folder, 1, 64, api_name="/check_dataset")
        with pytest.raises(AppError, match="outside the workspace"):
            client.predict(folder, "add prefix", "x", "", api_name="/bulk_caption")
    # a caption written through an image path that climbs out of the dataset
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("datasets/cats", "../../../outside/b.png", "pwned", api_name="/save_caption")
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("datasets/cats", "../escape/b.png", "pwned", api_name="/save_caption")
    assert not (outside / "b.txt").exists()
    # a new dataset name cannot be a path
    with pytest.raises(AppError, match="not a plain name"):
        client.predict("datasets/cats", "../../evil", [], api_name="/upload_images")
    # training configs: every path key is checked before anything runs
    for toml in ('model = "/etc"', 'output = "../../x.safetensors"', 'checkpoint_dir = "/tmp/x"', 'vae = "../outside"',
                 'steps = 1\n[data]\npath = "datasets/escape"', 'steps = 1\n[data]\ncache_dir = "../.."'):
        msg = client.predict(toml, api_name="/validate_config")
        assert "outside the workspace" in msg, (toml, msg)
        _, started = client.predict(toml, api_name="/start_job")
        assert "Not started" in started and "outside the workspace" in started
    assert not list((ws.root / "jobs").iterdir())
    # a kohya dataset config: each folder it names is checked too, and refused by name
    kohya = ws.root / "configs" / "kohya" / "ds.toml"
    kohya.parent.mkdir(parents=True)
    kohya.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{ws.root / "datasets" / "cats"}"\n'
                     f'[[datasets.subsets]]\nimage_dir = "{outside}"\nis_reg = true\n')
    toml = 'steps = 1\n[data]\ndataset_config_path = "configs/kohya/ds.toml"'
    msg = client.predict(toml, api_name="/validate_config")
    assert "datasets[1].subsets[2].image_dir" in msg and "outside the workspace" in msg and "subsets[1]" not in msg, msg
    _, started = client.predict(toml, api_name="/start_job")
    assert "Not started" in started and "outside the workspace" in started
    assert not list((ws.root / "jobs").iterdir())
    # an uploaded one lands in configs/kohya/ and is set in the TOML
    from gradio_client import handle_file

    up = ws.root.parent / "up.toml"
    up.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{ws.root / "datasets" / "cats"}"\n')
    _choice, text, note = client.predict("steps = 1", handle_file(str(up)), api_name="/upload_dataset_config")
    assert 'dataset_config_path = "configs/kohya/up.toml"' in text and "Uploaded" in note
    assert "outside" not in client.predict(text, api_name="/validate_config")
    # library and generation: LoRA names stay in loras/
    (ws.root / "models" / "x.safetensors").write_bytes(b"")
    for name in ("../models/x", "../../outside/secret", "/etc/passwd"):
        with pytest.raises(AppError, match="outside the workspace|not in the library|does not exist"):
            client.predict(name, api_name="/inspect_lora")
    # job ids are not paths
    with pytest.raises(AppError, match="unknown job"):
        client.predict("../../outside", api_name="/stop_job")


def test_file_route_serves_only_the_workspace(app):
    url, ws = app
    secret = ws.root.parent / "outside" / "secret.txt"
    inside = ws.root / "datasets" / "cats" / "a.png"
    with httpx.Client(base_url=url) as h:
        assert h.get(f"gradio_api/file={inside}").status_code == 200
        for p in (secret, Path("/etc/passwd"), ws.root / "datasets" / "escape" / "secret.txt"):
            r = h.get(f"gradio_api/file={p}")
            assert r.status_code in (403, 404), (p, r.status_code)
            assert b"TOKEN-7f3a" not in r.content


def test_uploads_are_size_limited(app):
    url, _ = app
    with httpx.Client(base_url=url) as h:
        small = h.post("gradio_api/upload", files={"files": ("a.png", b"x" * 1000, "image/png")})
        assert small.status_code == 200
        big = h.post("gradio_api/upload", files={"files": ("big.png", b"x" * 2_000_000, "image/png")})
        assert big.status_code == 413


def test_auth_protects_pages_files_and_api(ws):
    from webui.app import launch, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    # a model, a LoRA and a saved config whose names must not show before a login either
    (ws.root / "models" / "private-base").mkdir(parents=True)
    (ws.root / "models" / "private-base" / "model_index.json").write_text("{}")
    (ws.root / "loras").mkdir(exist_ok=True)
    (ws.root / "loras" / "client-style.safetensors").write_bytes(b"\0" * 16)
    (ws.root / "configs").mkdir(exist_ok=True)
    (ws.root / "configs" / "client-job.toml").write_text("")
    demo = launch(ws.root, port=port, auth=("alice", "s3cret"), block=False, quiet=True)
    inside = ws.root / "datasets" / "cats" / "a.png"
    try:
        with httpx.Client(base_url=url) as h:
            login = h.get("").text
            assert '"auth_required": true' in login.replace('":true', '": true')  # the login page, not the app
            # nothing of the workspace shows before a login (Gradio embeds the API description in this page)
            for secret in ("datasets/cats", "cats", str(ws.root), "a.png", "private-base", "client-style", "client-job"):
                assert secret not in login, secret
            assert h.get("config").status_code == 401
            assert h.get(f"gradio_api/file={inside}").status_code in (401, 403)
            assert h.post("gradio_api/upload", files={"files": ("a.png", b"x", "image/png")}).status_code in (401, 403)
            assert h.get("gradio_api/info").status_code == 401
            assert h.post("gradio_api/call/dataset_gallery", json={"data": ["datasets/cats"]}).status_code in (401, 403)
            assert h.post("login", data={"username": "alice", "password": "wrong"}).status_code == 400
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        gallery, note = client.predict("datasets/cats", api_name="/dataset_gallery")
        assert len(gallery) == 1 and "1 images" in note
        with httpx.Client(base_url=url) as h:
            assert h.post("login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            assert h.get(f"gradio_api/file={inside}").status_code == 200
    finally:
        stop(demo)


def test_launch_waits_for_a_slow_first_answer_instead_of_refusing_to_serve(monkeypatch):
    """Gradio's own check gives up after one 3 s timeout, which a loaded CI machine can exceed."""
    from gradio import networking

    from webui.app import _patient_start_check

    answers = iter([False, False, True])  # the first two checks time out, the third gets its 200
    monkeypatch.setattr(networking, "url_ok", lambda url: next(answers))
    with _patient_start_check():
        assert networking.url_ok("http://127.0.0.1:1/") is True
    assert networking.url_ok.__name__ == "<lambda>"  # put back after launch
