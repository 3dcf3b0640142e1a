"""`sd-lora serve` (sd_lora.serve): every image is its stack's, equal to `sd_lora.generate()` run
alone (bit for bit unbatched, within the stated tolerance batched); bad input is refused with its
4xx before the model; overload gets 429 without harming accepted requests; tokens; cancel on
disconnect; metrics; a failing request leaves the base exact. datasets/tiny-base, 64 px, 2 steps."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import sd_lora
from sd_lora.serve import Scheduler, build_app, check_host
from sd_lora.serve.scheduler import Job
from sd_lora.testing import write_random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_BASE = Path(__file__).resolve().parents[1] / "datasets" / "tiny-base"
COMMON = {"steps": 2, "width": 64, "height": 64}
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Batched images (one pipeline call for several requests) start from the same noise as alone, but
# batched kernels round differently: measured max 1/255 per channel on tiny-base; allowed 3/255.
BATCH_TOLERANCE = 3


def _load():
    pipe = sd_lora.load_base(TINY_BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _load()


@pytest.fixture(scope="module")
def ref_pipe():
    """A second copy of the base for the references: sd_lora.generate() alone, nothing else in flight."""
    return _load()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("serve_loras")
    for i, name in enumerate(("ink", "glow", "film")):
        write_random_lora(root / f"{name}.safetensors", pipe, seed=i + 1)
    # the same shapes, but its metadata says SDXL: refused as a LoRA for another architecture
    write_random_lora(root / "xl_style.safetensors", pipe, seed=9,
                      metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    return root


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture(scope="module")
def base_weights():
    return weights(_load())  # a fresh copy: the service leaves its last stack fused in `pipe`


@contextlib.contextmanager
def serving(pipe, lora_dir, start=True, **kwargs):
    """(client, app) of a service on `pipe`; its scheduler is started later when start=False."""
    scheduler = Scheduler(pipe, start=start, **{k: kwargs.pop(k) for k in ("max_queue", "max_batch", "max_wait", "policy") if k in kwargs})
    app = build_app(pipe, lora_dir, token=TOKEN, scheduler=scheduler, **kwargs)
    with TestClient(app) as client:
        yield client, app
    scheduler.close()


def request(prompt="a red circle", loras=(), seed=3, **extra) -> dict:
    return {"prompt": prompt, "loras": [{"name": n, "weight": w} for n, w in loras], "seed": seed, **COMMON, **extra}


def reference(ref_pipe, lora_dir, body: dict) -> sd_lora.GeneratedImage:
    stack = [(lora_dir / f"{x['name']}.safetensors", x["weight"]) for x in body["loras"]]
    (im,) = sd_lora.generate(ref_pipe, body["prompt"], stack, lora_dir=lora_dir, seed=body["seed"], **COMMON).images
    return im


def png(response) -> tuple[np.ndarray, str]:
    assert response.status_code == 200, response.text
    im = Image.open(io.BytesIO(response.content))
    return np.asarray(im.convert("RGB")), im.info["parameters"]


def metric(client, name: str, labels: str = "") -> float:
    text = client.get("/metrics", headers=AUTH).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


def post_in_threads(client, bodies: list[dict]) -> list:
    out = [None] * len(bodies)

    def one(i):
        out[i] = client.post("/v1/generate", headers=AUTH, json=bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, out


def wait_queued(app, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(app.state.scheduler) < n:
        assert time.monotonic() < deadline, f"only {len(app.state.scheduler)} of {n} requests were queued"
        time.sleep(0.01)


# ---- correctness under concurrency -----------------------------------------------------------------


def test_concurrent_clients_with_mixed_stacks_each_get_exactly_their_stacks_image(pipe, ref_pipe, lora_dir):
    bodies = [
        request(loras=[("ink", 0.8)], seed=1),
        request(loras=[("glow", 1.0), ("film", 0.5)], seed=2),
        request("a blue square <lora:film:0.7>", seed=3),
        request(loras=[("ink", 0.8)], seed=4),
        request(seed=5),  # the base
        request(loras=[("glow", 1.0), ("film", 0.5)], seed=6),
    ]
    with serving(pipe, lora_dir, max_batch=1) as (client, app):  # max_batch 1: every image alone, bit for bit
        threads, responses = post_in_threads(client, bodies)
        for t in threads:
            t.join()
        assert metric(client, "sdlora_requests_total", '{status="200"}') == len(bodies)
        assert metric(client, "sdlora_images_total") == len(bodies)
    for body, response in zip(bodies, responses):
        image, text = png(response)
        ref = reference(ref_pipe, lora_dir, body)
        assert np.array_equal(image, np.asarray(ref.image)), body
        assert text == ref.parameters  # the same PNG text as sd-lora generate
        assert response.headers["X-Seed"] == str(body["seed"])


def test_same_stack_requests_are_grouped_and_batched_within_the_tolerance(pipe, ref_pipe, lora_dir):
    a, b = [("ink", 0.8)], [("glow", 0.6)]
    bodies = [request(loras=a, seed=1), request(loras=b, seed=2), request(loras=a, seed=3, prompt="a blue square"),
              request(loras=b, seed=4), request(loras=a, seed=5, n=2)]
    with serving(pipe, lora_dir, start=False, max_batch=4) as (client, app):
        threads, responses = [], []
        for body in bodies:  # queued in this order before the worker starts
            ts, rs = post_in_threads(client, [body])
            threads += ts
            responses.append(rs)
            wait_queued(app, len(threads))
        app.state.scheduler.start()
        for t in threads:
            t.join()
        # two stacks, so two switches (arrival order would switch five times), in two pipeline calls
        assert metric(client, "sdlora_stack_switches_total") == 2
        assert app.state.scheduler.batches == [3, 2]
        assert metric(client, "sdlora_batch_images_count") == 2 and metric(client, "sdlora_images_total") == 6
    for body, (response,) in zip(bodies, responses):
        ref_images = sd_lora.generate(ref_pipe, body["prompt"], [(lora_dir / f"{x['name']}.safetensors", x["weight"])
                                      for x in body["loras"]], seed=body["seed"], num_images=body.get("n", 1), **COMMON).images
        if body.get("n", 1) > 1:
            assert response.headers["content-type"] == "application/json"
            data = response.json()["images"]
            got = [(np.asarray(Image.open(io.BytesIO(base64.b64decode(d["png_base64"]))).convert("RGB")), d["parameters"])
                   for d in data]
        else:
            got = [png(response)]
        for (image, text), ref in zip(got, ref_images, strict=True):
            diff = np.abs(image.astype(int) - np.asarray(ref.image).astype(int)).max()
            assert diff <= BATCH_TOLERANCE, body
            assert text == ref.parameters


def test_overload_gets_429_and_the_accepted_requests_are_intact(pipe, ref_pipe, lora_dir):
    accepted = [request(loras=[("ink", 1.0)], seed=7), request(loras=[("glow", 1.0)], seed=8)]
    with serving(pipe, lora_dir, start=False, max_queue=2, max_batch=1) as (client, app):
        threads, responses = post_in_threads(client, accepted)
        wait_queued(app, 2)
        full = client.post("/v1/generate", headers=AUTH, json=request(seed=9))
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.json()["error"]
        app.state.scheduler.start()
        for t in threads:
            t.join()
        assert metric(client, "sdlora_requests_total", '{status="429"}') == 1
    for body, response in zip(accepted, responses):
        assert np.array_equal(png(response)[0], np.asarray(reference(ref_pipe, lora_dir, body).image))


# ---- bad input never reaches the model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def service(pipe, lora_dir):
    with serving(pipe, lora_dir) as (client, app):
        yield client, app


BAD = [
    (b'{"prompt": "a cat",', 400, "not valid JSON"),
    (b'["a cat"]', 400, "JSON object"),
    (request(loras=[("inc", 1.0)]), 404, "no LoRA named 'inc'.*Did you mean: ink"),
    (request("a cat <lora:glwo:1>"), 404, "no LoRA named 'glwo'.*glow"),
    (request(loras=[("xl_style", 1.0)]), 422, "xl_style.*Stable Diffusion XL"),
    (request(steps=0), 422, "steps 0"),
    (request(steps=10_000), 422, "steps 10000"),
    (request(width=100), 422, "width 100: must be a multiple of 8"),
    (request(width=4096), 422, "width 4096: this server takes at most"),
    (request(loras=[("ink", 50.0)]), 422, "weights must be between"),
    (request(n=100), 422, "n 100"),
    (request(guidance=-1), 422, "guidance -1"),
    (request(prompt="  "), 422, "prompt: empty"),
    (request("a cat <lora:ink:0.5"), 422, "unclosed LoRA tag"),
    (request(sampler="Euler a"), 422, "sampler: Extra inputs"),
    (request(seed="three"), 422, "seed"),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', 413, "larger than"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[f"{s}-{m[:20]}" for _, s, m in BAD])
def test_bad_input_gets_its_4xx_as_json_before_the_model(service, body, status, message):
    client, app = service
    images, batches = metric(client, "sdlora_images_total"), list(app.state.scheduler.batches)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post("/v1/generate", headers=AUTH, **kwargs)
    assert response.status_code == status
    assert re.search(message, response.json()["error"]), response.json()
    assert app.state.scheduler.batches == batches and metric(client, "sdlora_images_total") == images


def test_tokens(service):
    client, _ = service
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = client.post("/v1/generate", headers=headers, json=request())
        assert response.status_code == 401 and "token" in response.json()["error"]
        assert client.get("/v1/loras", headers=headers).status_code == 401
        assert client.get("/metrics", headers=headers).status_code == 401
    assert client.get("/healthz").json()["status"] == "ok"  # for load balancers, no token
    listed = client.get("/v1/loras", headers=AUTH).json()
    by_name = {x["name"]: x for x in listed["loras"]}
    assert listed["base_architecture"] == "sd1" and set(by_name) == {"ink", "glow", "film", "xl_style"}
    assert by_name["ink"]["compatible"] and re.fullmatch(r"[0-9a-f]{12}", by_name["ink"]["hash"])
    assert not by_name["xl_style"]["compatible"] and by_name["xl_style"]["architecture"] == "sdxl"


def test_a_non_loopback_host_needs_a_token_or_insecure():
    check_host("127.0.0.1", None, False)
    check_host("::1", None, False)
    check_host("localhost", None, False)
    check_host("0.0.0.0", "tok", False)
    check_host("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="--token"):
        check_host("0.0.0.0", None, False)
    with pytest.raises(ValueError, match="--token"):
        check_host("myhost.example", None, False)


# ---- cancel on disconnect, failures --------------------------------------------------------------------


def test_a_client_that_disconnects_has_its_queued_work_cancelled(pipe, lora_dir):
    with serving(pipe, lora_dir, start=False) as (client, app):
        body = json.dumps(request(loras=[("ink", 1.0)])).encode()
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            while not len(app.state.scheduler):  # the client goes away once its request is queued
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
                 "headers": [(b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 7862), "scheme": "http"}
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
        assert len(app.state.scheduler) == 0  # out of the queue
        app.state.scheduler.start()
        time.sleep(0.3)
        assert app.state.scheduler.batches == []  # never rendered
        assert metric(client, "sdlora_requests_total", '{status="499"}') == 1


def test_the_scheduler_cancels_a_queued_job_and_serves_an_overdue_one_first():
    def job(stack: str, arrived: float) -> Job:
        plan = SimpleNamespace(settings={"loras": [{"file": stack, "weight": 1.0, "te_weight": 1.0}], "steps": 2,
                                         "guidance": 7.0, "guidance_rescale": 0.0, "width": 64, "height": 64, "clip_skip": None})
        return Job(call={}, plan=plan, arrived=arrived)

    s = Scheduler(None, max_wait=5.0, max_batch=2, start=False)
    s._current = (("a", 1.0, 1.0),)
    now = 100.0
    old_b, a1, a2, a3 = job("b", now - 1), job("a", now - 0.5), job("a", now - 0.4), job("a", now - 0.3)
    for j in (old_b, a1, a2, a3):
        s.submit(j)
    assert s._next_batch(now) == [a1, a2]  # the fused stack first, batched up to max_batch
    assert s._next_batch(now + 4.5) == [old_b]  # b has waited 5.5 s: overdue, served before a3
    assert s.cancel(a3) and a3.future.cancelled() and len(s) == 0 and not s.cancel(a3)
    fifo = Scheduler(None, policy="fifo", max_batch=4, start=False)
    jobs = [job("a", now), job("b", now), job("a", now)]
    for j in jobs:
        fifo.submit(j)
    assert fifo._next_batch(now) == [jobs[0]]  # arrival order: only adjacent requests share a call


def test_a_failing_request_restores_the_base_and_fails_alone(pipe, ref_pipe, lora_dir, base_weights, tmp_path):
    import shutil

    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    good, bad = request(loras=[("ink", 1.0)], seed=11), request(loras=[("glow", 1.0)], seed=12)
    with serving(pipe, folder, start=False) as (client, app):
        threads, responses = post_in_threads(client, [good])
        wait_queued(app, 1)
        ts, bad_response = post_in_threads(client, [bad])
        wait_queued(app, 2)
        # checked and queued; then the file is damaged before the worker reads it ("found late")
        (folder / "glow.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
        app.state.scheduler.start()
        for t in threads + ts:
            t.join()
        assert bad_response[0].status_code == 500 and "glow" in bad_response[0].json()["error"]
        assert all(torch.equal(v, base_weights[k]) for k, v in weights(pipe).items())  # the base, bit for bit
        assert metric(client, "sdlora_requests_total", '{status="500"}') == 1
        assert client.get("/healthz").json()["status"] == "ok"  # the worker lives on
    assert np.array_equal(png(responses[0])[0], np.asarray(reference(ref_pipe, lora_dir, good).image))


# ---- Ray Serve (the optional `ray` extra) --------------------------------------------------------------


def test_ray_serve_routes_a_repeated_stack_to_the_replica_that_has_it(lora_dir, tmp_path):
    """Two replicas on a local Ray instance (CPU): each stack's requests after the first go to the
    replica that served it (Ray Serve multiplexing keyed by the stack), so each replica switches once
    per stack it owns."""
    pytest.importorskip("ray.serve", reason="Ray Serve is the optional `ray` extra (pip install 'sd-lora[ray]')")
    import socket

    import httpx
    import ray
    from ray import serve

    from sd_lora.serve.ray_serve import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(TINY_BASE), str(lora_dir), num_replicas=2, max_stacks_per_replica=1, max_batch=1),
                  name="sd-lora-test", route_prefix="/")
        stacks = [[("ink", 0.8)], [("glow", 0.5)]]
        replica_of, switches = {}, {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for round_ in range(3):
                for k, stack in enumerate(stacks):
                    r = client.post("/", json=request(loras=stack, seed=round_))
                    assert r.status_code == 200, r.text
                    replica_of.setdefault(k, set()).add(r.headers["X-Replica"])
                    switches[r.headers["X-Replica"]] = int(r.headers["X-Stack-Switches"])
            bad = client.post("/", json=request(loras=[("nosuch", 1.0)]))
            assert bad.status_code == 404 and "nosuch" in bad.json()["error"]
        assert all(len(v) == 1 for v in replica_of.values()), replica_of  # always the same replica per stack
        assert replica_of[0] != replica_of[1]  # a new stack goes to the replica that holds none
        assert sum(switches.values()) == 2  # each replica's metrics: its one stack switched in once
    finally:
        serve.shutdown()
        ray.shutdown()
