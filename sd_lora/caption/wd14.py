"""Booru-style tagger: a WD14 ONNX model (SmilingWolf's wd-*-tagger) + its selected_tags.csv.

The model folder holds `model.onnx` and `selected_tags.csv` (columns tag_id,name,category,count;
category 0 = general, 4 = character, 9 = rating), as downloaded from e.g.
SmilingWolf/wd-swinv2-tagger-v3. The network takes a batch of square BGR images, 0..255 float, NHWC
(padded to square with white, then resized to its input size, 448 for the released models) and gives
one probability per CSV row. Tags above the general / character thresholds become the caption,
characters first, then the rest by confidence (so the strongest tags survive a 75-token truncation).

Needs onnxruntime (`pip install 'sd-lora[tagger]'`, or onnxruntime-gpu on a CUDA machine); it is
imported only when a tagger is built.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .base import Captioner, CaptionerError, Option, Source, register_captioner

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9
DEFAULT_SIZE = 448

# Emoticon tags whose underscores are part of the face, not word separators (from the WD14 tagger demo).
KAOMOJI = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
}

_MISSING_HELP = (
    "A WD14 tagger folder needs two files: {model} (the network) and {tags} (its tag list). Download "
    "both from a tagger repository such as SmilingWolf/wd-swinv2-tagger-v3 on a machine with internet "
    "(e.g. `huggingface-cli download SmilingWolf/wd-swinv2-tagger-v3 model.onnx selected_tags.csv "
    "--local-dir models/wd14`), copy the folder here and pass it with --model models/wd14."
)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise CaptionerError(
            "the wd14 tagger needs onnxruntime, which is not installed. Install it with "
            "`pip install 'sd-lora[tagger]'` (or `pip install onnxruntime-gpu` for CUDA)."
        ) from e
    return onnxruntime


def read_tags_csv(path: Path) -> list[tuple[str, int]]:
    """(name, category) per output index, from a WD14 selected_tags.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise CaptionerError(f"cannot read {path}: {e}") from e
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise CaptionerError(f"{path}: not a WD14 tag list (its first line must be 'tag_id,name,category,count').")
    tags = []
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            tags.append((row[1], int(row[2])))
        except (IndexError, ValueError) as e:
            raise CaptionerError(f"{path}, line {i}: expected tag_id,name,category,count (got {row!r}).") from e
    return tags


def clean_tag(tag: str, replace_underscores: bool) -> str:
    if replace_underscores and tag not in KAOMOJI:
        return tag.replace("_", " ")
    return tag


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> (size, size, 3) float32 BGR 0..255, padded to square with white (the WD14 input)."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()


@register_captioner
class WD14Tagger(Captioner):
    name = "wd14"
    description = "booru-style tags from a local WD14 ONNX tagger (model.onnx + selected_tags.csv); needs onnxruntime"
    options = {
        "model": Option(None, "folder with model.onnx + selected_tags.csv (or the path of the .onnx file)"),
        "threshold": Option(0.35, "minimum probability for a general tag"),
        "character_threshold": Option(0.85, "minimum probability for a character tag"),
        "rating": Option(False, "add the most likely rating tag (general / sensitive / questionable / explicit)"),
        "replace_underscores": Option(True, "write 'long hair' instead of 'long_hair'"),
        "threads": Option(None, "CPU threads for onnxruntime (default: its own choice)"),
    }
    default_batch_size = 4

    def __init__(self, **options):
        super().__init__(**options)
        if not self.config["model"]:
            raise CaptionerError("the wd14 tagger needs --model FOLDER. " + _MISSING_HELP.format(model=MODEL_FILE, tags=TAGS_FILE))
        for key in ("threshold", "character_threshold"):
            v = float(self.config[key])
            if not 0.0 <= v <= 1.0:
                raise CaptionerError(f"{key} must be between 0 and 1 (got {v}).")
            self.config[key] = v
        path = Path(self.config["model"])
        model_path = path if path.suffix.lower() == ".onnx" else path / MODEL_FILE
        tags_path = model_path.parent / TAGS_FILE
        missing = [str(p) for p in (model_path, tags_path) if not p.is_file()]
        if missing:
            raise CaptionerError(f"missing {', '.join(missing)}. " + _MISSING_HELP.format(model=MODEL_FILE, tags=TAGS_FILE))
        self.tags = read_tags_csv(tags_path)

        ort = _import_onnxruntime()
        so = ort.SessionOptions()
        if self.config["threads"]:
            so.intra_op_num_threads = int(self.config["threads"])
            so.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise CaptionerError(f"{model_path}: onnxruntime cannot load this model ({e}).") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3:
            raise CaptionerError(f"{model_path}: expected an NHWC image input (batch, height, width, 3), found {shape}.")
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        # Some exports fix the batch at 1: then images go through one at a time.
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_dim = self.session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int) and out_dim != len(self.tags):
            raise CaptionerError(
                f"{model_path} predicts {out_dim} tags but {tags_path} lists {len(self.tags)}: "
                "use the selected_tags.csv that came with this model."
            )

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), num_tags) tag probabilities."""
        x = np.stack([prepare(im, self.size) for im in images])
        step = self.fixed_batch or len(x)
        out = np.concatenate([self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)])
        out = out.astype(np.float32)
        if out.min() < 0.0 or out.max() > 1.0:  # an export without the final sigmoid gives logits
            out = 1.0 / (1.0 + np.exp(-out))
        return out

    def tags_for(self, probs: np.ndarray) -> list[str]:
        general, character, rating = [], [], []
        for (name, cat), p in zip(self.tags, probs):
            if cat == CATEGORY_CHARACTER and p >= self.config["character_threshold"]:
                character.append((p, name))
            elif cat == CATEGORY_RATING:
                rating.append((p, name))
            elif cat not in (CATEGORY_CHARACTER, CATEGORY_RATING) and p >= self.config["threshold"]:
                general.append((p, name))
        # Highest probability first; ties keep CSV order (sorted is stable).
        chosen = [n for _, n in sorted(character, key=lambda t: -t[0])] + [n for _, n in sorted(general, key=lambda t: -t[0])]
        if self.config["rating"] and rating:
            chosen.append(max(rating, key=lambda t: t[0])[1])
        return [clean_tag(t, bool(self.config["replace_underscores"])) for t in chosen]

    def caption(self, sources: list[Source]) -> list[str]:
        if not sources:
            return []
        probs = self.probabilities([s.image for s in sources])
        # Tags may themselves contain commas in rare cases; they are written as they are.
        return [", ".join(self.tags_for(p)) for p in probs]
