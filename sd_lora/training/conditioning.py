"""Text conditioning: captions -> token ids -> text-encoder hidden states (+ SDXL's pooled embeds and time ids).

Token ids are computed once per distinct caption and kept, so a step never re-tokenises. The
encoding follows what each architecture's diffusers pipeline feeds its UNet:
  SD1 / SD2: the text encoder's last hidden state.
  SDXL:      the penultimate hidden states of CLIP-L and OpenCLIP-G, concatenated; the pooled,
             projected OpenCLIP-G embedding; and six "time ids" per image
             (original h, w, crop top, left, target h, w).
"""

from __future__ import annotations

import torch

from ..models import ARCH_SDXL, conditioning_hidden_state


class TextConditioner:
    def __init__(self, pipe, is_sdxl: bool):
        self.is_sdxl = is_sdxl
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
        self._ids: dict[str, list[torch.Tensor]] = {}

    def input_ids(self, captions: list[str], device) -> list[torch.Tensor]:
        """Per tokenizer, a (batch, 77) LongTensor; each caption is tokenised only the first time it is seen."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            per_tok = [
                tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
                for tok in self.tokenizers
            ]
            for i, c in enumerate(missing):
                self._ids[c] = [ids[i] for ids in per_tok]
        return [torch.stack([self._ids[c][t] for c in captions]).to(device) for t in range(len(self.tokenizers))]

    def encode(self, captions: list[str], device, encoders=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (b, 77, d), pooled (b, d2) or None). `encoders` overrides the modules called
        (e.g. the DDP-wrapped ones when the text encoder is trained)."""
        encoders = encoders or self.encoders
        ids = self.input_ids(captions, device)
        if not self.is_sdxl:
            return encoders[0](ids[0])[0], None
        hidden, pooled = [], None
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[conditioning_hidden_state(ARCH_SDXL)])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(placements, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = []
    for p in placements:
        (ow, oh), (top, left), (bw, bh) = p.original, p.crop, p.bucket
        rows.append([oh, ow, top, left, bh, bw])
    return torch.tensor(rows, device=device, dtype=dtype)
