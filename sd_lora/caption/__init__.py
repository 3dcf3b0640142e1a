"""Captioning: a small captioner interface, built-in captioners, and caption file editing.

    from sd_lora.caption import caption_folder, get_captioner, available_captioners
    caption_folder("data/", "wd14", model="models/wd14", mode="fill", trigger="sks")

Modules: base.py (interface + registry), template.py (caption templates), simple.py (filename / folder / template),
transformers_captioner.py (BLIP, GIT, Florence-2, ...), wd14.py (booru tagger, ONNX),
edit.py (side files, dataset listing, bulk edits), run.py (caption_folder).
"""

from .base import Captioner, CaptionerError, Option, Source, available_captioners, get_captioner, register_captioner
from .edit import (
    DatasetImage,
    add_prefix_suffix,
    add_trigger,
    dedupe_captions,
    fill_missing,
    find_replace,
    list_dataset,
    read_caption,
    remove_tags_from,
    write_caption,
)
from .run import MODES, CaptionReport, caption_folder

__all__ = [
    "Captioner", "CaptionerError", "Option", "Source", "available_captioners", "get_captioner", "register_captioner",
    "DatasetImage", "add_prefix_suffix", "add_trigger", "dedupe_captions", "fill_missing", "find_replace",
    "list_dataset", "read_caption", "remove_tags_from", "write_caption", "MODES", "CaptionReport", "caption_folder",
]
