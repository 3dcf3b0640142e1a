"""`sd-lora caption DIR --captioner NAME ...`: write caption side files for a dataset folder."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption a dataset folder (file/folder names, templates, BLIP-style models, WD14 taggers)",
        description="Write a caption file next to every image of DIR. Run with --list to see the captioners "
        "and their options. Models are read from local folders only.",
    )
    p.add_argument("dir", nargs="?", help="dataset folder (kohya layout <dir>/<N>_<name>/ or a plain folder of images)")
    p.add_argument("--list", action="store_true", help="list the captioners and their options, then exit")
    p.add_argument("--captioner", "-c", default="template", help="filename, folder, template, transformers or wd14 (default: template)")
    p.add_argument("--model", help="model folder for the transformers / wd14 captioners")
    p.add_argument("--mode", default="fill", choices=["fill", "replace", "append"],
                   help="fill: only images without a caption (default); replace: overwrite; append: add new tags after the old")
    p.add_argument("--trigger", default="", help="trigger word, put first in every caption")
    p.add_argument("--prefix", default="", help="text added at the start of every caption (joined with ', ')")
    p.add_argument("--suffix", default="", help="text added at the end of every caption (joined with ', ')")
    p.add_argument("--ext", default=".txt", help="caption file extension the trainer reads (default: .txt)")
    p.add_argument("--batch-size", type=int, help="images per model call (default: the captioner's)")
    p.add_argument("--blacklist", default="", help="comma-separated tags never written (wildcards * and ? allowed)")
    p.add_argument("--no-dedupe", action="store_true", help="keep repeated tags")
    p.add_argument("--restart", action="store_true", help="ignore the journal of an interrupted replace/append run")
    p.add_argument("--dry-run", action="store_true", help="print the captions instead of writing them")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    # The options of the built-in captioners, spelled out for --help; anything else goes through --option.
    p.add_argument("--template", help="template captioner: text with {trigger}, {folder}, {filename}, {stem}")
    p.add_argument("--prompt", help="transformers captioner: text the caption starts from")
    p.add_argument("--max-new-tokens", type=int, help="transformers captioner: longest caption in tokens")
    p.add_argument("--num-beams", type=int, help="transformers captioner: beam width (1 = greedy)")
    p.add_argument("--device", help="transformers captioner: cuda, cpu or auto")
    p.add_argument("--threshold", type=float, help="wd14 tagger: general tag threshold (default 0.35)")
    p.add_argument("--character-threshold", type=float, help="wd14 tagger: character tag threshold (default 0.85)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="any other captioner option (repeatable), e.g. -o rating=true")
    p.set_defaults(func=run)


def _value(text: str):
    """Command-line option values: true/false, numbers, or text."""
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def run(args) -> int:
    from ..caption import available_captioners, caption_folder

    if args.list:
        for name, cls in available_captioners().items():
            print(f"{name}: {cls.description}")
            for key, opt in cls.options.items():
                print(f"    {key} (default {opt.default!r}): {opt.help}")
        return 0
    if not args.dir:
        raise ValueError("give the dataset folder to caption: sd-lora caption DIR --captioner NAME (or --list).")
    options = {k: getattr(args, k) for k in ("template", "prompt", "max_new_tokens", "num_beams", "device", "threshold",
                                              "character_threshold") if getattr(args, k) is not None}
    for item in args.option:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}.")
        options[key.strip().replace("-", "_")] = _value(val.strip())
    report = caption_folder(
        args.dir, args.captioner, model=args.model, mode=args.mode, trigger=args.trigger, prefix=args.prefix,
        suffix=args.suffix, ext=args.ext, batch_size=args.batch_size, blacklist=args.blacklist,
        dedupe=not args.no_dedupe, resume=not args.restart, dry_run=args.dry_run, progress=not args.json, **options,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if args.dry_run:
        for path, text in report.captions.items():
            print(f"{path}: {text}")
    print("\n".join(report.lines()))
    return 0
