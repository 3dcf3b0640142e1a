"""AdaLoRA (PEFT): LoRA whose ranks are re-allocated during training, saved as a plain LoRA.

PEFT's layer holds delta = B @ (A * E) * alpha / (r + 1e-5), with E the singular values the allocator
prunes. The file keeps the ranks left non-zero and writes a kohya LoRA whose alpha / rank gives the
same scale, so every loader reads it as an ordinary LoRA with per-module ranks.
"""

from __future__ import annotations

import logging

from .base import KOHYA_NETWORK
from .lora import DOWN, UP, LoraMethod

logger = logging.getLogger(__name__)


class AdaLoraMethod(LoraMethod):
    name = "adalora"
    kind = "lora"
    suffixes = ()
    peft_keys = ()
    network_module = KOHYA_NETWORK
    loads_weights = False  # its ranks are allocated during training (load() below)

    def validate(self, config):
        errors = []
        if config.rank_dropout or config.module_dropout:
            errors.append("method: adalora does not support rank_dropout / module_dropout; set them to 0")
        if (config.block_ranks or config.block_alphas or config.block_dims is not None or config.conv_block_dims is not None
                or config.conv_block_alphas is not None):
            errors.append("method: adalora allocates ranks itself; remove block_ranks / block_alphas / block_dims / "
                          "conv_block_dims / conv_block_alphas (the LR weights work)")
        if config.init_lora:
            errors.append("method: adalora cannot start from a LoRA file (init_lora); use method \"lora\"")
        if isinstance(config.adalora_target_rank, int) and isinstance(config.rank, int) and not (1 <= config.adalora_target_rank <= config.rank):
            errors.append(f"adalora_target_rank: must be between 1 and rank ({config.rank})")
        return errors

    def select(self, targets):
        import torch.nn as nn

        # PEFT's AdaLoRA has no conv layer: SD1's 1x1 proj_in/proj_out and LoCon convs are left out.
        skipped = [t.kohya_name for t in targets if isinstance(t.module, nn.Conv2d)]
        if skipped:
            logger.warning("AdaLoRA adapts Linear layers only; %d conv modules are not trained (e.g. %s)", len(skipped), skipped[0])
        return [t for t in targets if isinstance(t.module, nn.Linear)]

    def peft_config(self, config, common, total_steps):
        from peft import AdaLoraConfig

        total = config.adalora_total_steps or total_steps or 1000
        target_r = config.adalora_target_rank or max(1, config.rank // 2)
        # PEFT's schedule: warm up at init_r for tinit steps, prune to target_r until total - tfinal.
        tinit, tfinal = max(1, total // 10), max(1, total // 5)
        if total - tinit - tfinal <= 0:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(
            init_r=config.rank, target_r=target_r, lora_alpha=config.alpha, lora_dropout=config.dropout,
            total_step=total, tinit=tinit, tfinal=tfinal, deltaT=1, target_modules=common["target_modules"],
        )

    def hooks(self, layer, adapter, config):
        return []  # validate() refuses rank / module dropout

    def export(self, layer, adapter):
        import torch

        a = layer.lora_A[adapter].detach().float()
        e = layer.lora_E[adapter].detach().float()
        b = layer.lora_B[adapter].detach().float()
        keep = (e.flatten() != 0).nonzero().flatten()
        if keep.numel() == 0:
            # Untrained (PEFT starts E at zero) or every rank pruned: the delta is zero. Keep one
            # zero rank so every module stays in the file and the key set is stable.
            keep = torch.zeros(1, dtype=torch.long)
        scale = float(layer.scaling[adapter]) / (float(layer.ranknum[adapter].detach()) + 1e-5)
        return {DOWN: (a * e)[keep], UP: b[:, keep], "alpha": torch.tensor(scale * keep.numel())}

    def load(self, layer, adapter, t):
        raise ValueError("loading saved weights into an 'adalora' network is not supported (its ranks were pruned); "
                         "use method 'lora'.")

    def update(self, tuners, step):
        for tuner in tuners.values():
            tuner.update_and_allocate(step)

    def regularization_loss(self, named_params):
        """PEFT's orthogonality penalty on A and B (add it to the loss)."""
        import torch

        total, n = 0.0, 0
        for p_name, p in named_params:
            if "lora_A" in p_name or "lora_B" in p_name:
                para_cov = p @ p.T if "lora_A" in p_name else p.T @ p
                eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
                total = total + torch.norm(para_cov - eye, p="fro")
                n += 1
        return total / max(n, 1) * 0.1  # PEFT's default orth_reg_weight


METHOD = AdaLoraMethod()
