"""The metadata editor: fields written and read back, tensors byte for byte, hashes still valid,
trigger words first, a cover that decodes, refusals of files it cannot rewrite safely; the CLI."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd_lora.formats.edit import edit_metadata, read_cover
from sd_lora.formats.metadata import compute_sshs_hashes, data_sha256, trigger_words
from sd_lora.infotext import lora_hash
from sd_lora.io import CheckpointError, load_safetensors, read_safetensors_header


def _tensor_bytes(path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


@pytest.fixture
def lora(tmp_path):
    """A kohya-style file of just over 1 MiB (so the legacy hash reads tensor bytes) with its hashes."""
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 140000, generator=g).half(),
               "lora_unet_x.lora_up.weight": torch.randn(320, 4, generator=g),
               "lora_unet_x.alpha": torch.tensor(2.0)}
    md = {"ss_output_name": "old", "ss_network_module": "networks.lora", "modelspec.title": "Old",
          "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 9, "grass": 12, "a photo of sks dog": 3}})}
    md["sshs_model_hash"], md["sshs_legacy_hash"] = compute_sshs_hashes(tensors, md)
    path = tmp_path / "dog.safetensors"
    save_file(tensors, str(path), metadata=md)
    return path


def test_fields_are_written_and_tensors_and_hashes_stay(lora, tmp_path):
    before = _tensor_bytes(lora)
    hashes = lora_hash(lora), data_sha256(lora)
    own_words = trigger_words(read_safetensors_header(lora)[1])
    legacy = read_safetensors_header(lora)[1]["sshs_legacy_hash"]
    cover = tmp_path / "cover.png"
    Image.new("RGBA", (640, 320), (200, 30, 30, 128)).save(cover)

    md = edit_metadata(lora, title="Dog v2", description="A **dog** LoRA.\nTwo lines.", output_name="dog_v2",
                       trigger_words="ohwx dog, red collar", cover=cover)

    assert _tensor_bytes(lora) == before  # every tensor byte
    tensors, back = load_safetensors(lora)
    assert back == md
    assert back["modelspec.title"] == "Dog v2" and back["ss_output_name"] == "dog_v2"
    assert back["modelspec.description"] == "A **dog** LoRA.\nTwo lines."
    assert back["modelspec.trigger_phrase"] == "ohwx dog, red collar"
    # sshs_model_hash (tensor bytes) unchanged and still what kohya computes; the legacy hash, which reads
    # the file saved with its ss_ metadata, recomputed to kohya's value for the new metadata.
    assert back["sshs_model_hash"] == data_sha256(lora) == compute_sshs_hashes(tensors, back)[0] == hashes[1]
    assert back["sshs_legacy_hash"] == compute_sshs_hashes(tensors, back)[1] != legacy
    assert lora_hash(lora) == hashes[0]
    # trigger words: ours first, in order, then the training's own
    assert trigger_words(back)[:3] == ["ohwx dog", "red collar", "sks dog"]
    assert json.loads(back["ss_tag_frequency"])["10_sks dog"] == {"sks dog": 9, "grass": 12, "a photo of sks dog": 3}
    # the cover: a JPEG data URI within 256 px, the image's aspect kept
    head, data = back["modelspec.thumbnail"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    assert im.format == "JPEG" and im.size == (256, 128)
    assert read_cover(back).size == (256, 128)

    # A second edit replaces our trigger words (no pile-up); "" removes keys; the rest is kept.
    md2 = edit_metadata(lora, trigger_words=["newword"], description="", cover="")
    assert trigger_words(md2)[:2] == ["newword", "sks dog"] and "ohwx dog" not in trigger_words(md2)
    assert "modelspec.description" not in md2 and "modelspec.thumbnail" not in md2
    assert md2["modelspec.title"] == "Dog v2" and _tensor_bytes(lora) == before
    md3 = edit_metadata(lora, trigger_words=[])
    assert trigger_words(md3) == own_words == ["sks dog", "grass"]
    assert "modelspec.trigger_phrase" not in md3


def test_a_file_without_metadata_and_a_copy_elsewhere(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    out = tmp_path / "edited.safetensors"
    md = edit_metadata(path, title="T", trigger_words=["tok"], out=out)
    assert read_safetensors_header(path)[1] == {}  # the original is untouched
    assert load_safetensors(out)[1] == md and trigger_words(md) == ["tok"]
    assert _tensor_bytes(out) == _tensor_bytes(path)


def test_refusals(tmp_path, lora):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        edit_metadata(ckpt, title="x")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        edit_metadata(bad, title="x")
    # overlapping tensors and a key named twice: readers would disagree, so no rewrite
    for header in ['{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
                   '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}']:
        raw = header.encode()
        bad.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
        with pytest.raises(CheckpointError, match="overlap|twice"):
            edit_metadata(bad, title="x")
        assert bad.read_bytes()[8:8 + len(raw)] == raw  # left as it was
    notimage = tmp_path / "cover.png"
    notimage.write_text("not an image")
    before = lora.read_bytes()
    with pytest.raises(ValueError, match="not an image"):
        edit_metadata(lora, title="x", cover=notimage)
    assert lora.read_bytes() == before  # nothing written
    assert not [p for p in lora.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_the_cli_edits_and_prints(lora, tmp_path, capsys):
    from sd_lora.cli import main

    cover = tmp_path / "c.jpg"
    Image.new("RGB", (100, 300), (0, 90, 200)).save(cover)
    before = _tensor_bytes(lora)
    assert main(["edit-metadata", str(lora), "--title", "CLI title", "--trigger", "ohwx", "--trigger", "blue hat,tall",
                 "--description", "desc", "--output-name", "dog3", "--cover", str(cover)]) == 0
    printed = capsys.readouterr().out
    assert "CLI title" in printed and "ohwx, blue hat, tall, sks dog" in printed
    _, md = load_safetensors(lora)
    assert (md["modelspec.title"], md["ss_output_name"], md["modelspec.description"]) == ("CLI title", "dog3", "desc")
    assert trigger_words(md)[:3] == ["ohwx", "blue hat", "tall"] and read_cover(md).size == (85, 256)
    assert _tensor_bytes(lora) == before
    assert main(["edit-metadata", str(lora)]) == 1  # nothing to change: an error, not a silent rewrite
    assert "nothing to change" in capsys.readouterr().err


def test_the_library_tab_form_edits_through_the_library_function(lora, tmp_path):
    """The Library tab's "Save metadata" (API `edit_lora_metadata`): the fields it was shown and left
    alone stay as they were; changed ones, the trigger words and an uploaded cover are written."""
    from webui.app import build_app

    ws = tmp_path / "ws"
    (ws / "loras").mkdir(parents=True)
    path = ws / "loras" / "dog.safetensors"
    path.write_bytes(lora.read_bytes())
    before = _tensor_bytes(path)
    demo = build_app(ws)
    try:
        (edit,) = [f.fn for f in demo.fns.values() if f.api_name == "edit_lora_metadata"]
        (fields,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", None) == "current_fields"]  # a browser-only event has no fn
        assert fields("dog") == ("Old", "old", "", "")
        status = edit("dog", "New title", "old", "ohwx, red", "", Image.new("RGB", (512, 512), (9, 9, 9)), False)
        assert "ohwx, red, sks dog" in status and "cover image stored" in status
        _, md = load_safetensors(path)
        assert (md["modelspec.title"], md["ss_output_name"]) == ("New title", "old") and read_cover(md).size == (256, 256)
        assert trigger_words(md)[:2] == ["ohwx", "red"] and _tensor_bytes(path) == before
        assert fields("dog") == ("New title", "old", "ohwx, red", "")
        assert edit("dog", "New title", "old", "ohwx, red", "", None, False) == "loras/dog.safetensors: nothing changed"
        with pytest.raises(Exception, match="not in the library|LoRA"):
            edit("../../etc/passwd", "x", "", "", "", None, False)
    finally:
        demo.sd_lora_context.queue.shutdown()


def test_a_set_trigger_phrase_comes_first_even_with_an_underscore():
    from sd_lora.formats.metadata import trigger_words

    md = {"ss_tag_frequency": '{"10_sks": {"sks": 5, "red": 3}}', "modelspec.trigger_phrase": "hatsune_miku, blue hair"}
    assert trigger_words(md) == ["hatsune_miku", "blue hair", "sks", "red"]
    assert trigger_words({"ss_tag_frequency": '{"10_sks": {"sks": 5}}'}) == ["sks"]
