"""One module per `sd-lora` subcommand; each defines `register(subparsers)`."""
