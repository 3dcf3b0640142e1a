"""Captioners that need no model: from the file name, the folder name, or a template.

They never decode an image, so they caption thousands of files in a second. Typical use: a
DreamBooth-style dataset where every image is "sks dog" (`template` with "{trigger}, {folder}"), or
files already named after what they show ("red_circle_03.png" -> "red circle").
"""

from __future__ import annotations

from .base import Captioner, Option, Source, register_captioner
from .template import TEMPLATE_FIELDS, filename_words, format_template


@register_captioner
class FilenameCaptioner(Captioner):
    name = "filename"
    description = "the image's file name as words ('red_circle_03.png' -> 'red circle')"
    options = {"strip_numbers": Option(True, "drop a trailing counter such as _03 or (2)")}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "no words in the file name"  # 000.png, "(2).jpg": only a counter
    empty_advice = ("name the files after what they show (red_circle_03.png), or use the 'template' or 'folder' "
                    "captioner (e.g. '{trigger}, {folder}') or a model captioner (wd14, transformers)")

    def caption(self, sources: list[Source]) -> list[str]:
        return [filename_words(s.path, bool(self.config["strip_numbers"])) if s.path else "" for s in sources]


@register_captioner
class FolderCaptioner(Captioner):
    name = "folder"
    description = "the dataset folder's name without kohya's repeats ('10_sks dog' -> 'sks dog')"
    options = {}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "no words in the folder name"
    empty_advice = "put the images in a folder named after what they show (10_sks dog), or use the 'template' captioner"

    def caption(self, sources: list[Source]) -> list[str]:
        return [s.folder for s in sources]


@register_captioner
class TemplateCaptioner(Captioner):
    name = "template"
    description = "a fixed text with placeholders {trigger}, {folder}, {filename}, {stem}"
    options = {"template": Option("{trigger}, {folder}", "the caption text; placeholders: " + ", ".join("{%s}" % f for f in TEMPLATE_FIELDS))}
    needs_images = False
    default_batch_size = 64  # no model call: a batch only sets how often progress is recorded
    empty_reason = "the template gave no text"
    empty_advice = "use a template with fixed words, or pass a trigger word for {trigger}"

    def __init__(self, **options):
        super().__init__(**options)
        format_template(self.config["template"], None)  # a bad template fails here, before any file is touched

    def caption(self, sources: list[Source]) -> list[str]:
        return [format_template(self.config["template"], s.path, s.folder, s.trigger) for s in sources]
