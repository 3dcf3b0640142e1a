"""What a client may send to POST /v1/generate, and the checks that turn a body into a queued Job.

Everything that can be wrong with a request is found here, before it is queued: the JSON (400), the
fields and the server's limits (422), the LoRA names (404, naming the closest), files that do not fit
the base (422), and then every rule of `sd_lora.generate` itself, asked with `render=False` (sizes,
steps, seeds, tags: the same messages as the CLI and the web UI, 422). The worker only ever sees
requests that passed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generation import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .errors import RequestError
from .scheduler import Job


@dataclass(frozen=True)
class Limits:
    """The server's own bounds, tighter than generate()'s (which allows 1000 steps and any size)."""

    max_steps: int = 150
    max_size: int = 2048  # width and height, px
    max_images: int = 8  # "n"
    max_loras: int = 8  # JSON loras + prompt tags
    max_weight: float = 10.0  # |weight| of a LoRA; A1111 users go to about 2, negative to invert
    max_prompt_chars: int = 4000
    max_body_bytes: int = 64 * 1024


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, description="a name listed by GET /v1/loras")
    weight: float = Field(1.0, allow_inf_nan=False, description="UNet weight")
    te_weight: float | None = Field(None, allow_inf_nan=False, description="text-encoder weight (default: weight)")


class GenerateRequest(BaseModel):
    """The JSON body of POST /v1/generate (unknown fields are refused: a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the text; <lora:NAME:W> tags add LoRAs too")
    negative_prompt: str = ""
    loras: list[LoraRef] = Field(default_factory=list)
    seed: int | None = Field(None, description="image i uses seed + i; null: a random seed (reported in the PNG)")
    steps: int = DEFAULT_STEPS
    width: int | None = Field(None, description="multiple of 8, at least 64; null: the model's native size")
    height: int | None = None
    guidance: float = Field(DEFAULT_GUIDANCE, allow_inf_nan=False)
    n: int = Field(1, description="number of images")


def parse_body(raw: bytes) -> GenerateRequest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e}); send a JSON object such as "
                                '{"prompt": "a red circle", "loras": [{"name": "ink", "weight": 0.8}]}') from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as e:
        raise RequestError(422, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())) from None


def check_request(raw: bytes, catalog, pipe, limits: Limits) -> Job:
    """The body of a request -> a Job ready to queue, or RequestError with the status and the reason."""
    from ..generation import generate
    from ..stack import LoraSpec, parse_lora_prompt

    req = parse_body(raw)
    problems = []
    if len(req.prompt) > limits.max_prompt_chars or len(req.negative_prompt) > limits.max_prompt_chars:
        problems.append(f"prompt: at most {limits.max_prompt_chars} characters")
    if not 1 <= req.steps <= limits.max_steps:
        problems.append(f"steps {req.steps}: this server takes 1 to {limits.max_steps}")
    for name, value in (("width", req.width), ("height", req.height)):
        if value is not None and value > limits.max_size:
            problems.append(f"{name} {value}: this server takes at most {limits.max_size}")
    if not 1 <= req.n <= limits.max_images:
        problems.append(f"n {req.n}: this server makes 1 to {limits.max_images} images per request")
    try:
        tags = parse_lora_prompt(req.prompt)[1]
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    weighted = [(f"loras[{i}] {x.name!r}", x.weight, x.te_weight) for i, x in enumerate(req.loras)]
    weighted += [(t.tag, t.weight, t.te_weight) for t in tags]
    if len(weighted) > limits.max_loras:
        problems.append(f"loras: {len(weighted)} LoRAs (list and prompt tags); this server takes at most {limits.max_loras}")
    for where, *ws in weighted:
        if any(w is not None and abs(w) > limits.max_weight for w in ws):
            problems.append(f"{where}: weights must be between -{limits.max_weight:g} and {limits.max_weight:g}")
    if problems:
        raise RequestError(422, "; ".join(problems))

    names = catalog.names()  # one scan of the folder for every name of the request
    for t in tags:
        catalog.lookup(t.name, names)  # 404 / 422 before generate() sees the tag
    specs = [LoraSpec(catalog.lookup(x.name, names).path, weight=x.weight, te_weight=x.te_weight) for x in req.loras]
    call = dict(prompt=req.prompt, stack=specs, negative_prompt=req.negative_prompt,
                seed=secrets.randbelow(2**32) if req.seed is None else req.seed,
                steps=req.steps, width=req.width, height=req.height, guidance=req.guidance,
                lora_dir=catalog.dir, num_images=req.n)
    try:
        plan = generate(pipe, **call, render=False)  # generate()'s own rules, all problems in one message
    except ValueError as e:
        raise RequestError(422, str(e).replace(str(catalog.dir), "the LoRA folder")) from None
    except OSError as e:  # a file removed since the folder was listed
        raise RequestError(404, str(e).replace(str(catalog.dir), "the LoRA folder")) from None
    return Job(call=call, plan=plan, num_images=req.n)
