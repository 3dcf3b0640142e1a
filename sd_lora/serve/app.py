"""The HTTP service: FastAPI routes around one pipeline, one LoRA folder and one Scheduler.

    POST /v1/generate   JSON request (sd_lora.serve.request) -> image/png, or JSON with every image
    GET  /v1/loras      the folder's LoRAs: name, architecture, compatible, trigger words, hash
    GET  /healthz       {"status": "ok", ...} (503 when the worker thread has died); no token needed
    GET  /metrics       Prometheus text (sd_lora.serve.metrics)

`build_app` makes the app (tests drive it with fastapi.testclient, no socket); `run_server` serves it
with uvicorn, on the loopback interface unless told otherwise with a token (or --insecure).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' `request: Request` annotations,
# and Request is imported inside build_app (importing this module imports no FastAPI).

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import logging
import os

from .errors import RequestError
from .request import Limits, check_request
from .scheduler import QueueFull, Scheduler, ShuttingDown

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
STATUS_CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never sent


def png_bytes(image, parameters: str) -> bytes:
    """The PNG of `image` with `parameters` in the text chunk A1111 reads (as stack/grid.save_png writes files)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def build_app(model, lora_dir: str | os.PathLike, *, token: str | None = None, max_queue: int = 32, max_batch: int = 4,
              max_wait: float = 5.0, policy: str = "grouped", limits: Limits | None = None, device: str | None = None,
              dtype=None, scheduler: Scheduler | None = None):
    """The FastAPI app serving `model` (a model path, loaded with sd_lora.generation.load_pipeline, or a
    loaded pipeline) with the LoRAs of `lora_dir`. `token`: the Bearer token every route but /healthz
    requires. `max_queue` requests may wait (more get 429); `max_batch` images share a pipeline call;
    `max_wait` seconds bounds how long grouping may put a request behind others (sd_lora.serve.scheduler).
    `scheduler`: one made by the caller (tests start it later); it must hold the same pipeline."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from ..generation import load_pipeline
    from .catalog import LoraCatalog
    from .metrics import ServeMetrics

    if scheduler is not None:
        pipe = scheduler.pipe
    elif isinstance(model, (str, os.PathLike)):
        pipe = load_pipeline(model, dtype=dtype, device=device)
    else:
        pipe = model
    limits = limits or Limits()
    catalog = LoraCatalog(lora_dir, pipe)
    if scheduler is None:
        scheduler = Scheduler(pipe, max_queue=max_queue, max_batch=max_batch, max_wait=max_wait, policy=policy)
    metrics = ServeMetrics(queue_depth=lambda: len(scheduler))
    scheduler.metrics = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()  # the queued requests get 503; the running batch finishes

    app = FastAPI(title="sd-lora serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.catalog, app.state.metrics, app.state.pipe = scheduler, catalog, metrics, pipe

    def error(status: int, message: str, headers: dict | None = None, count: bool = True) -> JSONResponse:
        if count:
            metrics.request(status)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    unauthorized = {"WWW-Authenticate": "Bearer"}

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) past limits.max_body_bytes without reading the rest."""
        declared = request.headers.get("content-length")
        too_big = f"the body is larger than this server's {limits.max_body_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/generate")
    async def generate(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'", unauthorized)
        try:
            raw = await read_body(request)
            job = await run_in_threadpool(check_request, raw, catalog, pipe, limits)
            future = scheduler.submit(job)
        except RequestError as e:
            return error(e.status, e.message, e.headers)
        except QueueFull as e:
            return error(429, f"{e}: the server is busy", {"Retry-After": str(e.retry_after)})
        except ShuttingDown as e:
            return error(503, str(e))
        waiting = asyncio.wrap_future(future)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                if scheduler.cancel(job):
                    metrics.request(STATUS_CLIENT_GONE)
                    return Response(status_code=STATUS_CLIENT_GONE)  # nobody reads it
        if future.cancelled():
            return error(503, "the request was cancelled")
        waiting.exception()  # retrieved: asyncio would log a never-retrieved one with its traceback when collected
        if future.exception() is not None:
            e = future.exception()
            status = 503 if isinstance(e, ShuttingDown) else 500
            return error(status, f"generation failed: {e}")
        result = future.result()
        metrics.request(200)
        seeds = ",".join(str(im.settings["seed"]) for im in result.images)
        if len(result.images) == 1 and "application/json" not in request.headers.get("accept", ""):
            im = result.images[0]
            return Response(png_bytes(im.image, im.parameters), media_type="image/png",
                            headers={"X-Seed": seeds, "X-Trigger-Words": ", ".join(result.trigger_words)})
        return {"images": [{"png_base64": base64.b64encode(png_bytes(im.image, im.parameters)).decode("ascii"),
                            "seed": im.settings["seed"], "parameters": im.parameters} for im in result.images],
                "trigger_words": result.trigger_words}

    @app.get("/v1/loras")
    async def loras(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'", unauthorized, count=False)
        entries = await run_in_threadpool(catalog.entries)
        return {"base_architecture": catalog.architecture, "loras": [e.info() for e in entries]}

    @app.get("/healthz")
    async def healthz():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "worker stopped", "model": pipe.name_or_path,
                "architecture": catalog.architecture, "queue": len(scheduler)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        if not authorized(request):
            return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'", unauthorized, count=False)
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_host(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token (anyone who can reach the port could use
    the GPU and read the LoRA list), unless `insecure` says the network is trusted."""
    if not is_loopback(host) and not token and not insecure:
        raise ValueError(f"--host {host}: not a loopback address; anyone who can reach it could use the server. "
                         "Pass --token SECRET (clients send 'Authorization: Bearer SECRET'), or --insecure on a "
                         "network you trust, or keep the default --host 127.0.0.1")


def run_server(model, lora_dir, *, host: str = "127.0.0.1", port: int = 7862, token: str | None = None,
               insecure: bool = False, log_level: str = "info", **options) -> None:
    """Serve `build_app(model, lora_dir, token=token, **options)` with uvicorn until interrupted."""
    import uvicorn

    check_host(host, token, insecure)
    app = build_app(model, lora_dir, token=token, **options)
    logger.info("sd-lora serve: http://%s:%d (model %s, LoRAs in %s)", host, port, model, lora_dir)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
