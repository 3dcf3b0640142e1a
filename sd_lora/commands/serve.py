"""`sd-lora serve`: the HTTP service (sd_lora.serve): one base model kept loaded, each request's LoRA
stack fused into it, requests grouped by stack. Thin: parses flags and calls sd_lora.serve.run_server."""

from __future__ import annotations


def register(subparsers) -> None:
    # Torch- and FastAPI-free: `sd-lora --help` imports this module.
    p = subparsers.add_parser(
        "serve",
        help="HTTP service: generate with per-request LoRA stacks on one loaded base (docs/serve.md)",
        description=(
            "Serve POST /v1/generate (JSON: prompt, loras [{name, weight}], seed, steps, width, height, guidance, n; "
            "<lora:NAME:W> tags work too) -> image/png with the same PNG text as `sd-lora generate`; GET /v1/loras, "
            "/healthz, /metrics (Prometheus). Requests with the same stack run back to back and are batched; grouping "
            "adds at most --max-wait seconds (plus one batch) to any request's wait over arrival order. Listens on "
            "loopback unless told otherwise; another host needs --token (or --insecure)."
        ),
    )
    p.add_argument("--model", required=True, help="base model: diffusers folder or single .safetensors file")
    p.add_argument("--lora-dir", required=True, help="folder of LoRA files; requests name them by file name (no extension)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7862, help="(default: %(default)s)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every route but /healthz (default: the SD_LORA_TOKEN "
                        "environment variable, else none)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token (a trusted network)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests that may wait; more get 429 with Retry-After (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="images of requests with the same stack, size, steps and guidance rendered in one pipeline call; "
                        "1: every image alone, bit for bit what `sd-lora generate` makes (default: %(default)s)")
    p.add_argument("--max-wait", type=float, default=5.0, metavar="S",
                   help="seconds after which the oldest request is served next whatever stack is fused (the bound on "
                        "grouping's extra wait; default: %(default)s)")
    p.add_argument("--policy", choices=("grouped", "fifo"), default="grouped",
                   help="grouped: same stack back to back (default); fifo: arrival order")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..logs import quiet_libraries
    from ..serve import check_host, run_server

    token = args.token or os.environ.get("SD_LORA_TOKEN") or None
    check_host(args.host, token, args.insecure)  # before the model is loaded
    quiet_libraries(getattr(args, "verbose", False))  # no loading bars: uvicorn's and our lines say it
    run_server(args.model, args.lora_dir, host=args.host, port=args.port, token=token, insecure=args.insecure,
               max_queue=args.max_queue, max_batch=args.max_batch, max_wait=args.max_wait, policy=args.policy,
               dtype=args.dtype, device=args.device)
    return 0
