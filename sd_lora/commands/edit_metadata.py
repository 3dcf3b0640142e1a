"""`sd-lora edit-metadata FILE --title ... --trigger ... --description ... --cover IMAGE`: change what
a LoRA file says about itself (sd_lora.edit_metadata), in place, tensors byte for byte."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit-metadata",
        help="set a LoRA file's title, description, trigger words, output name or cover image",
        description=(
            "Rewrite the metadata of a .safetensors LoRA in place (atomically): modelspec.title, "
            "modelspec.description, ss_output_name, the trigger words (modelspec.trigger_phrase and "
            "ss_tag_frequency, read by A1111, Civitai and sd-lora) and a cover image (modelspec.thumbnail, "
            "a 256 px JPEG). The tensors are copied byte for byte, so sshs_model_hash and A1111's LoRA hash "
            "stay valid. An empty value (--title '') removes that key."
        ),
    )
    p.add_argument("path", metavar="FILE", help="the .safetensors LoRA file")
    p.add_argument("--title", help="modelspec.title (what model lists show)")
    p.add_argument("--description", help="modelspec.description (markdown welcome)")
    p.add_argument("--trigger", action="append", metavar="WORDS",
                   help="trigger word(s), comma-separated or repeated; they replace the ones set before and come "
                        "first in the file's trigger words ('' removes them)")
    p.add_argument("--output-name", help="ss_output_name (the name kohya-style tools show)")
    p.add_argument("--cover", metavar="IMAGE", help="a cover image (PNG/JPEG/WebP), stored resized ('' removes it)")
    p.add_argument("--out", metavar="FILE", help="write the edited file here instead of replacing FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.edit import edit_metadata
    from ..formats.metadata import trigger_words

    triggers = None if args.trigger is None else [w for text in args.trigger for w in text.split(",")]
    if all(v is None for v in (args.title, args.description, triggers, args.output_name, args.cover)):
        raise ValueError("edit-metadata: nothing to change; pass --title, --description, --trigger, --output-name or --cover")
    md = edit_metadata(args.path, title=args.title, description=args.description, trigger_words=triggers,
                       cover=args.cover, output_name=args.output_name, out=args.out)
    print(f"wrote {args.out or args.path}")
    for label, key in (("title", "modelspec.title"), ("output name", "ss_output_name"), ("description", "modelspec.description")):
        if key in md:
            print(f"  {label}: {md[key]}")
    print(f"  trigger words: {', '.join(trigger_words(md)) or '(none)'}")
    print(f"  cover: {'yes' if md.get('modelspec.thumbnail') else 'none'}")
    return 0
