"""What an adapter method provides: the protocol every module of sd_lora.methods implements.

A method is one object (`METHOD` in its module) with two sides:

  files     the key suffixes of its modules and when a module is complete, rank and scale rules,
            the delta W (and which shape it has), how it comes out of / goes into PEFT-named files,
            whether it is exact low rank (merge by concatenation, resize by SVD of the factors)
  training  the PEFT config it injects, export from / import into PEFT layers, its size estimate,
            its `ss_network_module` / `ss_network_args`, the NetworkConfig rules only it has

Tensor dicts (`t`) are keyed by the suffix in the file ("lora_down.weight", "hada_w1_a", ...), as
in sd_lora.formats.lora_file.LoraModule. Defaults here suit a method whose delta does not depend on
the base weight; a subclass overrides what differs. Nothing here imports torch at module level, so
the registry and NetworkConfig stay importable without it.
"""

from __future__ import annotations

import re

# Suffixes every method may carry: the scale numerator, and DoRA's magnitude (LyCORIS puts it on
# LoRA, LoHa and LoKr modules alike; see dora.py).
SHARED_SUFFIXES = ("alpha", "dora_scale")
KOHYA_NETWORK = "networks.lora"  # kohya's own LoRA/LoCon module
LYCORIS_NETWORK = "lycoris.kohya"  # everything LyCORIS writes


def same_name_keys(names: tuple[str, ...]) -> tuple[tuple[re.Pattern, None], ...]:
    """PEFT keys of a method whose PEFT parameters carry the file suffixes' names (LoHa, LoKr):
    `<path>.<name>[.<adapter>]`; the suffix is the matched name (None = group 1)."""
    alternatives = "|".join(sorted(names, key=len, reverse=True))  # lokr_w1_a before lokr_w1
    return ((re.compile(rf"\.({alternatives})(?:\.[A-Za-z0-9_\-]+)?$"), None),)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Method:
    """One adapter method. Class attributes describe it; methods compute with its tensors."""

    name: str = ""
    kind: str = ""  # the registry name its files are read as (DoRA / AdaLoRA files are LoRA files)
    suffixes: tuple[str, ...] = ()  # file key suffixes only this method uses (the reader looks for them)
    # PEFT / diffusers key endings of this method: (regex on the key's end, our suffix or None for
    # the regex's group 1).
    peft_keys: tuple[tuple[re.Pattern, str], ...] = ()
    name_prefixes: dict[str, str] = {}  # module-name prefixes its writers use -> kohya's (oft_unet_ -> lora_unet_)
    network_module: str = LYCORIS_NETWORK  # ss_network_module of its files
    algo: str | None = None  # LyCORIS `algo` in ss_network_args
    needs_base: bool = False  # the delta depends on the base weight (it cannot be summed into a LoRA)
    loads_weights: bool = True  # load() can start a trained network from file tensors (network.init_lora)

    # ---- files ------------------------------------------------------------------------------
    def is_complete(self, t: dict) -> bool:
        raise NotImplementedError

    def rank(self, t: dict) -> int | None:
        return None

    def scale(self, t: dict) -> float:
        """alpha / rank as kohya and A1111 apply it; 1.0 without a rank or an alpha."""
        rank, a = self.rank(t), t.get("alpha")
        return 1.0 if rank is None or a is None else float(a.float().item()) / rank

    def delta(self, t: dict, shape, base=None):
        """The dense fp32 delta W of `shape` (tensors `t` already fp32 on the target device)."""
        raise NotImplementedError

    def delta_shape(self, t: dict) -> tuple[int, int | None]:
        """(out_features, numel) of the delta, from factor shapes alone (numel None: any input size)."""
        raise NotImplementedError

    def weight_shape(self, t: dict) -> tuple[int, ...] | None:
        """The base weight's full shape when the tensors say it (a conv kernel); None if only flat."""
        return None

    def shape(self, t: dict) -> tuple[int | None, ...]:
        """The delta's shape as the tensors give it, for messages: the whole weight shape where they
        say it (a conv kernel), else (out, in); in is None where any input width fits (OFT)."""
        full = self.weight_shape(t)
        if full is not None:
            return tuple(full)
        out, n = self.delta_shape(t)
        return (out, None if n is None else n // out)

    def in_features(self, t: dict) -> int | None:
        """The base layer's input width, when the tensors show it (architecture detection)."""
        return None

    def check(self, t: dict) -> tuple[int, ...]:
        """Raise if the tensors cannot make a delta; return its (out, rest) shape. Runs the delta on
        meta tensors (shapes only); a method may check faster by arithmetic."""
        import torch

        out, n = self.delta_shape(t)
        shape = (out, (n if n is not None else out) // out)
        meta = {k: v if k == "alpha" else torch.empty(v.shape, device="meta") for k, v in t.items() if k != "dora_scale"}
        base = torch.empty(shape, device="meta") if self.needs_base else None
        return tuple(self.delta(meta, shape, base).shape)

    def fits(self, t: dict, shape: tuple[int, ...]) -> bool:
        """True if the delta fits a base weight of exactly `shape`."""
        import torch

        meta = {k: (v if k == "alpha" else torch.empty(v.shape, device="meta")) for k, v in t.items() if k != "dora_scale"}
        try:
            return tuple(self.delta(meta, shape, torch.empty(shape, device="meta")).shape) == tuple(shape)
        except (RuntimeError, ValueError, IndexError, KeyError):
            return False

    def factors(self, t: dict):
        """(up, down) as 2-D fp32 when the delta is exactly up @ down * scale (plain LoRA), else None."""
        return None

    def scaled(self, t: dict, w: float) -> dict:
        """The tensors with the delta multiplied by `w` (every method here is linear in one tensor)."""
        raise NotImplementedError

    def bias_delta(self, t: dict):
        return None

    def from_peft(self, t: dict, alpha: float, r: float) -> dict:
        """Tensors of a PEFT-named module given PEFT's lora_alpha / r for it: keep PEFT's scale alpha / r."""
        import torch

        rank = self.rank(t)
        if rank is not None:
            t["alpha"] = torch.tensor(float(alpha) * rank / float(r or rank))
        return t

    def random_tensors(self, shape: tuple[int, ...], rank: int, generator) -> dict:
        """A seeded random module for a weight of `shape` (tests, benchmarks)."""
        raise NotImplementedError

    # ---- training (methods the registry table marks trainable) --------------------------------
    def validate(self, config) -> list[str]:
        """Problems with a NetworkConfig that only this method has."""
        return []

    def select(self, targets: list) -> list:
        """The targets this method can adapt (all by default)."""
        return targets

    def peft_config(self, config, common: dict, total_steps: int | None):
        raise ValueError(f"{self.name} files can be read and applied but not trained.")

    def hooks(self, layer, adapter: str, config) -> list:
        """Forward hooks this method adds to one PEFT layer (kohya's rank / module dropout; DoRA's
        input-axis scale, with the magnitude parameter it puts on the layer)."""
        return []

    def export(self, layer, adapter: str) -> dict:
        """One PEFT layer's adapter as file tensors (fp32, any device)."""
        raise NotImplementedError

    def load(self, layer, adapter: str, t: dict) -> None:
        """Copy file tensors into one PEFT layer's adapter (the inverse of export)."""
        raise ValueError(f"loading saved weights into a {self.name!r} network is not supported; use method 'lora'.")

    def file_params(self, target, rank: int, config=None) -> int | None:
        """Numbers this method stores for one target at `rank` under NetworkConfig `config` (None: not
        known in advance)."""
        return None

    def update(self, tuners: dict, step: int) -> None:
        """Per-step work after backward() (AdaLoRA's rank allocation); nothing by default."""

    def regularization_loss(self, named_params):
        return 0.0

    def config_network_args(self, config) -> dict[str, str]:
        """ss_network_args entries a run's NetworkConfig gives this method beyond network_args (DoRA's axis)."""
        return {}

    def network_args(self, alpha, conv_rank, conv_alpha) -> tuple[str, dict[str, str]]:
        """(ss_network_module, ss_network_args) of a file trained with this method."""
        args = {"algo": self.algo or self.name}
        if conv_rank is not None:
            args["conv_dim"] = str(conv_rank)
            args["conv_alpha"] = str(conv_alpha if conv_alpha is not None else alpha)
        return self.network_module, args
