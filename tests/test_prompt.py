"""`<lora:NAME:W>` prompt syntax: parsing, bad input, and resolving names against a LoRA folder."""

import pytest

from sd_lora.stack import LoraSpec, parse_lora_prompt, prompt_to_stack, resolve_lora_name


def test_single_weight_sets_both_and_tags_are_removed():
    clean, tags = parse_lora_prompt("a photo of a cat <lora:ink:0.8>, film grain")
    assert clean == "a photo of a cat, film grain"
    assert [(t.name, t.weight, t.te_weight) for t in tags] == [("ink", 0.8, 0.8)]


def test_a1111_order_is_text_encoder_then_unet():
    _, tags = parse_lora_prompt("<lora:style:0.25:0.75> a dog")
    assert (tags[0].te_weight, tags[0].weight) == (0.25, 0.75)


def test_named_weights_defaults_and_negative():
    clean, tags = parse_lora_prompt("x <lora:a> <LORA:b:-0.5> <lora:c:te=0:unet=1.5> <lyco:d:unet=0.3>")
    assert clean == "x"
    got = [(t.name, t.weight, t.te_weight) for t in tags]
    assert got == [("a", 1.0, 1.0), ("b", -0.5, -0.5), ("c", 1.5, 0.0), ("d", 0.3, 1.0)]


def test_prompt_without_tags_is_unchanged_apart_from_spacing():
    assert parse_lora_prompt("a  red circle, blue") == ("a red circle, blue", [])


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a <lora:ink:0.8", "unclosed"),
        ("a <lora::0.8>", "no name"),
        ("a <lora:ink:strong>", "not a number"),
        ("a <lora:ink:nan>", "finite"),
        ("a <lora:ink:1:1:8>", "3 numbers"),
        ("a <lora:ink:dyn=8>", "unknown option"),
        ("a <lora:ink:te=1:0.5>", "cannot follow"),
    ],
)
def test_bad_tags_raise_with_the_tag_quoted(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_lora_prompt(prompt)


@pytest.fixture
def lora_dir(tmp_path):
    for rel in ("ink_style.safetensors", "film.safetensors", "chars/alice.safetensors", "a/dup.safetensors", "b/dup.safetensors"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a lora")
    return tmp_path


def test_names_resolve_by_stem_subfolder_and_suffix(lora_dir):
    assert resolve_lora_name("ink_style", lora_dir) == lora_dir / "ink_style.safetensors"
    assert resolve_lora_name("INK_STYLE.safetensors", lora_dir) == lora_dir / "ink_style.safetensors"
    assert resolve_lora_name("alice", lora_dir) == lora_dir / "chars" / "alice.safetensors"
    assert resolve_lora_name("chars/alice", lora_dir) == lora_dir / "chars" / "alice.safetensors"


def test_unknown_name_lists_close_matches(lora_dir):
    with pytest.raises(ValueError, match="Did you mean: ink_style"):
        resolve_lora_name("ink_styel", lora_dir)
    with pytest.raises(ValueError, match="several subfolders.*a/dup, b/dup"):
        resolve_lora_name("dup", lora_dir)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_lora_name("x", lora_dir / "missing")


def test_prompt_to_stack_builds_specs(lora_dir):
    clean, specs = prompt_to_stack("<lora:film:0.5:1> a cat <lora:alice:0.7>", lora_dir)
    assert clean == "a cat"
    assert specs == [
        LoraSpec(lora_dir / "film.safetensors", weight=1.0, te_weight=0.5),
        LoraSpec(lora_dir / "chars" / "alice.safetensors", weight=0.7, te_weight=0.7),
    ]
    with pytest.raises(ValueError, match="no LoRA folder"):
        prompt_to_stack("a <lora:film:1>", None)
