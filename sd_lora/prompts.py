"""Prompts as AUTOMATIC1111 reads them: emphasis, BREAK, prompts longer than 75 tokens, clip skip.

One module for both sides: `sd_lora.generate` encodes every prompt here (emphasis and long prompts
always on, as in A1111), and training/conditioning.py encodes captions here (literally, no emphasis,
as kohya does, in at most `max_token_length / 75` chunks).

Why our own code and not compel: compel's weighting is not A1111's. It has its own syntax
(`word++`, `(word)1.2`), and it re-weights by blending with embeddings of the prompt with the
fragment masked out (compel 2.0.3 embeddings_provider.py, `build_weighted_embedding_tensor` and the
tan() lerp for weights < 1), where A1111 multiplies the encoder's output by the weights and restores
the mean. Images would differ from A1111's for the same prompt, so this is a small parser plus the
chunked encoder, written from the rules below.

The rules (AUTOMATIC1111/stable-diffusion-webui, v1.10-era code, read at: prompt_parser.py 0674fabd,
sd_hijack_clip.py 00e09382, sd_hijack_open_clip.py 01a40c62, sd_emphasis.py 255da37d,
sd_samplers_cfg_denoiser.py via A1111's `pad_cond_uncond`):

- Emphasis (modules/prompt_parser.py `parse_prompt_attention`): `(text)` multiplies the weight of
  its tokens by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3; nesting
  multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters; a bracket left open applies
  to the end of the prompt; a closing bracket with none open is text. The word `BREAK` (upper case,
  a word of its own) ends the current 75-token chunk. Runs of equal weight are merged.
  Not supported: A1111's prompt editing `[a:b:step]` and alternation `[a|b]` (they change the
  prompt between sampler steps, which the diffusers pipelines cannot do); their brackets read as
  emphasis here.
- Chunks (modules/sd_hijack_clip.py `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`): each
  piece is tokenised without BOS/EOS; tokens fill chunks of 75; a chunk that is full while a comma
  lies within the last `comma_padding_backtrack` (default 20) tokens moves the tokens after that
  comma to the next chunk, so a phrase is not cut in two; each chunk is padded with EOS to 75 and
  gets BOS before and EOS after (77 tokens). Encoders whose pad token is not EOS (SD2's and SDXL's
  OpenCLIP, pad "!") get pad tokens after the first EOS (`process_tokens`).
- Encoding (`forward`, `process_tokens`): every chunk is encoded on its own and the results are
  concatenated (77 x k tokens). Emphasis ("Original", sd_emphasis.py `EmphasisOriginal`): the
  chunk's hidden states are multiplied token by token by the weights, then scaled so that their
  mean is the mean before the multiplication.
- Clip skip (`FrozenCLIPEmbedderWithCustomWords.encode_with_transformers`, CLIP_stop_at_last_layers
  = N): SD1 reads `hidden_states[-N]` and applies the final layer norm; N = 1 is the last layer's
  output (what the diffusers pipelines read). kohya's `--clip_skip` is the same (library/strategy_sd.py
  `SdTextEncodingStrategy.encode_tokens`, sd-scripts 48d368fa), and kohya applies it to SD2 too, which
  we follow (A1111 1.10 ignores clip skip on SD2 models). SDXL ignores it in both: CLIP-L's penultimate
  and OpenCLIP-G's penultimate hidden states, no final layer norm (A1111 sd_hijack_clip.py
  `FrozenCLIPEmbedderForSDXLWithCustomWords`; kohya sdxl_train_util.py warns "clip_skip will be
  unexpected"). The rule lives in sd_lora.models (`conditioning_hidden_state`).
- SDXL pooled embedding: OpenCLIP-G's pooled, projected output of the first chunk (`zs[0].pooled`).
- Prompt and negative prompt of different lengths: the shorter gets empty-prompt chunks until both
  have as many (sd_samplers_cfg_denoiser.py `pad_cond_uncond`, A1111's "Pad prompt/negative prompt"
  option; with it off A1111 runs the two through the UNet separately, which the diffusers pipelines
  cannot: they batch them, so the lengths must match).
  SDXL pipelines with `force_zeros_for_empty_prompt` keep their all-zero negative conditioning for
  an empty negative prompt (what the pipeline itself does, so plain prompts give the same images).

kohya differs in one way for long captions (strategy_sd.py): it encodes the chunks the same way but
joins them without the inner BOS/EOS (75 x k + 2 tokens), and pads every caption to all k chunks.
Training here keeps A1111's 77 x k layout, which is what the LoRA will see at generation, and pads
each caption to max_token_length / 75 chunks with empty chunks (so a caption's conditioning does
not depend on the other captions of its batch, and cached outputs have one shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHUNK_TOKENS = 75  # prompt tokens per chunk; + BOS + EOS = the encoders' 77
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack` (modules/shared_options.py)
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (text) and [text]
BREAK = ("BREAK", -1.0)  # how parse_prompt_attention marks a BREAK (as A1111 does)

# One token of the emphasis syntax per match: escapes, brackets, ":weight)", plain text, a lone ":".
_SYNTAX = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash: the character itself
  | \\                    # a lone backslash: dropped (A1111 does the same)
  | [(\[]                 # an opening bracket
  | :([+-]?[.\d]+)\)     # ":1.3)": closes a round bracket with that weight
  | [)\]]                 # a closing bracket
  | [^\\()\[\]:]+         # plain text
  | :                     # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces, with ("BREAK", -1.0) where a BREAK ends a chunk.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index in `pieces` where each open bracket started
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _SYNTAX.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(" or token == "[":
            (round_open if token == "(" else square_open).append(len(pieces))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, or a bracket / weight with nothing open: text as well
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:  # brackets never closed apply to the end (in the order they opened)
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False  # "(a:1.2.3)": A1111 raises; here the ":1.2.3)" stays text
    return True


@dataclass
class PromptChunks:
    """A prompt cut into chunks for one tokenizer: `tokens` and `weights` are k lists of 77
    (BOS, 75 tokens or padding, EOS, pad after the first EOS); `dropped` counts the prompt tokens
    left out by `max_chunks` (0: none)."""

    tokens: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    dropped: int = 0

    def padded(self, n: int, empty: PromptChunks) -> PromptChunks:
        """These chunks followed by empty-prompt chunks up to `n` (A1111's padding of a batch)."""
        extra = max(0, n - len(self.tokens))
        return PromptChunks(self.tokens + empty.tokens[:1] * extra, self.weights + empty.weights[:1] * extra, self.dropped)


def chunk_prompt(tokenizer, text: str, *, emphasis: bool = True, max_chunks: int | None = None,
                 comma_backtrack: int = COMMA_BACKTRACK) -> PromptChunks:
    """`text` as A1111 chunks it (module docstring). emphasis=False takes the text literally (brackets
    and BREAK are text, all weights 1), as training reads captions. max_chunks keeps the first chunks
    and counts what is left out; the last chunk kept is filled to 75 tokens (no comma back-off there:
    the words it would move would be dropped)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # A1111: vocab[",</w>"]; unknown gives the unk id
    comma = None if comma == tokenizer.unk_token_id else comma
    pieces = parse_prompt_attention(text) if emphasis else [(text, 1.0)]
    ids = tokenizer([t for t, _ in pieces], add_special_tokens=False, truncation=False)["input_ids"]

    out = PromptChunks()
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_TOKENS - len(tokens)
        row = [bos] + tokens + [eos] * (fill + 1)
        first_eos = len(tokens) + 1
        row = row[: first_eos + 1] + [pad] * (len(row) - first_eos - 1)
        out.tokens.append(row)
        out.weights.append([1.0] + weights + [1.0] * (fill + 1))
        tokens, weights, last_comma = [], [], -1

    for piece_ids, (piece, weight) in zip(ids, pieces):
        if emphasis and (piece, weight) == BREAK:
            close()
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack
                  and (max_chunks is None or len(out.tokens) < max_chunks - 1)):
                cut = last_comma + 1
                moved, moved_w = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved, moved_w
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not out.tokens:
        close()
    if max_chunks is not None and len(out.tokens) > max_chunks:
        out.dropped = sum(sum(1 for t in row[1:] if t not in (eos, pad)) for row in out.tokens[max_chunks:])
        out.tokens, out.weights = out.tokens[:max_chunks], out.weights[:max_chunks]
    return out


def apply_emphasis(hidden, weights):
    """A1111's "Original" emphasis on one chunk's hidden states (..., 77, d): multiply each token by
    its weight, then rescale to the mean before. All weights 1 returns `hidden` itself."""
    import torch

    w = torch.as_tensor(weights, dtype=torch.float32, device=hidden.device)
    if bool((w == 1).all()):
        return hidden
    # A1111's float32 weights promote fp16/bf16 states: the arithmetic is float32 there too
    z = hidden.float()
    before = z.mean()
    scaled = z * w.unsqueeze(-1)
    ratio = before / scaled.mean()
    if not bool(torch.isfinite(ratio)):
        # A mean of exactly zero: an untrained final layer norm (weight 1, bias 0, as in tiny test models)
        # centres every token, and A1111's formula would make the whole prompt NaN/inf. Trained CLIP states
        # have means far from zero (SD1.5: about -0.1), where this never applies. Keep the weighted states.
        return scaled.to(hidden.dtype)
    return (scaled * ratio).to(hidden.dtype)


def encode_chunks(encoder, ids, hidden_index: int, layer_norm: bool, weights=None):
    """Encode chunked token ids (b, k, 77) chunk by chunk; returns (hidden (b, 77 k, d), pooled of
    each prompt's first chunk or None). hidden_index: which `hidden_states` entry to read (-1: the
    last layer's output, taken as the encoder's `last_hidden_state`, final layer norm included);
    layer_norm: apply the final layer norm to an earlier entry (SD1/SD2 clip skip; SDXL reads its
    penultimate states without). weights (b, k, 77) or None: emphasis per chunk (`apply_emphasis`).
    `encoder` may be DDP-wrapped (the trainer's text encoders)."""
    b, k, n = ids.shape
    flat = ids.reshape(b * k, n)
    if hidden_index == -1:
        out = encoder(flat)
        hidden = out.last_hidden_state
    else:
        out = encoder(flat, output_hidden_states=True)
        hidden = out.hidden_states[hidden_index]
        if layer_norm:
            hidden = final_layer_norm(encoder)(hidden)
    pooled = getattr(out, "text_embeds", None)
    hidden = hidden.reshape(b, k, n, -1)
    if weights is not None:
        import torch

        hidden = torch.stack([torch.stack([apply_emphasis(hidden[i, c], weights[i][c]) for c in range(k)])
                              for i in range(b)])
    hidden = hidden.reshape(b, k * n, -1)
    if pooled is not None:
        pooled = pooled.reshape(b, k, -1)[:, 0]
    return hidden, pooled


def final_layer_norm(encoder):
    """A CLIP text encoder's final layer norm (DDP-wrapped or not; transformers 4 keeps it in
    `.text_model`, transformers 5 on the model itself)."""
    model = getattr(encoder, "module", encoder)
    return getattr(model, "text_model", model).final_layer_norm


class PromptEncoder:
    """A pipeline's tokenizers and text encoders, read as A1111 reads them (module docstring).

    arch: an sd_lora.models architecture; clip_skip: A1111's/kohya's N (None or 1: the last layer);
    emphasis: parse emphasis and BREAK (generation) or take the text literally (training);
    max_chunks: at most this many chunks per prompt (None: as many as the prompt needs)."""

    def __init__(self, pipe, arch: str, clip_skip: int | None = None, emphasis: bool = True,
                 max_chunks: int | None = None, comma_backtrack: int = COMMA_BACKTRACK):
        from .models import ARCH_SDXL, conditioning_final_layer_norm, conditioning_hidden_state

        self.is_sdxl = arch == ARCH_SDXL
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.is_sdxl else [])
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.is_sdxl else [])
        self.hidden_index = conditioning_hidden_state(arch, clip_skip)
        self.layer_norm = conditioning_final_layer_norm(arch)  # apply the final layer norm to that state
        self.emphasis, self.max_chunks, self.comma_backtrack = emphasis, max_chunks, comma_backtrack
        self.empty = [chunk_prompt(tok, "", emphasis=False) for tok in self.tokenizers]

    def chunks(self, text: str) -> list[PromptChunks]:
        """Per tokenizer, the prompt's chunks."""
        return [chunk_prompt(tok, text, emphasis=self.emphasis, max_chunks=self.max_chunks,
                             comma_backtrack=self.comma_backtrack) for tok in self.tokenizers]

    def encode_chunks(self, per_prompt: list[list[PromptChunks]], device, encoders=None, num_chunks: int | None = None):
        """(hidden (b, 77 k, d), pooled (b, d2) or None) for prompts already chunked (`chunks`), each
        padded with empty chunks to `num_chunks` (default: the longest's count)."""
        import torch

        encoders = encoders or self.encoders
        k = num_chunks or max(len(c.tokens) for chunks in per_prompt for c in chunks)
        hidden, pooled = [], None
        for t, enc in enumerate(encoders):
            padded = [chunks[t].padded(k, self.empty[t]) for chunks in per_prompt]
            ids = torch.tensor([p.tokens for p in padded], dtype=torch.long, device=device)
            weights = [p.weights for p in padded] if self.emphasis else None
            h, p = encode_chunks(enc, ids, self.hidden_index, self.layer_norm, weights)
            hidden.append(h)
            if p is not None:  # SDXL: text_encoder_2's (the only encoder with a projection)
                pooled = p
        return (torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]), pooled

    def encode(self, texts: list[str], device, encoders=None, num_chunks: int | None = None):
        return self.encode_chunks([self.chunks(t) for t in texts], device, encoders, num_chunks)


def pipeline_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "", clip_skip: int | None = None, device=None) -> dict:
    """The prompt as keyword arguments for a diffusers SD/SDXL pipeline call (`prompt_embeds`,
    `negative_prompt_embeds`, and SDXL's pooled ones), encoded as A1111 does: emphasis, BREAK, any
    length, clip skip; the negative prompt padded with empty chunks to the prompt's length (or the
    prompt to the negative's). A plain prompt of up to 75 tokens gives exactly what the pipeline's own
    encoding gives (an SDXL pipeline's all-zero negative for an empty negative prompt included)."""
    import torch

    from .models import ARCH_SDXL, architecture_of

    arch = architecture_of(pipe).arch
    encoder = PromptEncoder(pipe, arch, clip_skip=clip_skip)
    device = device if device is not None else pipe._execution_device
    zero_negative = arch == ARCH_SDXL and not negative_prompt and bool(pipe.config.get("force_zeros_for_empty_prompt", False))
    positive, negative = encoder.chunks(prompt), encoder.chunks(negative_prompt or "")
    k = max(len(c.tokens) for c in positive + ([] if zero_negative else negative))
    with torch.no_grad():
        hidden, pooled = encoder.encode_chunks([positive], device, num_chunks=k)
        if zero_negative:
            neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        else:
            neg_hidden, neg_pooled = encoder.encode_chunks([negative], device, num_chunks=k)
    kwargs = {"prompt_embeds": hidden, "negative_prompt_embeds": neg_hidden}
    if arch == ARCH_SDXL:
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
    return kwargs
