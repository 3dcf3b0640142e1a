"""LoRA block weights: the `lbw=` syntax of hako-mikan's LoRA Block Weight extension for A1111/Forge
(the de-facto standard, also in ComfyUI's Inspire pack) and sdnext's `in=`/`mid=`/`out=`, read into
one per-block multiplier table that the stack fuser applies. The one place that knows blocks.

Facts from hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py at commit
b403cb7300f288360023c2a1978b86a361934e24 (README.md, same commit, "Weights"):
  * Block ids (BLOCKID26/17/12/20, lines 53-56): BASE is the text encoder(s); INnn / M00 / OUTnn are
    the SGM UNet's input_blocks.n / middle_block / output_blocks.n (its BLOCKS table, lines 61-88,
    matches module names on "diffusion_model_input_blocks_<n>_", "encoder", "embedders",
    "transformer_resblocks"). A vector is read by its length: 17 / 26 for SD1/SD2, 12 / 20 for SDXL.
  * `to26` (line 1365): the blocks a shorter vector does not list get 0, not 1 (README: "any layers
    not provided will be treated as having a weight of 0"). So the 17-value `ALL` zeroes IN00, IN03,
    IN06, IN09-IN11 and OUT00-OUT02, which hold only convolutions in SD1: use the 26-value form for a
    LoCon. Modules outside the blocks (time embedding, conv_out) are not matched (`ratiodealer`
    returns 1): they keep the UNet weight.
  * A module's weight is its UNet weight x the block's value (`lbwf`: `ratio * m`); BASE multiplies
    the text-encoder weight.
  * The default presets (DEF_WEIGHT_PRESET, lines 94-105) are 17-value vectors, below.
  * Tag syntax (`loradealer` / `syntaxdealer`, lines 881-985): `<lora:NAME:TE[:UNET]:lbw=ID>` with ID
    a preset name or a comma vector. Its `R`/`U` (random) and `X` (inherit) entries, `lbwe=`
    (elemental) and `start=`/`stop=`/`step=` are not supported here (fused weights are fixed for a
    whole image, and random weights would not be reproducible): they are refused by name.
sdnext (vladmandic/sdnext modules/lora/extra_networks_lora.py `parse`, commit
02268a4afc7f7a3b9c3ec05fd3e0a1cf1e849dca; network.py `NetworkModule.multiplier`, commit
0c7038e6cd1f0ecf3d033ea511bae4f83f115837): `in=` / `mid=` / `out=` are absolute UNet weights of
the down, mid and up blocks, each defaulting to the UNet weight; modules outside those blocks take
the `in` weight. (sdnext's newer modules/lora/lora_blocks.py `lbw=` stretches presets and leaves
unlisted slots at 1; we follow the A1111 extension, whose files users share.)

Our text form (what `normalize_block_weights` returns, the PNG's LoRAs field records and
`--lora FILE:W:lbw=...` takes): a preset name, a comma vector, or named pairs
`IN04=0.5,M00=0,OUT=1` (group names IN, OUT, MID and OTHER = modules outside the blocks; blocks not
named keep 1).
"""

from __future__ import annotations

import difflib
import math
import re

# Block ids in the extension's vector order (BLOCKID26 / BLOCKID17 / BLOCKID12 / BLOCKID20).
BLOCK_IDS_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCK_IDS_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
BLOCK_IDS_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
BLOCK_IDS_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
BLOCK_LISTS = {17: BLOCK_IDS_17, 26: BLOCK_IDS_26, 12: BLOCK_IDS_12, 20: BLOCK_IDS_20}
# Which vector lengths fit which architecture family (sd_lora.models arch names).
LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sd2-v": (17, 26), "sdxl": (12, 20)}
OTHER = "OTHER"  # UNet modules outside the numbered blocks (time embedding, conv_out, ...)
GROUPS = {"IN": [f"IN{i:02d}" for i in range(12)], "OUT": [f"OUT{i:02d}" for i in range(12)]}

# The extension's default presets (DEF_WEIGHT_PRESET), all 17-value SD1/SD2 vectors.
BLOCK_PRESETS: dict[str, tuple[float, ...]] = {
    name: tuple(float(x) for x in vector.split(","))
    for name, vector in (
        ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
        ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
        ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
        ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
        ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
        ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
        ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
        ("ALL0.5", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
    )
}

_BLOCK = re.compile(r"^(BASE|IN\d\d|M00|OUT\d\d)$")


def _number(text: str, where: str) -> float:
    t = text.strip()
    if t[:1] in ("R", "U", "X"):
        raise ValueError(f"{where}: {t!r} (random or inherited weights of the LoRA Block Weight extension) is not "
                         "supported: fused weights must be reproducible; write a number")
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"{where}: {t!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {t!r} must be a finite number")
    return value


def _exact(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _key(name: str, where: str) -> str:
    key = str(name).strip().upper()
    key = "M00" if key == "MID" else key
    if key in GROUPS or key == OTHER or _BLOCK.match(key):
        return key
    raise ValueError(f"{where}: unknown block {name!r}; use BASE, IN00..IN11, M00 (or MID), OUT00..OUT11, "
                     "the groups IN / OUT, or OTHER (UNet modules outside the blocks)")


def parse_block_weights(value, where: str = "lbw") -> tuple[float, ...] | dict[str, float]:
    """An `lbw=` value (preset name, comma vector or `BLOCK=w,...` pairs; or a list / dict already)
    -> a vector (tuple of 12, 17, 20 or 26 numbers) or {block or group: multiplier}.

    Errors name the problem: an unknown preset (with the closest names), a vector whose length no
    layout has, a bad number or block name."""
    if isinstance(value, dict):
        return {_key(k, where): _number(str(v), f"{where} {k}") if not isinstance(v, (int, float)) else _finite(v, where)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        vector = tuple(_finite(v, where) if isinstance(v, (int, float)) else _number(str(v), where) for v in value)
        return _check_length(vector, where)
    if not isinstance(value, str):
        raise TypeError(f"{where}: block weights must be a preset name, a vector or a dict, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"{where}: empty block weights; write a preset name ({', '.join(BLOCK_PRESETS)}) or a vector")
    if "=" in text:
        out: dict[str, float] = {}
        for part in text.split(","):
            name, eq, number = part.partition("=")
            if not eq:
                raise ValueError(f"{where}: {part.strip()!r} in {text!r}: write BLOCK=WEIGHT pairs, e.g. IN04=0.5,M00=0")
            out[_key(name, where)] = _number(number, f"{where} {name.strip()}")
        return out
    if "," in text:
        return _check_length(tuple(_number(x, where) for x in text.split(",")), where)
    preset = {k.upper(): k for k in BLOCK_PRESETS}.get(text.upper())
    if preset:
        return BLOCK_PRESETS[preset]
    close = difflib.get_close_matches(text.upper(), list(BLOCK_PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"{where}: unknown preset {text!r}.{hint} Presets: {', '.join(BLOCK_PRESETS)}; or write a vector of "
                     "17 or 26 (SD1/SD2) or 12 or 20 (SDXL) numbers")


def _finite(v, where: str) -> float:
    if isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{where}: {v!r} is not a finite number")
    return float(v)


def _check_length(vector: tuple[float, ...], where: str) -> tuple[float, ...]:
    if len(vector) not in BLOCK_LISTS:
        raise ValueError(f"{where}: {len(vector)} numbers; the LoRA Block Weight vectors have 17 or 26 (SD1/SD2) "
                         "or 12 or 20 (SDXL) numbers. Or name blocks: IN04=0.5,M00=0")
    return vector


def normalize_block_weights(value, where: str = "lbw") -> str:
    """The canonical text of block weights (checked): a preset's name, a comma vector, or `BLOCK=w`
    pairs. Tags, `--lora` and the PNG's LoRAs field all go through it, so one choice reads the same."""
    if isinstance(value, str) and "=" not in value and "," not in value:
        parse_block_weights(value, where)
        return {k.upper(): k for k in BLOCK_PRESETS}[value.strip().upper()]
    parsed = parse_block_weights(value, where)
    if isinstance(parsed, dict):
        return ",".join(f"{k}={_exact(v)}" for k, v in parsed.items())
    return ",".join(_exact(v) for v in parsed)


def block_options(unet: float, lbw: str | None = None, in_: float | None = None, mid: float | None = None,
                  out: float | None = None, where: str = "lbw") -> tuple[float, str | None]:
    """(UNet weight, canonical block weights or None) of a LoRA named with `lbw=` or sdnext's
    `in=`/`mid=`/`out=` (the prompt tag and `--lora` both call this).

    sdnext's values are absolute UNet weights of the down / mid / up blocks, each defaulting to the
    UNet weight, and modules outside those blocks take the `in` weight: so the UNet weight becomes 1
    and they become the multipliers."""
    if in_ is None and mid is None and out is None:
        return unet, None if lbw is None else normalize_block_weights(lbw, where)
    if lbw is not None:
        raise ValueError(f"{where}: use either lbw= or in=/mid=/out=, not both")
    i, m, o = (unet if x is None else x for x in (in_, mid, out))
    return 1.0, normalize_block_weights({"IN": i, "M00": m, "OUT": o, OTHER: i}, where)


def block_multipliers(value, arch: str | None = None, where: str = "block_weights") -> dict[str, float]:
    """{block id or OTHER: multiplier} for block weights in any accepted form; a block not in the
    result keeps 1. With `arch` (sd1 / sd2 / sd2-v / sdxl) a vector must have that family's length.

    A vector sets every block, the ones it does not list to 0 (the extension's `to26`); named pairs
    set only the blocks named (groups first, then single blocks, whatever the order written)."""
    if value is None:
        return {}
    parsed = parse_block_weights(value, where)
    if isinstance(parsed, dict):
        out: dict[str, float] = {}
        for key, v in parsed.items():  # groups first, so `IN=0,IN04=1` and `IN04=1,IN=0` agree
            for block in GROUPS.get(key, []):
                out[block] = v
        out.update({k: v for k, v in parsed.items() if k not in GROUPS})
        return out
    if arch in LENGTHS and len(parsed) not in LENGTHS[arch]:
        family = "SDXL" if arch == "sdxl" else "SD1/SD2"
        fits = " or ".join(str(n) for n in LENGTHS[arch])
        preset = " (the named presets are 17-value SD1/SD2 vectors)" if len(parsed) == 17 else ""
        raise ValueError(
            f"{where}: a {len(parsed)}-value block weight vector{preset} does not fit this {family} model: use {fits} "
            f"numbers, in the order {', '.join(BLOCK_LISTS[LENGTHS[arch][0]])}")
    listed = dict(zip(BLOCK_LISTS[len(parsed)], parsed))
    return {block: listed.get(block, 0.0) for block in BLOCK_IDS_26}


def unet_block_id(sgm_path: str) -> str | None:
    """Block id (IN04, M00, OUT11) of a UNet module from its SGM path, None for modules outside blocks."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", sgm_path)
    if not m:
        return None
    if m[1] == "middle_block":
        return "M00"
    return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
