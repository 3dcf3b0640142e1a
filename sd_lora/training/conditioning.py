"""Text conditioning: captions -> token ids -> text-encoder hidden states (+ SDXL's pooled embeds and time ids).

Captions are read by sd_lora.prompts as A1111 reads a prompt, but literally (no emphasis, no BREAK:
kohya does not weight captions either): up to `max_token_length` tokens in 75-token chunks, each
encoded with its own BOS/EOS and concatenated (77 x k tokens; every caption padded to the same k with
empty chunks, so its conditioning does not depend on its batch and cached outputs have one shape).
max_token_length 75 is one chunk: exactly the ids and the call of the diffusers pipelines. A caption
cut short is warned about once, with its image file when the dataset names it.

Token ids are computed once per distinct caption and kept, so a step never re-tokenises. Which
hidden state is read follows sd_lora.models.conditioning_hidden_state:
  SD1 / SD2: the text encoder's last hidden state (clip_skip N: the Nth from the end, through the
             final layer norm, as kohya and A1111 do).
  SDXL:      the penultimate hidden states of CLIP-L and OpenCLIP-G, concatenated; the pooled,
             projected OpenCLIP-G embedding (of the first chunk); and six "time ids" per image
             (original h, w, crop top, left, target h, w). clip_skip is ignored, as kohya does.
"""

from __future__ import annotations

import logging

import torch

from ..models import ARCH_SDXL, architecture_of
from ..prompts import CHUNK_TOKENS, PromptChunks, PromptEncoder

logger = logging.getLogger(__name__)


class TextConditioner:
    def __init__(self, pipe, is_sdxl: bool, *, max_token_length: int = CHUNK_TOKENS, clip_skip: int | None = None,
                 warn=None):
        """warn(message): how a cut caption is reported (default: a logged warning; the trainer's also
        reaches the web UI)."""
        if max_token_length % CHUNK_TOKENS:
            raise ValueError(f"max_token_length {max_token_length}: must be 75, 150 or 225 (whole 75-token chunks)")
        arch = ARCH_SDXL if is_sdxl else architecture_of(pipe).arch
        self.is_sdxl = is_sdxl
        self.num_chunks = max_token_length // CHUNK_TOKENS
        self.clip_skip = clip_skip
        self.prompts = PromptEncoder(pipe, arch, clip_skip=clip_skip, emphasis=False, max_chunks=self.num_chunks)
        self.tokenizers, self.encoders = self.prompts.tokenizers, self.prompts.encoders
        if clip_skip and clip_skip > 1 and not is_sdxl:
            layers = pipe.text_encoder.config.num_hidden_layers
            if clip_skip > layers:
                raise ValueError(f"clip_skip {clip_skip}: this text encoder has only {layers} layers; use 1-{layers} "
                                 "(2 is the usual value)")
        self._chunks: dict[str, list[PromptChunks]] = {}
        self._warned: set[str] = set()
        self._warn = warn or (lambda msg: logger.warning("warning: %s", msg))

    @property
    def cache_key(self) -> tuple:
        """What the outputs depend on besides the caption and the encoder weights: a text-encoder output
        cache kept beyond one run must key on it (chunks read, hidden state, final layer norm)."""
        return (self.num_chunks, self.prompts.hidden_index, self.prompts.layer_norm)

    def check_captions(self, captions_and_files) -> int:
        """Warn once for each caption longer than max_token_length, naming its file (pairs of caption and
        file name or None); returns how many distinct captions are cut so far."""
        for caption, source in captions_and_files:
            self._chunked(caption, source)
        return len(self._warned)

    def _chunked(self, caption: str, source=None) -> list[PromptChunks]:
        chunks = self._chunks.get(caption)
        if chunks is None:
            chunks = self._chunks[caption] = self.prompts.chunks(caption)
        dropped = chunks[0].dropped
        if dropped and caption not in self._warned:
            self._warned.add(caption)
            limit = self.num_chunks * CHUNK_TOKENS
            longer = [str(n) for n in (150, 225) if n > limit]
            fix = f"shorten it or set max_token_length = {' or '.join(longer)}" if longer else "shorten it (225 is the most)"
            where = f"{source}: " if source else ""
            self._warn(f"{where}caption longer than max_token_length {limit}, its last {dropped} token(s) are not read: "
                       f"{fix} ({caption[:80]!r})")
        return chunks

    def input_ids(self, captions: list[str], device) -> list[torch.Tensor]:
        """Per tokenizer, a (batch, 77 k) LongTensor; each caption is tokenised only the first time it is seen."""
        chunked = [self._chunked(c) for c in captions]
        out = []
        for t in range(len(self.tokenizers)):
            rows = [c[t].padded(self.num_chunks, self.prompts.empty[t]).tokens for c in chunked]
            out.append(torch.tensor([[i for chunk in r for i in chunk] for r in rows], dtype=torch.long, device=device))
        return out

    def encode(self, captions: list[str], device, encoders=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (b, 77 k, d), pooled (b, d2) or None). `encoders` overrides the modules called
        (e.g. the DDP-wrapped ones when the text encoder is trained)."""
        return self.prompts.encode_chunks([self._chunked(c) for c in captions], device, encoders, self.num_chunks)


def sdxl_time_ids(placements, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = []
    for p in placements:
        (ow, oh), (top, left), (bw, bh) = p.original, p.crop, p.bucket
        rows.append([oh, ow, top, left, bh, bw])
    return torch.tensor(rows, device=device, dtype=dtype)
