"""EMA of the adapter weights: a moving average saved as its own file beside each LoRA.

diffusers' `EMAModel` (diffusers/training_utils.py, 0.42) does the math, so the decay and its warm-up
are the ones diffusers' example scripts use:

    update k (k = 1, 2, ...: one per `ema_update_every` optimizer steps)
    ema_1 = w                                 (EMAModel's first decay is 0: the EMA starts at the weights)
    ema_k = ema_{k-1} - (1 - d_k) (ema_{k-1} - w)
    d_k   = ema_decay                     ema_warmup off (min_decay = decay pins it)
    d_k   = min(ema_decay, 1 - k ** -2/3)  ema_warmup on (use_ema_warmup, inv_gamma 1, power 2/3:
                                          EMAModel.get_decay's 1 - (1 + (k - 1) / inv_gamma) ** -power)

It fits adapter parameters as they are (a flat list of tensors), and its state_dict (shadow tensors +
update count) is all a resume needs: this module saves it in the checkpoint and loads only those two,
so a resumed run with a changed `ema_decay` uses the new one.
"""

from __future__ import annotations

import contextlib

import torch

EMA_METADATA_KEY = "sd_lora.ema"  # "true" in an EMA file; its other metadata is the raw file's (ema_decay in sd_lora.config)
WARMUP_POWER = 2 / 3  # diffusers' default; crowsonkb's value for long runs (EMAModel docstring)


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, update_every: int = 1, warmup: bool = False):
        from diffusers.training_utils import EMAModel

        self.params, self.update_every = list(params), update_every
        self.ema = EMAModel(self.params, decay=decay, min_decay=0.0 if warmup else decay,
                            use_ema_warmup=warmup, inv_gamma=1.0, power=WARMUP_POWER)

    def after_step(self, step: int) -> None:
        """Call after optimizer step `step` (counted from 1): updates every `update_every` steps."""
        if step % self.update_every == 0:
            self.ema.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the adapters hold the EMA weights. After: the training weights, bit for bit."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict:
        return {"optimization_step": self.ema.optimization_step, "shadow_params": self.ema.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.params) or any(s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise ValueError("the checkpoint's EMA weights do not fit this network; resume with the same network settings")
        self.ema.optimization_step = int(state["optimization_step"])
        self.ema.shadow_params = [s.to(p.device, p.dtype) for s, p in zip(shadow, self.params)]
