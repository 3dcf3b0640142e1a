"""The service on several machines: Ray Serve replicas (one pipeline each), with Ray Serve's model
multiplexing keyed by the LoRA stack, so a request goes to a replica that already has its stack fused.

    pip install "sd-lora[ray]"
    python -c "from sd_lora.serve.ray_serve import run; run('models/sd15', 'loras/', num_replicas=2)"
    # or in a Ray cluster's driver: serve.run(sd_lora.serve.ray_serve.deployment(...)); see docs/serve.md

Layout: an `Ingress` deployment (light, no model) reads the request's stack from its JSON (names and
weights, as given: `stack_id`) and forwards the body with `multiplexed_model_id=stack_id` to the
`Replica` deployment. Each replica is the single-machine service's core (check_request, a Scheduler
with its worker thread, metrics) around its own pipeline; its `stack` method is the multiplexed
"model loader": it loads nothing (the scheduler fuses a stack when its turn comes, in about the time
of a copy + GEMM), but it tells Ray which stacks the replica holds, which is what Ray routes on
(`@serve.multiplexed`, `serve.get_multiplexed_model_id`: docs.ray.io/en/latest/serve/model-multiplexing.html).
`max_stacks_per_replica` is how many recent stacks Ray counts as loaded on a replica (LRU).

Responses carry `X-Replica` (which replica served it) and each replica's /metrics-style counters are
returned by `Replica.stats` (switches, requests, images), which is how the tests see the routing.
"""

from __future__ import annotations

import base64
import os

from .errors import RequestError


def stack_id(raw: bytes) -> str:
    """The routing key of a request body: its LoRAs (JSON list, then prompt tags) with their weights,
    in order, e.g. "ink:0.8:0.8|film:0.5:0.5"; "" for the base or a body that does not parse (the
    replica then answers with the error)."""
    from ..stack import parse_lora_prompt
    from .request import parse_body

    try:
        req = parse_body(raw)
        tags = parse_lora_prompt(req.prompt)[1]
    except (RequestError, ValueError):
        return ""
    items = [(x.name, x.weight, x.weight if x.te_weight is None else x.te_weight) for x in req.loras]
    items += [(t.name, t.weight, t.te_weight) for t in tags]
    return "|".join(f"{n}:{w:g}:{te:g}" for n, w, te in items)


def deployment(model: str | os.PathLike, lora_dir: str | os.PathLike, *, num_replicas: int = 2,
               max_stacks_per_replica: int = 4, token: str | None = None, ray_actor_options: dict | None = None,
               **scheduler_options):
    """The Ray Serve application (bind()-ed Ingress over Replicas) serving POST / with the JSON of
    POST /v1/generate. `scheduler_options`: max_queue, max_batch, max_wait, policy (as build_app)."""
    import asyncio
    import hmac

    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1})
    class Replica:
        def __init__(self):
            from ..generation import load_pipeline
            from .catalog import LoraCatalog
            from .metrics import ServeMetrics
            from .request import Limits
            from .scheduler import Scheduler

            self.pipe = load_pipeline(model)
            self.catalog = LoraCatalog(lora_dir, self.pipe)
            self.limits = Limits()
            self.scheduler = Scheduler(self.pipe, **scheduler_options)
            self.metrics = ServeMetrics(queue_depth=lambda: len(self.scheduler))
            self.scheduler.metrics = self.metrics
            context = serve.get_replica_context()
            self.name = str(getattr(context, "replica_id", None) or context.replica_tag)
            self.served: dict[str, int] = {}

        @serve.multiplexed(max_num_models_per_replica=max_stacks_per_replica)
        async def stack(self, stack: str) -> str:
            return stack  # nothing to load: the scheduler fuses it when its turn comes

        async def generate(self, raw: bytes) -> tuple[int, dict, bytes]:
            from .app import png_bytes
            from .request import check_request
            from .scheduler import QueueFull

            sid = serve.get_multiplexed_model_id()
            await self.stack(sid)
            self.served[sid] = self.served.get(sid, 0) + 1
            headers = {"X-Replica": self.name}
            try:
                job = await asyncio.to_thread(check_request, raw, self.catalog, self.pipe, self.limits)
                future = self.scheduler.submit(job)
            except RequestError as e:
                self.metrics.request(e.status)
                return e.status, headers, _error(e.message)
            except QueueFull as e:
                self.metrics.request(429)
                return 429, {**headers, "Retry-After": str(e.retry_after)}, _error(str(e))
            try:
                result = await asyncio.wrap_future(future)
            except Exception as e:  # noqa: BLE001 - the worker restored the base; this request alone fails
                self.metrics.request(500)
                return 500, headers, _error(f"generation failed: {e}")
            self.metrics.request(200)
            headers["X-Stack-Switches"] = str(self.scheduler.switches)  # this replica's, for routing checks
            images = [{"png_base64": base64.b64encode(png_bytes(im.image, im.parameters)).decode("ascii"),
                       "seed": im.settings["seed"], "parameters": im.parameters} for im in result.images]
            import json

            return 200, headers, json.dumps({"images": images, "trigger_words": result.trigger_words}).encode()

        def stats(self) -> dict:
            return {"replica": self.name, "switches": self.scheduler.switches, "served": dict(self.served),
                    "metrics": self.metrics.text().decode()}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Ingress:
        def __init__(self, replicas):
            self.replicas = replicas

        async def __call__(self, request: Request):
            if token is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                             f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401)
            raw = await request.body()
            status, headers, body = await self.replicas.options(multiplexed_model_id=stack_id(raw)).generate.remote(raw)
            return Response(body, status_code=status, headers=headers, media_type="application/json")

    return Ingress.bind(Replica.bind())


def _error(message: str) -> bytes:
    import json

    return json.dumps({"error": message}).encode()


def run(model, lora_dir, *, host: str = "127.0.0.1", port: int = 8000, name: str = "sd-lora", **options):
    """Start (or join) a local Ray instance, deploy, and serve http://host:port/ until interrupted."""
    import time

    from ray import serve

    from .app import check_host

    check_host(host, options.get("token"), options.pop("insecure", False))
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(model, lora_dir, **options), name=name, route_prefix="/")
    while True:
        time.sleep(3600)
