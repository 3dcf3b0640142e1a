"""NetworkConfig: what adapter to train, where, and how big. Plain values, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from ..fields import describe, keys_of, problems, setting
from .blocks import block_problems, family_alphas

PRESETS = ("attention", "kohya", "full")  # what each selects: sd_lora/network/presets.py
BLOCKS = ("down", "mid", "up")
DORA_AXES = ("input", "output")


def _trainable_methods() -> tuple[str, ...]:
    # read from the method registry when asked (torch-free), so a new method needs no edit here
    from ..methods import trainable_method_names

    return trainable_method_names()


@dataclass
class NetworkConfig:
    """The adapter network to inject into a pipeline.

    method: "lora" (LoRA; LoCon on conv layers), "dora" (LoRA with weight decomposition),
        "loha" / "lokr" (LyCORIS Hadamard / Kronecker products), "adalora" (LoRA whose ranks are
        re-allocated during training and saved as a plain LoRA with per-module ranks).
    preset: which modules get an adapter (see sd_lora.network.presets): "attention", "kohya"
        (kohya's default: every Linear / 1x1 conv in the transformer blocks + text encoder attention
        and MLP) or "full" (adds the ResNet convs: LoCon).
    rank / alpha: scale applied is alpha / rank, as in kohya and PEFT.
    conv_rank / conv_alpha: for 3x3 convs ("full" preset); default rank / alpha.
    dropout: dropout on the adapter input; rank_dropout: drop whole rank channels per sample;
        module_dropout: skip the whole adapter of a module for a step (kohya / LyCORIS semantics).
    block_ranks / block_alphas: per UNet block family, e.g. {"down": 8, "mid": 16, "up": 32}
        (modules outside the blocks and the text encoders keep rank / alpha).
    block_dims / block_alphas / conv_block_dims / conv_block_alphas, down/mid/up_lr_weight,
        block_lr_zero_threshold: kohya's per-block settings over its block numbering (network/blocks.py).
    init_lora: a LoRA file the adapters start from (network/init_lora.py).
    """

    method: str = setting("lora", "adapter method", choices=_trainable_methods)
    preset: str = setting("kohya", "which modules get an adapter: attention, kohya (kohya's default) or full (adds the "
                          "ResNet convs: LoCon)", choices=PRESETS)
    rank: int = setting(32, "adapter rank (dim); 16-32 is typical for SD1.5", kohya=("network_dim",), minimum=1)
    alpha: float = setting(16.0, "adapter alpha; the scale applied is alpha / rank", kohya=("network_alpha",))
    conv_rank: int | None = setting(None, "rank of 3x3 convs (full preset)", default_text="rank", minimum=1)
    conv_alpha: float | None = setting(None, "alpha of 3x3 convs (full preset)", default_text="alpha")
    dropout: float = setting(0.0, "dropout on the adapter input", kohya=("network_dropout",), ss="ss_network_dropout")
    rank_dropout: float = setting(0.0, "probability of dropping each rank channel per sample")
    module_dropout: float = setting(0.0, "probability of skipping a module's whole adapter for a step")
    train_unet: bool = setting(True, "train adapters on the UNet", kohya={"network_train_text_encoder_only": False})
    train_text_encoder: bool = setting(True, "train adapters on the text encoder(s)", kohya={"network_train_unet_only": False})
    block_ranks: dict[str, int] | None = setting(None, "rank per UNet block family, e.g. {\"down\": 8, \"mid\": 16, \"up\": 32}",
                                                  default_text="rank")
    block_alphas: str | dict[str, float] | list[float] | None = setting(
        None, "alpha per UNet block family like block_ranks ({\"up\": 16}), or per block as kohya's block_alphas (25 values "
        "for SD1/SD2, 23 for SDXL: \"2,2,4,...\")", default_text="alpha")
    # block-wise dims and learning-rate weights, as kohya's network_args spell them (sd_lora/network/blocks.py;
    # the block table is in docs/training.md)
    block_dims: str | list[int] | None = setting(
        None, "rank per UNet block (kohya's block_dims: 25 values for SD1/SD2, 23 for SDXL; 0 leaves a block out), "
        "e.g. \"2,4,4,4,8,...\"", default_text="rank")
    conv_block_dims: str | list[int] | None = setting(
        None, "rank of the 3x3 convs per UNet block (preset full; kohya's conv_block_dims; 0 leaves them out)",
        default_text="conv_rank")
    conv_block_alphas: str | list[float] | None = setting(
        None, "alpha of the 3x3 convs per UNet block (kohya's conv_block_alphas)", default_text="conv_alpha")
    down_lr_weight: str | list[float] | None = setting(
        None, "LR multiplier per down block (12 values for SD1/SD2, 9 for SDXL, missing ones 1), or a curve: sine, "
        "cosine, linear, reverse_linear, zeros, with \"+0.5\" added (kohya's down_lr_weight)", default_text="1")
    mid_lr_weight: str | float | list[float] | None = setting(
        None, "LR multiplier of the mid block (SDXL: 3 values; kohya's mid_lr_weight)", default_text="1")
    up_lr_weight: str | list[float] | None = setting(
        None, "LR multiplier per up block, like down_lr_weight (kohya's up_lr_weight)", default_text="1")
    block_lr_zero_threshold: float = setting(
        0.0, "LR weights at or below this become 0, and a block at 0 gets no modules (kohya's block_lr_zero_threshold)")
    # continue training from an existing LoRA file (kohya's --network_weights; sd_lora/network/init_lora.py)
    init_lora: str | None = setting(
        None, "start from this LoRA file (ours, kohya, LyCORIS, diffusers or PEFT): the network must have its method, "
        "ranks, alphas and modules", path="file", kohya=("network_weights",))
    # AdaLoRA only: the training length its rank schedule is planned over, and the average rank
    # to end with (PEFT's target_r). Ignored by the other methods.
    adalora_total_steps: int | None = setting(None, "adalora: steps its rank schedule is planned over", unit="steps",
                                              default_text="the run's steps")
    adalora_target_rank: int | None = setting(None, "adalora: average rank to end with (PEFT's target_r)")
    # DoRA only: the axis of its magnitude (sd_lora/methods/dora.py). Ignored by the other methods.
    dora_axis: str = setting("input", "dora: magnitude per input column (A1111, Forge and ComfyUI apply it as trained) "
                             "or per output row (PEFT/diffusers' form: only diffusers, PEFT and sd-lora apply it as trained)",
                             choices=DORA_AXES)

    def validate(self) -> list[str]:
        """Every problem with these values, as 'key: what is wrong; what to do' (empty list if fine)."""
        keys = network_keys()
        generic = problems(self, keys, None)  # types, choices, minimums (from the field declarations)
        errors = []
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and isinstance(value, (int, float)) and value <= 0:
                errors.append(f"{name}: must be a number > 0 (got {value!r}); rank/2 or rank is usual")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
                errors.append(f"{name}: must be in [0, 1) (got {value!r})")
        if not self.train_unet and not self.train_text_encoder:
            errors.append("train_unet/train_text_encoder: nothing to train; set one of them (or both) to true")
        errors += block_problems(self)
        for field_name, values, kind in (("block_ranks", self.block_ranks, int), ("block_alphas", family_alphas(self.block_alphas), float)):
            if not isinstance(values, dict):
                continue
            for block, v in values.items():
                if block not in BLOCKS:
                    errors.append(f"{field_name}: unknown block {block!r}; use {', '.join(BLOCKS)}")
                elif kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    errors.append(f"{field_name}: [{block!r}] must be a whole number >= 1 (got {v!r})")
                elif kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                    errors.append(f"{field_name}: [{block!r}] must be a number > 0 (got {v!r})")
        if self.method in _trainable_methods():
            from ..methods import get as get_method

            errors += get_method(self.method).validate(self)  # rules only that method has
        bad = {m.split(":", 1)[0] for m in generic}
        return generic + [m for m in errors if not (keys_of(m) & bad)]

    def check(self) -> None:
        """Raise ValueError listing every problem at once."""
        errors = self.validate()
        if errors:
            raise ValueError("invalid network settings:\n  - " + "\n  - ".join(errors))

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank if self.conv_rank is not None else self.rank

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.conv_alpha if self.conv_alpha is not None else self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def network_keys():
    """The self-describing keys of NetworkConfig (names without the `network.` prefix)."""
    return describe(NetworkConfig, {})
