"""kohya's UNet block numbering, and the per-block dims, alphas and learning-rate weights built on it.

kohya sd-scripts networks/lora.py (at 48d368fa557731ad0488c07304dfeba8c07910eb): `get_block_index`,
`get_block_dims_and_alphas`, `get_block_lr_weight`, `remove_block_dims_and_alphas`, and the
"階層別学習率 / 階層別dim" sections of docs/train_network_README-ja.md. The rules, written out here:

SD1 / SD2, 25 blocks, from the module's kohya name (diffusers layout, `lora_unet_down_blocks_1_...`):
    down_blocks.i.{resnets|attentions}.j -> 1 + 3i + j    down_blocks.i.downsamplers -> 1 + 3i + 2
    mid_block                            -> 12
    up_blocks.i.{resnets|attentions}.j   -> 13 + 3i + j   up_blocks.i.upsamplers     -> 13 + 3i + 2
  so block 0 (IN00, conv_in) never has a LoRA module; A1111's block names IN00-IN11, MID, OUT00-OUT11.
SDXL, 23 blocks, from the SGM name (`lora_unet_input_blocks_4_1_...`):
    time_embed / label_emb -> 0, input_blocks.n -> 1 + n (n 0-8), middle_block.n -> 10 + n (n 0-2),
    output_blocks.n -> 13 + n (n 0-8), out -> 22.

Linear and 1x1-conv modules take `block_dims` / `block_alphas`, 3x3 convs `conv_block_dims` /
`conv_block_alphas` (else conv_rank / conv_alpha). A dim of 0 leaves the block's modules out. The LR
weights are given per family (down, mid, up: 12/1/12 values for SD1, 9/3/9 for SDXL, or for down/up a
curve: sine, cosine, linear, reverse_linear, zeros, "+x" added); a weight <= `block_lr_zero_threshold`
becomes 0, and a block whose weight is 0 gets no modules at all, as in kohya. Text-encoder modules
are outside the blocks: rank / alpha and the text encoder's rate.

Torch-free (NetworkConfig validates with it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SDXL = "sdxl"
# (blocks in all, per down/up family, in the mid family, index of the first down-family block)
_COUNTS = {"sd": (25, 12, 1, 0), SDXL: (23, 9, 3, 1)}
LR_CURVES = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_RE_SGM = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")


def _family(arch: str) -> str:
    return SDXL if arch == SDXL else "sd"


def num_blocks(arch: str) -> int:
    """How many values block_dims / block_alphas / conv_block_* take for this architecture (25 or 23)."""
    return _COUNTS[_family(arch)][0]


def block_index(kohya_name: str, arch: str) -> int | None:
    """kohya's block number of a UNet module (its get_block_index), None outside the numbered blocks."""
    if not kohya_name.startswith("lora_unet_"):
        return None
    if _family(arch) == SDXL:
        name = kohya_name[len("lora_unet_"):]
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        if name.startswith("out_"):
            return 22
        m = _RE_SGM.match(kohya_name)
        if not m:
            return None
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
    m = _RE_UPDOWN.search(kohya_name)
    if m:
        i, kind, j = int(m[2]), m[3], int(m[4])
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if m[1] == "down" else 13 + idx
    if "mid_block_" in kohya_name:
        return 12
    return None


def block_family(index: int | None, arch: str) -> str | None:
    """"down" / "mid" / "up" of a block number (None for SDXL's embedding and out blocks)."""
    if index is None:
        return None
    _, n, n_mid, first = _COUNTS[_family(arch)]
    if first <= index < first + n:
        return "down"
    if first + n <= index < first + n + n_mid:
        return "mid"
    if first + n + n_mid <= index < first + 2 * n + n_mid:
        return "up"
    return None


def block_label(index: int, arch: str) -> str:
    """The block's name in the docs table and in parameter-group names: IN04, MID, OUT11 (SDXL: MID00-02, EMB, END)."""
    _, n, n_mid, first = _COUNTS[_family(arch)]
    family = block_family(index, arch)
    if family == "down":
        return f"IN{index - first:02d}"
    if family == "mid":
        return "MID" if n_mid == 1 else f"MID{index - first - n:02d}"
    if family == "up":
        return f"OUT{index - first - n - n_mid:02d}"
    return "EMB" if index == 0 else "END"


# ---- values as users write them --------------------------------------------------------------------

def parse_numbers(value, kind: type = float) -> list | None:
    """A list of numbers from kohya's "2,4,4" string, a single number or a list; None when unset.

    An empty item ("1,,1") is 0, as kohya's parse_block_lr_kwargs reads it. Raises ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be numbers, not {value!r}")
    if isinstance(value, (int, float)):
        items = [value]
    elif isinstance(value, str):
        items = [s.strip() or "0" for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"must be a list of numbers or a comma-separated string, not {value!r}")
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number") from None
        if isinstance(item, bool) or number != number:
            raise ValueError(f"{item!r} is not a number")
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"{item!r} is not a whole number")
            number = int(number)
        out.append(number)
    return out


def lr_curve(spec: str, n: int) -> list[float] | None:
    """kohya's named LR-weight curves over `n` blocks (shallow -> deep), "+x" adds x; None if not a curve name."""
    name, _, plus = spec.partition("+")
    name = name.strip()
    if name not in LR_CURVES:
        return None
    base = float(plus) if plus.strip() else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    values = {
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * n,
    }[name]
    return [v + base for v in values]


def family_lr_weights(value, n: int, curves: bool) -> list[float] | None:
    """One family's LR weights: a curve name (down/up) or numbers, padded with 1.0 to `n` (kohya pads too)."""
    if value is None:
        return None
    if curves and isinstance(value, str) and value.split("+", 1)[0].strip() in LR_CURVES:
        return lr_curve(value, n)
    weights = parse_numbers(value, float)
    if len(weights) > n:
        raise ValueError(f"has {len(weights)} values; this architecture has {n} blocks there")
    return weights + [1.0] * (n - len(weights))


def family_alphas(value) -> dict | None:
    """block_alphas as a family table ({"up": 16}; a JSON object string from a flag or form), else None."""
    if isinstance(value, str) and value.strip().startswith("{"):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


_PER_BLOCK = {"block_dims": (int, 0), "block_alphas": (float, None), "conv_block_dims": (int, 0), "conv_block_alphas": (float, None)}


def block_problems(config) -> list[str]:
    """The problems of a NetworkConfig's per-block settings ('key: what; what to do'), before the
    architecture is known: lengths are checked against both 25 (SD1/SD2) and 23 (SDXL)."""
    errors = []
    counts = sorted({c[0] for c in _COUNTS.values()}, reverse=True)
    for key, (kind, low) in _PER_BLOCK.items():
        value = getattr(config, key)
        if value is None or (key == "block_alphas" and family_alphas(value) is not None):
            continue
        if isinstance(value, str) and value.strip().startswith("{"):
            errors.append(f"{key}: {value!r} is not a valid JSON table")
            continue
        try:
            values = parse_numbers(value, kind)
        except ValueError as e:
            errors.append(f"{key}: {e}; write {'whole numbers' if kind is int else 'numbers'} separated by commas")
            continue
        if len(values) not in counts:
            errors.append(f"{key}: has {len(values)} values; give one per UNet block: {counts[0]} for SD1/SD2, {counts[1]} "
                          "for SDXL (the block table is in docs/training.md)")
        elif low == 0 and any(v < 0 for v in values):
            errors.append(f"{key}: ranks must be >= 0 (0 leaves the block out)")
        elif low is None and any(v <= 0 for v in values):
            errors.append(f"{key}: alphas must be > 0")
    if config.block_dims is not None and config.block_ranks:
        errors.append("block_ranks/block_dims: both set; use block_dims (per block) or block_ranks (per family), not both")
    if (config.conv_block_dims is not None or config.conv_block_alphas is not None) and config.preset != "full":
        errors.append(f"conv_block_dims/conv_block_alphas: only 3x3 convs take them, and preset {config.preset!r} adapts "
                      "none; set preset = \"full\"")
    most = max(c[1] for c in _COUNTS.values())
    for key, n, curves in (("down_lr_weight", most, True), ("mid_lr_weight", max(c[2] for c in _COUNTS.values()), False),
                           ("up_lr_weight", most, True)):
        value = getattr(config, key)
        try:
            weights = family_lr_weights(value, n, curves)
        except ValueError as e:
            hint = f"numbers or one of {', '.join(LR_CURVES)} (with +x)" if curves else "numbers"
            errors.append(f"{key}: {e}; write {hint}")
            continue
        if weights is not None and any(w < 0 for w in weights):
            errors.append(f"{key}: weights must be >= 0")
    return errors


# ---- the plan for one network ----------------------------------------------------------------------

BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")


@dataclass(frozen=True)
class BlockPlan:
    """Per-block (rank, alpha) of Linear/1x1 and of 3x3-conv modules, and LR weights, for one architecture.

    The one rule for every UNet module: `block_ranks` / `block_alphas` (per family) and kohya's
    `block_dims` ... (per block) are both expressed as these lists; text-encoder modules and modules
    outside the numbered blocks keep rank / alpha (conv_rank / conv_alpha for 3x3 convs).
    """

    arch: str
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int]
    conv_alphas: list[float]
    lr_weights: list[float] | None  # None: every block at the UNet rate (one parameter group)
    default: tuple[int, float]
    conv_default: tuple[int, float]

    def rank_alpha(self, index: int | None, conv3x3: bool) -> tuple[int, float]:
        if index is None or not 0 <= index < len(self.dims):
            return self.conv_default if conv3x3 else self.default
        if conv3x3:
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]

    def lr_weight(self, index: int | None) -> float:
        if self.lr_weights is None or index is None or not 0 <= index < len(self.lr_weights):
            return 1.0
        return self.lr_weights[index]


def block_plan(config, arch: str) -> BlockPlan:
    """The BlockPlan of a NetworkConfig on `arch`; ValueError naming the key when a list has the wrong length."""
    total, n, n_mid, first = _COUNTS[_family(arch)]
    rank, alpha = int(config.rank), float(config.alpha)
    conv = (int(config.effective_conv_rank), float(config.effective_conv_alpha))

    def full(key, kind, fallback):
        values = parse_numbers(getattr(config, key), kind)
        if values is None:
            return list(fallback)
        if len(values) != total:
            layout = ("0: time/label embedding, 1-9: input blocks, 10-12: mid, 13-21: output blocks, 22: out"
                      if total == 23 else "IN00-IN11, MID, OUT00-OUT11")
            raise ValueError(f"network.{key}: has {len(values)} values; a {arch} UNet has {total} blocks ({layout}); "
                             "see the block table in docs/training.md")
        return values

    # block_ranks / block_alphas: a value per family, the same lists with the family's blocks filled in
    families = [block_family(i, arch) for i in range(total)]
    by_family = family_alphas(config.block_alphas)
    dims = full("block_dims", int, [(config.block_ranks or {}).get(f, rank) if f else rank for f in families])
    if by_family is not None:
        alphas = [float(by_family.get(f, alpha)) if f else alpha for f in families]
    else:
        alphas = full("block_alphas", float, [alpha] * total)
    conv_dims = full("conv_block_dims", int, [conv[0]] * total)
    conv_alphas = full("conv_block_alphas", float, [conv[1]] * total)

    lr = None
    if any(getattr(config, k) is not None for k in LR_KEYS):
        threshold = float(config.block_lr_zero_threshold)
        weights = []
        for key, size, curves in (("down_lr_weight", n, True), ("mid_lr_weight", n_mid, False), ("up_lr_weight", n, True)):
            try:
                given = family_lr_weights(getattr(config, key), size, curves)
            except ValueError as e:
                raise ValueError(f"network.{key}: {e}") from None
            # kohya thresholds the families that were given; the others stay at 1.0
            weights += [1.0] * size if given is None else [w if w > threshold else 0.0 for w in given]
        lr = [1.0] * first + weights + [1.0] * (total - first - len(weights))
        # kohya's remove_block_dims_and_alphas: a block that would not learn gets no modules
        dims = [0 if w == 0 else d for d, w in zip(dims, lr)]
        conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr)]
    return BlockPlan(arch, dims, alphas, conv_dims, conv_alphas, lr, (rank, alpha), conv)


def uses_blocks(config) -> bool:
    """Any per-block setting is given (block_ranks / block_alphas included)."""
    return any(getattr(config, k) is not None for k in BLOCK_KEYS + LR_KEYS) or bool(config.block_ranks)


def network_args(config, plan: BlockPlan, convs: bool) -> dict[str, str]:
    """The block settings as kohya writes them in ss_network_args: the resolved per-block lists (so a kohya
    run with these network_args builds the same modules), and the LR weights as given."""
    if not uses_blocks(config):
        return {}
    join = lambda values: ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)  # noqa: E731
    args = {"block_dims": join(plan.dims), "block_alphas": join(plan.alphas)}
    if convs:
        args.update(conv_block_dims=join(plan.conv_dims), conv_block_alphas=join(plan.conv_alphas))
    for key in LR_KEYS:
        value = getattr(config, key)
        if value is not None:
            args[key] = value if isinstance(value, str) else join(parse_numbers(value, float))
    if plan.lr_weights is not None:
        args["block_lr_zero_threshold"] = f"{float(config.block_lr_zero_threshold):g}"
    return args


def split_by_lr_weight(params, lr_weights: dict | None) -> list[tuple[str, float, list]]:
    """(group-name suffix, LR multiplier, parameters) parts of `params` by LoraNetwork.lr_weights()
    (id(parameter) -> (block label, weight)): one part per block ("_IN04"), as kohya's per-block groups
    (unet_block{idx}); one unnamed part at 1.0 without weights."""
    if not lr_weights:
        return [("", 1.0, list(params))]
    parts: dict[str, tuple[float, list]] = {}
    for p in params:
        label, weight = lr_weights.get(id(p), ("", 1.0))
        parts.setdefault(label, (weight, []))[1].append(p)
    return [(f"_{label}" if label else "", weight, ps) for label, (weight, ps) in parts.items()]
