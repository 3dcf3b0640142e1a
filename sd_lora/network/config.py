"""NetworkConfig: what adapter to train, where, and how big. Plain values, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..methods import get as get_method
from ..methods import trainable_method_names

METHODS = trainable_method_names()
PRESETS = ("attention", "kohya", "full")
BLOCKS = ("down", "mid", "up")


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
    """

    method: str = "lora"
    preset: str = "kohya"
    rank: int = 32
    alpha: float = 16.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = True
    block_ranks: dict[str, int] | None = None
    block_alphas: dict[str, float] | None = None
    # AdaLoRA only: the training length its rank schedule is planned over, and the average rank
    # to end with (PEFT's target_r). Ignored by the other methods.
    adalora_total_steps: int | None = None
    adalora_target_rank: int | None = None

    def validate(self) -> list[str]:
        """Every problem with these values, as sentences a user can act on (empty list if fine)."""
        errors = []
        if self.method not in METHODS:
            errors.append(f"network method {self.method!r} is not supported; choose one of {', '.join(METHODS)}.")
        if self.preset not in PRESETS:
            errors.append(f"target preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}.")
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                errors.append(f"{name} must be a whole number >= 1 (got {value!r}); 16-32 is typical for SD1.5.")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                errors.append(f"{name} must be a number > 0 (got {value!r}); rank/2 or rank is usual.")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                errors.append(f"{name} must be in [0, 1) (got {value!r}).")
        if not self.train_unet and not self.train_text_encoder:
            errors.append("nothing to train: set train_unet or train_text_encoder (or both) to true.")
        for field_name, values, kind in (("block_ranks", self.block_ranks, int), ("block_alphas", self.block_alphas, float)):
            if values is None:
                continue
            if not isinstance(values, dict):
                errors.append(f"{field_name} must map block names ({', '.join(BLOCKS)}) to numbers, e.g. {{'down': 8, 'up': 16}}.")
                continue
            for block, v in values.items():
                if block not in BLOCKS:
                    errors.append(f"{field_name}: unknown block {block!r}; use {', '.join(BLOCKS)}.")
                elif kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    errors.append(f"{field_name}[{block!r}] must be a whole number >= 1 (got {v!r}).")
                elif kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                    errors.append(f"{field_name}[{block!r}] must be a number > 0 (got {v!r}).")
        if self.method in METHODS:
            errors += get_method(self.method).validate(self)  # rules only that method has
        return errors

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

    def rank_alpha_for(self, block: str | None, is_conv3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of one module, given its UNet block family ("down"/"mid"/"up" or None)."""
        if is_conv3x3:
            return self.effective_conv_rank, self.effective_conv_alpha
        rank = (self.block_ranks or {}).get(block, self.rank) if block else self.rank
        alpha = (self.block_alphas or {}).get(block, self.alpha) if block else self.alpha
        return int(rank), float(alpha)

    def to_dict(self) -> dict:
        return asdict(self)
