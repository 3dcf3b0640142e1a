"""`sd-lora ui`: start the web UI (Gradio) on this machine, offline."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui",
        help="start the web UI (dataset captioning, training jobs, generation, LoRA library)",
        description=(
            "Start the web UI. It listens on 127.0.0.1 (this machine only) unless --host says otherwise, "
            "and reads and writes files only inside --workspace. Training jobs run in their own processes "
            "and keep running when the page is closed or reloaded."
        ),
    )
    p.add_argument("--workspace", default="sd-lora-workspace",
                   help="folder for datasets/, models/, loras/, jobs/, outputs/ (created if missing; default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login for every page, file and API call")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default; needs internet)")
    p.add_argument("--max-file-size", default="50mb", help="largest upload accepted, e.g. 20mb (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from webui.security import parse_auth

    auth = parse_auth(args.auth)
    if args.share and not auth:
        raise ValueError("--share publishes the UI on the internet: add --auth USER:PASSWORD as well")
    from webui.app import launch  # imports Gradio: after the argument checks, which are instant
    launch(args.workspace, host=args.host, port=args.port, auth=auth, share=args.share, max_file_size=args.max_file_size)
    return 0
