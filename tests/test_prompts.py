"""Issues #19 item 4 and #21 item 4: prompts and captions as A1111 reads them (sd_lora/prompts.py).

The parser is checked against the examples of A1111's own docstring (modules/prompt_parser.py
`parse_prompt_attention`, v1.10.1, copied as facts); the chunking, emphasis and clip skip against
hand computations of A1111's rules (modules/sd_hijack_clip.py, sd_emphasis.py) on tiny encoders.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sd_lora.models import conditioning_hidden_state, unread_text_encoder_layers
from sd_lora.prompts import (BREAK, PromptEncoder, chunk_prompt, final_layer_norm, parse_prompt_attention,
                             pipeline_prompt_kwargs)
from sd_lora.testing import tiny_pipeline, tiny_tokenizer
from sd_lora.training.conditioning import TextConditioner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipeline("sdxl")


# ---- the parser: A1111's docstring examples -------------------------------------------------------

A1111_EXAMPLES = [  # modules/prompt_parser.py parse_prompt_attention docstring (doctest), v1.10.1
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_parser_gives_a1111s_documented_results(text, expected):
    # exact floats: the weights are multiplied in A1111's order (innermost bracket first)
    assert [list(p) for p in parse_prompt_attention(text)] == expected


def test_parser_square_brackets_break_escapes_and_stray_brackets():
    assert parse_prompt_attention("[faint]") == [("faint", 1 / 1.1)]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("aBREAKb") == [("aBREAKb", 1.0)]  # BREAK only as a word of its own
    assert parse_prompt_attention("a) b] c:d") == [("a) b] c:d", 1.0)]  # nothing open: text
    assert parse_prompt_attention("\\\\ and \\[x\\]") == [("\\ and [x]", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]


# ---- chunking: a 150-token caption, by hand ----------------------------------------------------

def _words(n: int) -> str:
    """n tokens of the tiny vocabulary ("red circle red ..." : one token per word)."""
    return " ".join(["red", "circle"][i % 2] for i in range(n))


def test_a_150_token_caption_is_two_77_token_chunks_encoded_apart(sd1):
    tok, te = sd1.tokenizer, sd1.text_encoder
    caption = _words(150)
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert len(ids) == 150
    bos, eos = tok.bos_token_id, tok.eos_token_id
    chunk1, chunk2 = [bos] + ids[:75] + [eos], [bos] + ids[75:] + [eos]
    with torch.no_grad():
        expected = torch.cat([te(torch.tensor([chunk1]))[0], te(torch.tensor([chunk2]))[0]], dim=1)
        got, pooled = TextConditioner(sd1, False, max_token_length=150).encode([caption], "cpu")
    assert pooled is None and got.shape == (1, 154, expected.shape[-1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # a short caption in a 150 run: its own chunk, then an empty prompt's chunk (BOS, EOS, padding)
    with torch.no_grad():
        short, _ = TextConditioner(sd1, False, max_token_length=150).encode(["red circle"], "cpu")
        one = te(tok("red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        empty = te(tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(short, torch.cat([one, empty], dim=1), rtol=0, atol=1e-6)


def test_comma_back_off_moves_the_last_phrase_to_the_next_chunk():
    tok = tiny_tokenizer()
    comma = tok.get_vocab()[",</w>"]
    # 70 words, a comma (token 71), then 10 words: the 76th token would overflow chunk 1, and the comma
    # is 5 tokens back (<= 20), so the 5 tokens after it move to chunk 2 (A1111 tokenize_line)
    text = _words(70) + ", " + _words(10)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[70] == comma and len(ids) == 81
    chunks = chunk_prompt(tok, text)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert chunks.tokens[0] == [bos] + ids[:71] + [eos] * 5
    assert chunks.tokens[1] == [bos] + ids[71:] + [eos] * 66
    assert chunks.weights == [[1.0] * 77, [1.0] * 77]
    # kept to one chunk (training at max_token_length 75) it is filled instead: the first 75 tokens
    one = chunk_prompt(tok, text, emphasis=False, max_chunks=1)
    assert one.tokens == [[bos] + ids[:75] + [eos]] and one.dropped == 6


def test_an_encoder_whose_pad_is_not_eos_gets_pad_after_the_first_eos():
    from transformers import CLIPTokenizer

    from sd_lora.testing import _tiny_tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(_tiny_tokenizer_dir(), model_max_length=77, pad_token="!")  # SD2 / OpenCLIP
    row = chunk_prompt(tok, "red circle").tokens[0]
    assert row == tok("red circle", padding="max_length", max_length=77).input_ids  # the pipelines' own ids
    assert row[3] == tok.eos_token_id and set(row[4:]) == {tok.pad_token_id}


def test_a_cut_caption_is_warned_about_once_naming_its_file(sd1, caplog):
    cond = TextConditioner(sd1, False, max_token_length=150)
    with caplog.at_level(logging.WARNING):
        assert cond.check_captions([(_words(160), "data/1_x/long.png"), (_words(160), "data/1_x/again.png"),
                                    ("red circle", "data/1_x/short.png")]) == 1
        cond.encode([_words(160)], "cpu")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "data/1_x/long.png" in messages[0] and "last 10 token(s)" in messages[0] and "225" in messages[0]


def test_cached_outputs_of_short_and_long_captions_stack_and_equal_the_batch_encoding(sd1):
    from sd_lora.data.cache import TextCache

    cond = TextConditioner(sd1, False, max_token_length=225)
    captions = ["red circle", _words(100), ""]
    cache = TextCache()
    cache.build(captions[:1], cond, "cpu")  # built in separate batches: still one shape
    cache.build(captions[1:], cond, "cpu")
    hidden, _ = cache.get(captions)
    with torch.no_grad():
        batch, _ = cond.encode(captions, "cpu")
    assert hidden.shape == (3, 231, batch.shape[-1])
    torch.testing.assert_close(hidden, batch, rtol=0, atol=1e-6)
    assert cond.cache_key != TextConditioner(sd1, False, max_token_length=225, clip_skip=2).cache_key


# ---- max_token_length 75 is today's conditioning --------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_max_token_length_75_gives_exactly_the_pipelines_conditioning(arch, sd1, sdxl):
    pipe = sdxl if arch == "sdxl" else sd1
    captions = ["a red circle", _words(70) + ", " + _words(20), "(brackets) stay text BREAK here"]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    with torch.no_grad():
        # what training/conditioning.py computed before long captions (the diffusers pipelines' encoding)
        ids = [t(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids for t in tokenizers]
        if arch == "sd1":
            expected, expected_pooled = encoders[0](ids[0])[0], None
        else:
            outs = [e(i, output_hidden_states=True) for e, i in zip(encoders, ids)]
            expected = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            expected_pooled = outs[1].text_embeds
        cond = TextConditioner(pipe, arch == "sdxl")
        got, pooled = cond.encode(captions, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(cond.input_ids(captions, "cpu"), ids))
    assert torch.equal(got, expected)
    assert (pooled is None) == (expected_pooled is None) and (pooled is None or torch.equal(pooled, expected_pooled))


# ---- emphasis -------------------------------------------------------------------------------------

def test_emphasis_multiplies_the_tokens_and_restores_the_mean(sd1):
    tok, te = sd1.tokenizer, sd1.text_encoder
    plain = tok("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        z = te(plain)[0]
        got, _ = PromptEncoder(sd1, "sd1").encode(["a (red:1.5) [circle]"], "cpu")
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1  # BOS, a, red, circle: A1111's multipliers per token
    scaled = z * weights[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mean(), z.mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, z)
    # relative to the unweighted tokens, "red" is 1.5 times, "circle" 1/1.1 times what it was
    ratio = (got[0] / z[0])[:, 0]
    torch.testing.assert_close(ratio[2] / ratio[1], torch.tensor(1.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio[3] / ratio[1], torch.tensor(1 / 1.1), rtol=1e-5, atol=0)


def test_break_starts_a_new_chunk(sd1):
    tok = sd1.tokenizer
    with torch.no_grad():
        got, _ = PromptEncoder(sd1, "sd1").encode(["red BREAK circle"], "cpu")
        ids = [tok(t, padding="max_length", max_length=77, return_tensors="pt").input_ids for t in ("red", "circle")]
        expected = torch.cat([sd1.text_encoder(i)[0] for i in ids], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_captions_are_not_weighted_in_training(sd1):
    with torch.no_grad():
        literal, _ = TextConditioner(sd1, False).encode(["a (red:1.5) circle"], "cpu")
        ids = sd1.tokenizer("a (red:1.5) circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(literal, sd1.text_encoder(ids)[0])


# ---- clip skip --------------------------------------------------------------------------------------

def test_clip_skip_reads_the_nth_layer_from_the_end_through_the_final_layer_norm(sd1, sdxl):
    ids = sd1.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    te = sd1.text_encoder
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        expected = final_layer_norm(te)(out.hidden_states[-2])
        got, _ = TextConditioner(sd1, False, clip_skip=2).encode(["a red circle"], "cpu")
        one, _ = TextConditioner(sd1, False, clip_skip=1).encode(["a red circle"], "cpu")
    assert torch.equal(got, expected)
    assert torch.equal(one, out.last_hidden_state)
    assert conditioning_hidden_state("sd1", 2) == -2 and conditioning_hidden_state("sd2", 3) == -3
    assert conditioning_hidden_state("sdxl", 2) == -2  # SDXL ignores clip skip (A1111, kohya)
    assert list(unread_text_encoder_layers("sd1", "text_encoder", 12, clip_skip=2)) == [11]
    assert list(unread_text_encoder_layers("sd2", "text_encoder", 23, clip_skip=3)) == [21, 22]
    assert list(unread_text_encoder_layers("sdxl", "text_encoder", 12, clip_skip=2)) == [11]
    with pytest.raises(ValueError, match="only 2 layers"):
        TextConditioner(sd1, False, clip_skip=3)


def test_clip_skip_puts_no_adapters_on_the_skipped_layers_and_trains_the_rest():
    """Targets exactly where the clip-skipped conditioning's gradient reaches (as test_conditioning_layers)."""
    from sd_lora.network.presets import select_targets

    pipe = tiny_pipeline("sd1")
    pipe.text_encoder.requires_grad_(True)
    hidden, _ = TextConditioner(pipe, False, clip_skip=2).encode(["a red circle"], "cpu")
    hidden.sum().backward()
    targets = {t.path for t in select_targets(pipe, "sd1", "kohya", train_unet=False, clip_skip=2)}
    assert targets and not any(".layers.1." in p for p in targets)
    for path, module in pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ("self_attn" in path or ".mlp." in path):
            reached = module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)
            assert (path in targets) == reached, path


# ---- generation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_plain_prompt_gives_the_pipelines_own_image_bit_for_bit(arch, sd1, sdxl):
    from sd_lora import generate

    pipe = sdxl if arch == "sdxl" else sd1
    pipe.set_progress_bar_config(disable=True)
    for negative in ("", "blue"):
        before = pipe(prompt="a red circle", negative_prompt=negative or None, num_inference_steps=1, guidance_scale=7.0,
                      width=64, height=64, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
        image = generate(pipe, "a red circle", negative_prompt=negative, steps=1, width=64, height=64, seed=3).images[0].image
        assert np.array_equal(np.asarray(image), (before * 255).round().astype("uint8")), (arch, negative)


def test_long_prompts_emphasis_and_clip_skip_in_generate(sd1):
    from sd_lora import generate
    from sd_lora.generation import settings_from_infotext

    kwargs = pipeline_prompt_kwargs(sd1, _words(100), "blue", clip_skip=2)
    assert kwargs["prompt_embeds"].shape[1] == kwargs["negative_prompt_embeds"].shape[1] == 154  # negative padded
    with torch.no_grad():  # the padding is an empty prompt's chunk (A1111's pad_cond_uncond)
        empty = pipeline_prompt_kwargs(sd1, "", clip_skip=2)["prompt_embeds"]
    torch.testing.assert_close(kwargs["negative_prompt_embeds"][:, 77:], empty, rtol=0, atol=1e-6)
    res = generate(sd1, "a (red:1.3) circle", steps=1, width=64, height=64, clip_skip=2)
    text = res.images[0].parameters
    assert "Clip skip: 2" in text and text.index("Model:") < text.index("Clip skip: 2") < text.index("Version:")
    assert settings_from_infotext(text)["clip_skip"] == 2
    plain = generate(sd1, "a (red:1.3) circle", steps=1, width=64, height=64)
    assert "Clip skip" not in plain.images[0].parameters
    assert settings_from_infotext(plain.images[0].parameters)["clip_skip"] is None
    assert not np.array_equal(np.asarray(res.images[0].image), np.asarray(plain.images[0].image))
    with pytest.raises(ValueError, match="clip skip 0"):
        generate(sd1, "a red circle", clip_skip=0)


def test_sdxl_notes_that_it_ignores_clip_skip(sdxl):
    from sd_lora import generate

    res = generate(sdxl, "a red circle", steps=1, width=64, height=64, clip_skip=2)
    assert any("SDXL ignores clip skip" in n for n in res.notes)


# ---- training: the settings reach the file ---------------------------------------------------------------

def test_training_with_clip_skip_and_long_captions_writes_them_and_skips_the_last_layer(tmp_path):
    from sd_lora.config import DataConfig, TrainConfig
    from sd_lora.io import load_safetensors
    from sd_lora.training import train

    from test_train import make_images

    model = tmp_path / "base"
    tiny_pipeline("sd1").save_pretrained(model)
    make_images(tmp_path / "data" / "1_circle", n=2)
    for caption in (tmp_path / "data" / "1_circle").glob("*.txt"):
        caption.write_text(_words(120))
    out = tmp_path / "lora.safetensors"
    cfg = TrainConfig(model=str(model), output=str(out), data=DataConfig(path=str(tmp_path / "data"), resolution=64),
                      network={"rank": 2, "alpha": 2, "train_text_encoder": True}, steps=1, seed=1,
                      clip_skip=2, max_token_length=150)
    train(cfg)
    tensors, md = load_safetensors(out)
    assert md["ss_clip_skip"] == "2" and md["modelspec.encoder_layer"] == "2" and md["ss_max_token_length"] == "150"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    assert not any(k.startswith("lora_te_text_model_encoder_layers_1_") for k in tensors)


def test_cli_clip_skip_is_written_and_from_png_remakes_the_image(tmp_path):
    from PIL import Image

    from sd_lora.cli import main
    from sd_lora.infotext import read_png_infotext

    model = tmp_path / "tiny"
    tiny_pipeline("sd1").save_pretrained(model)
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["generate", "--model", str(model), "--steps", "1", "--width", "64", "--height", "64"]
    assert main(common + ["--prompt", "a (red:1.2) circle", "--clip-skip", "2", "--out", str(first)]) == 0
    assert "Clip skip: 2" in read_png_infotext(first)
    assert main(common + ["--from-png", str(first), "--out", str(again)]) == 0
    assert "Clip skip: 2" in read_png_infotext(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_emphasis_on_zero_mean_states_keeps_the_weights_instead_of_dividing_by_zero():
    from sd_lora.prompts import apply_emphasis

    # an untrained final layer norm (weight 1, bias 0) centres every token: the mean A1111 restores is 0
    # (exactly, with the tiny models' penultimate layer at clip skip 2; here: +x and -x in every token)
    half = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(0))
    hidden = torch.cat([half, -half], dim=-1)
    assert hidden.mean() == 0
    weights = torch.ones(77)
    weights[2] = 1.5
    got = apply_emphasis(hidden, weights.tolist())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, hidden * weights[:, None])
