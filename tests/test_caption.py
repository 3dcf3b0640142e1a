"""Captioning: every captioner end to end on a small folder, the modes, the file writing, the errors.

Models are tiny and built here from configs with random weights (BLIP and GIT saved with save_pretrained,
a hand-built WD14-style ONNX graph), so captions from the BLIP are gibberish but deterministic; the
ONNX tagger is wired so that its exact tags are known.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sd_lora
from sd_lora.caption import (
    Captioner,
    CaptionerError,
    Option,
    add_prefix_suffix,
    add_trigger,
    available_captioners,
    caption_folder,
    dedupe_captions,
    fill_missing,
    find_replace,
    get_captioner,
    list_dataset,
    read_caption,
    register_captioner,
    remove_tags_from,
    write_caption,
)
from sd_lora.caption import base as caption_base
from sd_lora.caption.edit import compose_caption
from sd_lora.caption.run import JOURNAL_NAME
from sd_lora.cli import main as cli_main

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _img(path: Path, color, size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def dataset(tmp_path):
    """kohya layout: two repeats folders, one existing caption, a hidden file and a JPEG."""
    root = tmp_path / "data"
    _img(root / "10_sks dog" / "red_circle_01.png", RED)
    _img(root / "10_sks dog" / "blue_square (2).png", BLUE)
    _img(root / "3_green_thing" / "green.png", GREEN)
    (root / "3_green_thing" / "green.txt").write_text("already captioned\n", encoding="utf-8")
    _img(root / "3_green_thing" / ".hidden.png", RED)
    _img(root / "3_green_thing" / "sub" / "photo.jpg", GREEN)
    return root


def _hashes(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in root.rglob("*") if p.suffix in (".png", ".jpg")
    }


def _captions(root: Path, ext=".txt") -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob(f"*{ext}"))}


# ---------------------------------------------------------------------------------------------
# Simple captioners, modes, file writing


def test_template_exact_outputs_and_images_untouched(dataset):
    before = _hashes(dataset)
    report = caption_folder(dataset, "template", template="{trigger}, {folder}", trigger="sks", mode="replace", progress=False)
    assert report.images == 4 and report.written == 4 and not report.failed
    assert _captions(dataset) == {
        "10_sks dog/blue_square (2).txt": "sks, sks dog\n",
        "10_sks dog/red_circle_01.txt": "sks, sks dog\n",
        "3_green_thing/green.txt": "sks, green thing\n",
        "3_green_thing/sub/photo.txt": "sks, green thing\n",
    }
    assert _hashes(dataset) == before  # images never touched
    assert not (dataset / JOURNAL_NAME).exists()  # finished run: no journal left
    assert not list(dataset.rglob("*.tmp"))  # atomic writes leave no temporaries

    # Empty fields leave no stray separators; {filename} is the stem as words without the counter.
    caption_folder(dataset, "template", template="{trigger}, photo of {filename}", mode="replace", progress=False)
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "photo of red circle"
    assert read_caption(dataset / "10_sks dog" / "blue_square (2).png") == "photo of blue square"


def test_filename_and_folder_captioners(dataset):
    caption_folder(dataset, "filename", mode="replace", progress=False)
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "red circle"
    caption_folder(dataset, "filename", mode="replace", strip_numbers=False, progress=False)
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "red circle 01"
    caption_folder(dataset, "folder", mode="replace", ext=".caption", progress=False)
    assert read_caption(dataset / "10_sks dog" / "blue_square (2).png", ".caption") == "sks dog"
    assert read_caption(dataset / "3_green_thing" / "sub" / "photo.jpg", ".caption") == "green thing"


def test_filename_captioner_on_numbered_files_says_why_and_what_to_do(tmp_path, capsys):
    """`000.png` has no words: each such image counts as skipped with the reason, the report names
    them and says what to use instead (not a silent "wrote 0 captions")."""
    root = tmp_path / "data"
    for name in ("000.png", "001.png", "002.png", "blue_square_03.png", "red_circle_04.png"):
        _img(root / "5_sks" / name, RED)
    report = caption_folder(root, "filename", progress=False)
    assert report.written == 2 and report.empty == 3
    assert report.empty_examples == ["5_sks/000.png", "5_sks/001.png", "5_sks/002.png"]
    lines = "\n".join(report.lines())
    assert "3 skipped: no words in the file name, no file written (5_sks/000.png, 5_sks/001.png, 5_sks/002.png)" in lines
    assert "'template' or 'folder' captioner" in lines
    assert not (root / "5_sks" / "000.txt").exists() and read_caption(root / "5_sks" / "blue_square_03.png") == "blue square"
    assert report.to_dict()["empty_reason"] == "no words in the file name"
    # The CLI prints the same report.
    for p in (root / "5_sks").glob("*.txt"):
        p.unlink()
    _img(root / "5_sks" / "003.png", RED)
    assert cli_main(["caption", str(root), "--captioner", "filename"]) == 0
    out = capsys.readouterr().out
    assert "4 skipped: no words in the file name" in out and "5_sks/000.png, 5_sks/001.png, 5_sks/002.png ..." in out


def test_modes_fill_replace_append(dataset):
    green = dataset / "3_green_thing" / "green.png"
    # fill: the existing caption is kept; a caption in another extension the trainer reads counts too
    (dataset / "10_sks dog" / "red_circle_01.caption").write_text("red thing", encoding="utf-8")
    r = caption_folder(dataset, "folder", mode="fill", progress=False)
    assert (r.kept, r.written) == (2, 2)
    assert read_caption(green) == "already captioned"
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") is None
    assert read_caption(dataset / "10_sks dog" / "blue_square (2).png") == "sks dog"
    # fill again: nothing left to do (fill resumes by itself)
    assert caption_folder(dataset, "folder", mode="fill", progress=False).written == 0

    # append: new tags after the old ones, repeats dropped, trigger moved first
    (green.with_suffix(".txt")).write_text("green thing, grass, Green_Thing", encoding="utf-8")
    caption_folder(dataset, "template", template="green thing, leaf", mode="append", trigger="sks", progress=False)
    assert read_caption(green) == "sks, green thing, grass, leaf"
    # appending the same again changes nothing (dedupe), and the file is not rewritten
    r = caption_folder(dataset, "template", template="green thing, leaf", mode="append", trigger="sks", progress=False)
    assert r.unchanged == 4 and r.written == 0

    # append to a caption kept in .caption: the new .txt (read first by the trainer) carries the old tags too
    blue = dataset / "10_sks dog" / "blue_square (2).png"
    blue.with_suffix(".txt").unlink()
    blue.with_suffix(".caption").write_text("blue, square", encoding="utf-8")
    caption_folder(dataset, "template", template="leaf", mode="append", progress=False)
    assert read_caption(blue) == "blue, square, leaf"

    # replace with prefix / suffix / blacklist (wildcards) / dedupe off
    caption_folder(dataset, "template", template="a, simple background, white background, b, a", mode="replace",
                   prefix="masterpiece", suffix="end", blacklist="*background", progress=False)
    assert read_caption(green) == "masterpiece, a, b, end"
    caption_folder(dataset, "template", template="a, b, a", mode="replace", dedupe=False, progress=False)
    assert read_caption(green) == "a, b, a"


def test_compose_caption_rules():
    assert compose_caption("dog, sks, red_hair, Red hair", trigger="sks") == "sks, dog, red_hair"
    assert compose_caption("a photo of a dog", prefix="photo, ", suffix=", 4k") == "photo, a photo of a dog, 4k"
    assert compose_caption("1girl, solo, simple background", blacklist=["solo", "simple*"]) == "1girl"
    assert compose_caption("solo", trigger="solo", blacklist=["solo"]) == "solo"  # what the user typed stays


def test_dry_run_writes_nothing(dataset):
    before = _captions(dataset)
    r = caption_folder(dataset, "folder", mode="replace", dry_run=True, progress=False)
    assert r.written == 4 and r.captions[str(dataset / "10_sks dog" / "red_circle_01.png")] == "sks dog"
    assert _captions(dataset) == before and not (dataset / JOURNAL_NAME).exists()


class _Countdown(Captioner):
    """Captions with the file stem; raises on the call after `fail_after` batches (a simulated crash)."""

    name = "test-countdown"
    options = {"word": Option("new", "first word of each caption")}
    needs_images = True

    def __init__(self, fail_after: int | None = None, **options):
        super().__init__(**options)  # fail_after is not an option: it must not change the run's settings
        self.fail_after, self.calls = fail_after, 0

    def caption(self, sources):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        assert all(s.image is not None and s.image.mode == "RGB" for s in sources)
        return [f"{self.config['word']} {s.path.stem}" for s in sources]


def test_replace_and_append_resume_after_interruption(dataset):
    # 4 images, batches of 1; the run dies in the third batch.
    with pytest.raises(RuntimeError, match="simulated crash"):
        caption_folder(dataset, _Countdown(fail_after=2), mode="append", batch_size=1, progress=False)
    journal = (dataset / JOURNAL_NAME).read_text().splitlines()
    assert len(journal) == 3 and "settings" in json.loads(journal[0])
    # The same command again finishes the last two without appending twice to the first two.
    flaky = _Countdown()
    r = caption_folder(dataset, flaky, mode="append", batch_size=1, progress=False)
    assert (r.resumed, r.written, flaky.calls) == (2, 2, 2)
    assert read_caption(dataset / "10_sks dog" / "blue_square (2).png") == "new blue_square (2)"
    assert read_caption(dataset / "3_green_thing" / "green.png") == "already captioned, new green"
    assert not (dataset / JOURNAL_NAME).exists()

    # A journal from other settings is not used: the run starts over.
    with pytest.raises(RuntimeError):
        caption_folder(dataset, _Countdown(fail_after=1), mode="replace", batch_size=1, progress=False)
    r = caption_folder(dataset, _Countdown(), mode="replace", batch_size=1, trigger="x", progress=False)
    assert r.resumed == 0 and r.written == 4
    # resume=False ignores a journal with the same settings.
    with pytest.raises(RuntimeError):
        caption_folder(dataset, _Countdown(fail_after=1), mode="replace", batch_size=1, progress=False)
    assert caption_folder(dataset, _Countdown(), mode="replace", batch_size=1, resume=False, progress=False).resumed == 0


def test_unreadable_image_is_reported_not_fatal(dataset):
    (dataset / "10_sks dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    calls = []
    r = caption_folder(dataset, _Countdown(), mode="replace", batch_size=2, progress=False, callback=lambda d, t: calls.append((d, t)))
    assert [p for p, _ in r.failed] == [str(dataset / "10_sks dog" / "broken.png")]
    assert r.written == 4 and calls == [(2, 5), (4, 5), (5, 5)]
    assert not (dataset / "10_sks dog" / "broken.txt").exists()


def test_registry_one_class_is_a_captioner(dataset):
    register_captioner(_Countdown)
    try:
        assert "test-countdown" in available_captioners()
        caption_folder(dataset, "test-countdown", mode="replace", progress=False)
        assert read_caption(dataset / "3_green_thing" / "green.png") == "new green"
    finally:
        caption_base._REGISTRY.pop("test-countdown")
    assert {"filename", "folder", "template", "transformers", "wd14"} <= set(available_captioners())
    assert sd_lora.caption_folder is caption_folder


def test_errors_say_what_to_do(dataset, tmp_path):
    with pytest.raises(CaptionerError, match="unknown captioner 'blip9'.*template"):
        get_captioner("blip9")
    with pytest.raises(CaptionerError, match="does not accept option.*threshold.*accepts: template"):
        caption_folder(dataset, "template", threshold=0.5)
    with pytest.raises(CaptionerError, match=r"unknown placeholder \{name\}"):
        get_captioner("template", template="{name}")
    with pytest.raises(ValueError, match="image extension"):
        caption_folder(dataset, "folder", ext=".png")
    with pytest.raises(ValueError, match="unknown caption mode"):
        caption_folder(dataset, "folder", mode="overwrite")
    with pytest.raises(ValueError, match="no images found"):
        caption_folder(_empty(tmp_path), "folder")
    with pytest.raises(FileNotFoundError):
        caption_folder(tmp_path / "nope", "folder")
    # model captioners: a missing / incomplete folder names the files needed and where they come from
    with pytest.raises(CaptionerError, match="needs --model"):
        get_captioner("transformers")
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text("{}")
    with pytest.raises(CaptionerError, match=r"missing the weights .*preprocessor_config.json.*tokenizer.*huggingface-cli download Salesforce/blip"):
        get_captioner("transformers", model=tmp_path / "blip")
    with pytest.raises(CaptionerError, match=r"model.onnx.*selected_tags.csv.*--model"):
        get_captioner("wd14", model=tmp_path / "blip")


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    return tmp_path / "empty"


def test_cli(dataset, capsys):
    assert cli_main(["caption", str(dataset), "--captioner", "template", "--trigger", "sks", "--mode", "replace"]) == 0
    assert read_caption(dataset / "3_green_thing" / "green.png") == "sks, green thing"
    assert cli_main(["caption", str(dataset), "-c", "folder", "--mode", "replace", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "green.png: green thing" in out and "would write 4" in out
    assert read_caption(dataset / "3_green_thing" / "green.png") == "sks, green thing"
    assert cli_main(["caption", str(dataset), "-c", "filename", "-o", "strip_numbers=false", "--mode", "replace", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 4
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "red circle 01"
    assert cli_main(["caption", "--list"]) == 0 and "wd14" in capsys.readouterr().out
    assert cli_main(["caption", str(dataset), "-c", "wd14"]) == 1
    assert "needs --model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bulk editing (web UI Dataset tab)


def test_list_dataset_and_bulk_edits(dataset):
    items = list_dataset(dataset)
    assert [(i.path.name, i.folder, i.repeats, i.caption) for i in items] == [
        ("blue_square (2).png", "sks dog", 10, None),
        ("red_circle_01.png", "sks dog", 10, None),
        ("green.png", "green thing", 3, "already captioned"),
        ("photo.jpg", "green thing", 3, None),
    ]
    red = dataset / "10_sks dog" / "red_circle_01.png"
    assert fill_missing(dataset, "{trigger}, {folder}", trigger="sks") == 3
    assert read_caption(red) == "sks, sks dog"
    assert add_trigger(dataset, "ohwx") == 4 and add_trigger(dataset, "ohwx") == 0
    assert read_caption(red) == "ohwx, sks, sks dog"
    assert add_prefix_suffix([red], prefix="photo", suffix="best quality") == 1
    assert add_prefix_suffix([red], prefix="photo", suffix="best quality") == 0  # idempotent
    assert read_caption(red) == "photo, ohwx, sks, sks dog, best quality"
    assert find_replace(dataset, "sks dog", "dog") == 2
    assert find_replace([red], r"\bdog\b", "puppy", regex=True) == 1
    assert read_caption(red) == "photo, ohwx, sks, puppy, best quality"
    assert remove_tags_from(dataset, ["ohwx", "best*"]) == 4
    assert read_caption(red) == "photo, sks, puppy"
    write_caption(red, "a, b, A, b")
    assert (red.with_suffix(".txt")).read_text(encoding="utf-8") == "a, b, A, b\n"
    assert dedupe_captions([red]) == 1 and read_caption(red) == "a, b"
    with pytest.raises(ValueError, match="image extension"):
        write_caption(red, "oops", ext=".jpg")
    with pytest.raises(ValueError, match="invalid regular expression"):
        find_replace(dataset, "(", "x", regex=True)


# ---------------------------------------------------------------------------------------------
# transformers captioner: a tiny random BLIP saved to a folder and loaded back through our code


WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a photo of red green blue circle square dog cat on the with".split()
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.2)


@pytest.fixture(scope="module", params=["blip", "git"])
def tiny_vlm(request, tmp_path_factory):
    """A random-weight BLIP (encoder + text decoder) or GIT (decoder-only) folder, as save_pretrained writes it."""
    import torch
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp(request.param)
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    if request.param == "blip":
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
        from transformers.models.blip.image_processing_blip import BlipImageProcessor

        cfg = BlipConfig(
            vision_config=dict(TINY, image_size=32, patch_size=8),
            text_config=dict(TINY, vocab_size=len(WORDS), max_position_embeddings=40, bos_token_id=5, sep_token_id=3,
                             pad_token_id=0, eos_token_id=3),
            projection_dim=16, image_text_hidden_size=16, initializer_range=0.2,
        )
        BlipForConditionalGeneration(cfg).save_pretrained(d)
        tokenizer = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")
        BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(d)
    else:
        from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

        cfg = GitConfig(vision_config=dict(TINY, image_size=32, patch_size=8), **TINY, vocab_size=len(WORDS),
                        max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
        GitForCausalLM(cfg).save_pretrained(d)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        GitProcessor(image_processor=image_processor, tokenizer=BertTokenizer(str(d / "vocab.txt"))).save_pretrained(d)
    return d


def test_transformers_captioner_end_to_end(tiny_vlm, dataset):
    cap = get_captioner("transformers", model=tiny_vlm, max_new_tokens=5, min_new_tokens=2, num_beams=1)
    r = caption_folder(dataset, cap, mode="replace", batch_size=3, trigger="sks", progress=False)  # batches of 3 + 1
    assert r.written == 4 and not r.failed
    texts = {Path(p).name: t for p, t in r.captions.items()}
    assert all(t.startswith("sks, ") and len(t) > len("sks, ") for t in texts.values())
    assert len(set(texts.values())) > 1  # the images differ, so (even random) captions differ
    # Batched and one-by-one give the same captions, in the right order; reruns are identical.
    images = [dataset / "10_sks dog" / "red_circle_01.png", dataset / "3_green_thing" / "green.png"]
    one_by_one = [cap.caption_images([Image.open(p)])[0] for p in images]
    assert cap.caption_images([Image.open(p) for p in images]) == one_by_one
    assert [texts[p.name] for p in images] == ["sks, " + t for t in one_by_one]
    for p in images:
        assert read_caption(p) == texts[p.name]

    # BLIP and GIT repeat a prompt in their answer; strip_prompt removes it.
    prompted = get_captioner("transformers", model=tiny_vlm, max_new_tokens=3, min_new_tokens=1, num_beams=2, prompt="a photo of")
    with_prompt = prompted.caption_images([Image.open(images[0])])[0]
    assert with_prompt.startswith("a photo of ") and len(with_prompt) > len("a photo of ")
    prompted.config["strip_prompt"] = True
    assert prompted.caption_images([Image.open(images[0])])[0] == with_prompt[len("a photo of "):]


# ---------------------------------------------------------------------------------------------
# WD14 tagger: a hand-built ONNX graph with the WD14 interface (NHWC BGR 0..255 in, probabilities out)

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnxruntime / onnx not installed (pip install 'sd-lora[tagger]')",
)

# (name, category, weights on mean [B, G, R] in 0..1, bias): probability = sigmoid(w . x + b)
TAGS = [
    ("general", 9, (0, 0, 0), 2.0),
    ("sensitive", 9, (0, 0, 0), -2.0),
    ("red", 0, (0, 0, 20), -10.0),
    ("blue", 0, (20, 0, 0), -10.0),
    ("green", 0, (0, 20, 0), -10.0),
    ("long_hair", 0, (0, 0, 0), 0.0),  # always 0.5
    ("^_^", 0, (0, 0, 0), 1.0),  # always 0.73
    ("hatsune_miku", 4, (0, 0, 10), -7.8),  # 0.90 on red images
]


def _tagger_folder(d: Path, batch: int | str = "N", tags=TAGS) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d.mkdir(parents=True, exist_ok=True)
    w = np.array([t[2] for t in TAGS], dtype=np.float32).T  # (3, T)
    b = np.array([t[3] for t in TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "c255"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, 32, 32, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        initializer=[numpy_helper.from_array(np.array(255.0, dtype=np.float32), "c255"),
                     numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _, _) in enumerate(tags)]
    (d / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


@needs_ort
def test_wd14_tagger_exact_tags(tmp_path, dataset):
    model = _tagger_folder(tmp_path / "wd14")
    r = caption_folder(dataset, "wd14", model=model, mode="replace", batch_size=3, threads=1, progress=False)
    assert r.written == 4
    # characters first, then general tags by confidence; underscores become spaces except in kaomoji
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "hatsune miku, red, ^_^, long hair"
    assert read_caption(dataset / "10_sks dog" / "blue_square (2).png") == "blue, ^_^, long hair"
    assert read_caption(dataset / "3_green_thing" / "sub" / "photo.jpg") == "green, ^_^, long hair"

    tagger = get_captioner("wd14", model=model / "model.onnx", threshold=0.6, character_threshold=0.95, rating=True,
                           replace_underscores=False, threads=1)
    red = Image.new("RGB", (32, 32), RED)
    assert tagger.caption_images([red]) == ["red, ^_^, general"]
    # Non-square images are padded to square with white (WD14's preprocessing): half-white -> blue/green at 0.5.
    wide = Image.new("RGB", (64, 32), RED)
    assert set(get_captioner("wd14", model=model, threshold=0.45).caption_images([wide])[0].split(", ")) == {
        "hatsune miku", "red", "^_^", "blue", "green", "long hair"}

    # A model exported with a fixed batch of 1 still takes batches; a blacklist and trigger apply as for any captioner.
    fixed = _tagger_folder(tmp_path / "wd14-b1", batch=1)
    r = caption_folder(dataset, "wd14", model=fixed, mode="replace", batch_size=4, trigger="sks", blacklist=["long hair"],
                       progress=False)
    assert read_caption(dataset / "10_sks dog" / "red_circle_01.png") == "sks, hatsune miku, red, ^_^"


@needs_ort
def test_wd14_errors(tmp_path, monkeypatch):
    model = _tagger_folder(tmp_path / "wd14", tags=TAGS[:-1])
    with pytest.raises(CaptionerError, match="predicts 8 tags but .* lists 7"):
        get_captioner("wd14", model=model)
    (model / "selected_tags.csv").write_text("id,tag\n1,x\n")
    with pytest.raises(CaptionerError, match="tag_id,name,category,count"):
        get_captioner("wd14", model=model)
    with pytest.raises(CaptionerError, match="between 0 and 1"):
        get_captioner("wd14", model=model, threshold=35)
    _tagger_folder(model)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(CaptionerError, match=r"needs onnxruntime.*pip install 'sd-lora\[tagger\]'"):
        get_captioner("wd14", model=model)
