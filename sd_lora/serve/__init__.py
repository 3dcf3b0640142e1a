"""`sd-lora serve`: an HTTP service that keeps one base model loaded and fuses each request's LoRA
stack into it, with a scheduler that groups requests by stack so it switches rarely. See docs/serve.md.

    from sd_lora.serve import build_app, run_server
    app = build_app("models/sd15", "loras/")          # a FastAPI app (fastapi.testclient drives it)
    run_server("models/sd15", "loras/", port=7862)    # the same, served by uvicorn

Modules, one job each: request.py (what a client may send and its checks), catalog.py (the LoRA
folder), scheduler.py (the queue, the grouping policy and its bound, the worker thread),
metrics.py (Prometheus), app.py (the routes, build_app, run_server).

Names are imported on first use (PEP 562): `sd-lora --help` does not import FastAPI or torch.
"""

_EXPORTS = {
    "build_app": ".app", "run_server": ".app", "check_host": ".app",
    "Limits": ".request", "GenerateRequest": ".request", "check_request": ".request",
    "Scheduler": ".scheduler", "Job": ".scheduler", "QueueFull": ".scheduler", "POLICIES": ".scheduler",
    "LoraCatalog": ".catalog", "ServeMetrics": ".metrics", "RequestError": ".errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
