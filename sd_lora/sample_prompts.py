"""Sample-prompt lines in kohya's syntax, parsed without torch (the config checks them up front).

    a photo of sks dog on a beach --n blurry, low quality --w 512 --h 768 --s 28 --d 1234 --l 7 --ss euler_a

--n negative prompt, --w/--h width/height, --s sampler steps, --d seed, --l guidance (CFG) scale,
--ss sampler: kohya's name (euler_a, dpmsolver++, k_dpm_2, ...) or A1111's ("Euler a", "DPM++ 2M Karras"),
sd_lora.samplers.resolve; the line's sampler wins over the run's `sample_sampler`. Lines starting with
# and empty lines are ignored. sd_lora.training.sampling renders them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .samplers import resolve

_OPTION = re.compile(r"\s--(ss|n|w|h|s|d|l)\s+")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float = 7.0
    sampler: str | None = None  # our name (sd_lora.samplers), resolved from --ss


def parse_prompt_line(line: str) -> SamplePrompt:
    """Parse one line; raises ValueError naming the bad option."""
    parts = _OPTION.split(" " + line.strip())
    sp = SamplePrompt(prompt=parts[0].strip())
    for opt, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if opt == "n":
                sp.negative = value
            elif opt == "w":
                sp.width = int(value)
            elif opt == "h":
                sp.height = int(value)
            elif opt == "s":
                sp.steps = int(value)
            elif opt == "d":
                sp.seed = int(value)
            elif opt == "l":
                sp.guidance = float(value)
            elif opt == "ss":
                sp.sampler = resolve(value)
        except ValueError as e:
            if opt == "ss":
                raise ValueError(f"sample prompt {line!r}: --ss {e}") from e
            raise ValueError(f"sample prompt {line!r}: --{opt} needs a number, got {value!r}") from e
    return sp


def load_prompts(source) -> list[SamplePrompt]:
    """Prompts from a list of lines, a multi-line string, or a file path."""
    if source is None:
        return []
    if isinstance(source, str):
        lines = source.splitlines() if "\n" in source else Path(source).read_text(encoding="utf-8").splitlines()
    else:
        lines = list(source)
    return [parse_prompt_line(x) for x in lines if x.strip() and not x.lstrip().startswith("#")]
