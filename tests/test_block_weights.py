"""LoRA block weights: the LoRA Block Weight extension's `lbw=` presets and vectors and sdnext's
in=/mid=/out=, read the same from prompt tags, `--lora` and `generate()`'s stack, and fused block by
block (a zeroed block keeps exactly the base weights, the others the full-strength fuse)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd_lora.commands.generate import parse_lora_option
from sd_lora.network.naming import unet_diffusers_to_sgm, unet_layout
from sd_lora.stack import LoraSpec, apply_loras, parse_lora_prompt, prompt_to_stack
from sd_lora.stack.block_weights import block_multipliers, normalize_block_weights, parse_block_weights, unet_block_id
from sd_lora.stack.spec import normalize_stack
from sd_lora.testing import tiny_pipeline, write_random_lora

# The extension's default presets as its source defines them (hako-mikan/sd-webui-lora-block-weight,
# scripts/lora_block_weight.py DEF_WEIGHT_PRESET, commit b403cb7300f288360023c2a1978b86a361934e24),
# copied here as facts.
DOCUMENTED = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
# The extension's README table of the 17-value order (SD1/SD2 LoRA).
ORDER_17 = "BASE IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split()
ORDER_12 = "BASE IN04 IN05 IN07 IN08 MID OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split()  # SDXL LoRA


@pytest.mark.parametrize("line", DOCUMENTED.splitlines())
def test_each_documented_preset_gives_its_documented_vector(line):
    name, vector = line.split(":")
    expected = tuple(float(x) for x in vector.split(","))
    assert parse_block_weights(name) == expected
    assert parse_block_weights(name.lower()) == expected  # spelled in any case
    assert normalize_block_weights(name.lower()) == name  # ... and recorded in the extension's spelling
    blocks = block_multipliers(name, "sd1")
    assert {b.replace("MID", "M00"): blocks[b.replace("MID", "M00")] for b in ORDER_17} == {
        b.replace("MID", "M00"): v for b, v in zip(ORDER_17, expected)}
    # The blocks a 17-value vector does not list get 0, as the extension's to26 does.
    assert all(blocks[b] == 0 for b in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"))


def test_vectors_by_length_named_pairs_and_mistakes():
    sdxl = block_multipliers("1,0,0,0,0,1,0.5,0.5,0.5,0.5,0.5,0.5", "sdxl")
    assert [sdxl[b.replace("MID", "M00")] for b in ORDER_12] == [1, 0, 0, 0, 0, 1] + [0.5] * 6
    assert block_multipliers(",".join(["1"] * 26), "sd1")["IN00"] == 1.0
    assert block_multipliers("IN=0,IN04=1,mid=0.5", "sd1") == {**{f"IN{i:02d}": 0.0 for i in range(12)}, "IN04": 1.0, "M00": 0.5}
    assert block_multipliers("IN04=1,IN=0") == block_multipliers("IN=0,IN04=1")  # groups first, whatever the order
    with pytest.raises(ValueError, match="unknown preset 'OUTDD'. Did you mean: OUTD"):
        parse_block_weights("OUTDD")
    with pytest.raises(ValueError, match="3 numbers.*17 or 26 .*12 or 20"):
        parse_block_weights("1,0,1")
    with pytest.raises(ValueError, match="17-value .*presets are 17-value.*SDXL model: use 12 or 20"):
        block_multipliers("OUTD", "sdxl")
    with pytest.raises(ValueError, match="12-value .*SD1/SD2 model: use 17 or 26"):
        block_multipliers(",".join(["1"] * 12), "sd1")
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_block_weights("1,x" + ",1" * 15)
    with pytest.raises(ValueError, match="random or inherited"):
        parse_block_weights("R" + ",1" * 16)
    with pytest.raises(ValueError, match="unknown block 'IN4'"):
        parse_block_weights("IN4=1")


def test_prompt_tag_cli_and_stack_entry_parse_to_the_same_spec(tmp_path):
    (tmp_path / "ink.safetensors").write_bytes(b"")
    path = tmp_path / "ink.safetensors"
    vector = "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0.25"
    for tag, cli in [
        ("<lora:ink:0.8:lbw=outd>", "ink.safetensors:0.8:lbw=OUTD"),
        (f"<lora:ink:0.8:lbw={vector}>", f"ink.safetensors:0.8:lbw={vector}"),
        ("<lora:ink:0.7:in=0:out=1.5>", "ink.safetensors:0.7:in=0:out=1.5"),  # sdnext
        ("<lora:ink:lbw=IN04=0.5,M00=0>", "ink.safetensors:lbw=IN04=0.5,M00=0"),
    ]:
        _, (from_tag,) = prompt_to_stack(f"a cat {tag}", tmp_path)
        name, w, te, blocks = parse_lora_option(cli)
        from_cli = LoraSpec(tmp_path / name, weight=w, te_weight=te if te is not None else w, block_weights=blocks)
        assert from_tag == from_cli, tag
        (from_entry,) = normalize_stack([(path, from_cli.weight, from_cli.te_weight, from_cli.block_weights)])
        assert from_entry == from_cli
    _, (sdnext,) = prompt_to_stack("<lora:ink:0.7:in=0:out=1.5>", tmp_path)
    # sdnext's in/mid/out are absolute UNet weights (mid defaults to the UNet weight 0.7)
    assert (sdnext.weight, sdnext.te_weight, sdnext.block_weights) == (1.0, 0.7, "IN=0,M00=0.7,OUT=1.5,OTHER=0")
    assert normalize_stack([LoraSpec(path, block_weights="midd")])[0].block_weights == "MIDD"


@pytest.mark.parametrize("tag, message", [
    ("<lora:ink:1:OUTD>", "write block weights as lbw=OUTD"),
    ("<lora:ink:1:lbw=OUTD:stop=10>", "stop= .* not supported"),
    ("<lora:ink:lbw=OUTD:in=0>", "either lbw= or in="),
    ("<lora:ink:lbw=1,1>", "2 numbers"),
])
def test_bad_block_weight_tags_say_what_is_wrong(tag, message):
    with pytest.raises(ValueError, match=message):
        parse_lora_prompt(tag)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def _block(pipe, key: str) -> str | None:
    """The block id of a UNet weight name ("unet.down_blocks.1.attentions.0....weight")."""
    path = key.removeprefix("unet.").rsplit(".", 1)[0]
    try:
        return unet_block_id(unet_diffusers_to_sgm(path, **unet_layout(pipe.unet)))
    except KeyError:
        return None


@pytest.mark.parametrize("arch, vector, zeroed", [
    ("sd1", "1,1,1,1,1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "IN04"),  # 26 values: IN04 off
    ("sdxl", "1,1,1,1,1,0,1,1,1,1,1,1", "M00"),  # 12 values: M00 off
    ("sdxl", "0,1,1,1,1,1,1,1,1,1,1,1", "BASE"),  # the text encoders off
])
def test_a_zeroed_block_keeps_the_base_and_the_rest_equal_the_full_fuse(arch, vector, zeroed, tmp_path):
    pipe = tiny_pipeline(arch)
    f = write_random_lora(tmp_path / "l.safetensors", pipe, arch, seed=5, conv=arch == "sd1")
    base = _weights(pipe)
    apply_loras(pipe, [(f, 1.0)])
    full = _weights(pipe)
    apply_loras(pipe, [LoraSpec(f, 1.0, block_weights=vector)])
    got = _weights(pipe)
    in_block = {k for k in got if (k.startswith("unet.") and _block(pipe, k) == zeroed)
                or (zeroed == "BASE" and k.startswith("text_encoder"))}
    assert any(not torch.equal(full[k], base[k]) for k in in_block), "the LoRA must touch the zeroed block"
    assert [k for k in in_block if not torch.equal(got[k], base[k])] == []
    rest = [k for k in got if k not in in_block]
    assert any(not torch.equal(full[k], base[k]) for k in rest)
    assert [k for k in rest if not torch.equal(got[k], full[k])] == []


def test_a_short_vector_zeroes_the_blocks_it_does_not_list_and_sdnext_out_zero(tmp_path):
    """As in the extension, the 17-value ALL leaves the blocks outside its list (here OUT00-OUT02,
    which in the tiny UNet hold attention layers) at the base; sdnext's out=0 leaves the up blocks."""
    pipe = tiny_pipeline("sd1")
    f = write_random_lora(tmp_path / "l.safetensors", pipe, "sd1", seed=6, conv=True)
    base = _weights(pipe)
    apply_loras(pipe, [(f, 0.8)])
    full = _weights(pipe)
    for spec, off in [(LoraSpec(f, 0.8, block_weights="ALL"), {"OUT00", "OUT01", "OUT02"}),
                      (prompt_to_stack("<lora:l:0.8:out=0>", tmp_path)[1][0], {f"OUT{i:02d}" for i in range(6)})]:
        apply_loras(pipe, [spec])
        got = _weights(pipe)
        unet = [k for k in got if k.startswith("unet.") and not torch.equal(full[k], base[k])]
        assert {_block(pipe, k) for k in unet} >= off | {"IN01", "IN04", "M00"}
        for k in unet:
            assert torch.equal(got[k], base[k] if _block(pipe, k) in off else full[k]), k


def test_block_weights_reach_the_png_and_from_png_and_the_web_ui(tmp_path):
    """`--lora FILE:W:lbw=...` changes the image, records the block weights in the PNG's LoRAs field,
    `--from-png` remakes the same pixels, and the Generate tab's block-weight field gives the same."""
    import gradio as gr

    from sd_lora.cli import main
    from sd_lora.generation import settings_from_infotext
    from webui.app import build_app

    ws = tmp_path / "ws"
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(ws / "models" / "tiny")
    (ws / "loras").mkdir()
    write_random_lora(ws / "loras" / "ink.safetensors", pipe, "sd1", seed=1)
    common = ["--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"), "--steps", "2",
              "--width", "64", "--height", "64", "--seed", "3", "--prompt", "a red circle"]

    def pixels(path):
        with Image.open(path) as im:
            return im.convert("RGB").tobytes(), im.info["parameters"]

    assert main(["generate", *common, "--lora", "ink:1", "--out", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", *common, "--lora", "ink:1:lbw=IN04=0,M00=0.5", "--out", str(tmp_path / "lbw.png")]) == 0
    img, text = pixels(tmp_path / "lbw.png")
    assert img != pixels(tmp_path / "plain.png")[0]
    assert settings_from_infotext(text)["lora_block_weights"] == ["IN04=0,M00=0.5"]
    assert main(["generate", "--model", str(ws / "models" / "tiny"), "--lora-dir", str(ws / "loras"),
                 "--from-png", str(tmp_path / "lbw.png"), "--out", str(tmp_path / "again.png")]) == 0
    assert pixels(tmp_path / "again.png") == (img, text)

    demo = build_app(ws)
    try:
        (ui,) = [f.fn for f in demo.fns.values() if f.api_name == "generate"]
        cells = ["ink", 1.0, None] + ["", 1.0, None] * 3
        gallery, info = ui("models/tiny", "a red circle", "", 3, 2, 64, 64, 7.0, False, *cells,
                           None, False, False, "", 1, None, "in04=0,mid=0.5", "", "", "")
        assert pixels(gallery[0][0]) == (img, text) and "lbw=IN04=0,M00=0.5" in info
        with pytest.raises(gr.Error, match="unknown preset .OUTDD."):
            ui("models/tiny", "a red circle", "", 3, 2, 64, 64, 7.0, False, *cells,
               None, False, False, "", 1, None, "OUTDD", "", "", "")
    finally:
        demo.sd_lora_context.queue.shutdown()
