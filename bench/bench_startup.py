"""Start-up cost of the CLI against the floor of the libraries it must import (issue #20 item 5).

    PYTHONPATH=. .venv/bin/python bench/bench_startup.py [--repeats 3] [--steps 25]

Each command runs in a fresh process, the commands alternating round by round (the VM is noisy, so
the ratio to the floor measured in the same minutes is the figure to read). The floor is a process
that only imports what `sd-lora generate` cannot do without: torch, diffusers' StableDiffusionPipeline
(which imports torch._dynamo) and transformers' CLIP classes — no model loaded, nothing rendered.
`sd-lora generate` on top of it loads the shipped tiny base and renders one 64 px image; the reference
is a plain diffusers script that does the same (from_pretrained, one image, saved).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ("import torch; from diffusers import StableDiffusionPipeline; "
         "from transformers import CLIPTextModel, CLIPTokenizer")
# The reference: a plain diffusers script doing the same job (load the tiny base, one 64 px image, saved).
DIFFUSERS = ("import sys, torch; from diffusers import StableDiffusionPipeline; "
             "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None); "
             "pipe.set_progress_bar_config(disable=True); "
             "pipe('a red circle', width=64, height=64, num_inference_steps=int(sys.argv[2]), "
             "generator=torch.Generator().manual_seed(0)).images[0].save(sys.argv[3])")


def commands(out_dir: Path, steps: int) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python -c pass": [py, "-c", "pass"],
        "sd-lora --help": [py, "-m", "sd_lora.cli", "--help"],
        "import torch": [py, "-c", "import torch"],
        "floor (torch + diffusers + transformers)": [py, "-c", FLOOR],
        "diffusers script (64 px)": [py, "-c", DIFFUSERS, str(ROOT / "datasets" / "tiny-base"), str(steps),
                                     str(out_dir / "d.png")],
        "sd-lora generate (64 px)": [
            py, "-m", "sd_lora.cli", "generate", "--model", str(ROOT / "datasets" / "tiny-base"),
            "--prompt", "a red circle", "--width", "64", "--height", "64", "--steps", str(steps),
            "--out", str(out_dir / "g.png")],
    }


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + sys of the child) seconds of one run."""
    before = os.times()
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    after = os.times()
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25, help="sampler steps of the generate run (its default: 25)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp), args.steps)
        for cmd in cmds.values():  # one unmeasured round: the file cache is warm for every command
            timed(cmd)
        walls: dict[str, list[float]] = {k: [] for k in cmds}
        cpus: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                w, c = timed(cmd)
                walls[name].append(w)
                cpus[name].append(c)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    floor = statistics.median(walls["floor (torch + diffusers + transformers)"])
    print(f"load average {load:.1f}, {args.repeats} rounds, medians")
    print(f"| command | wall (s) | CPU (s) | wall / floor |")
    print("|---|---|---|---|")
    for name in cmds:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        runs = " / ".join(f"{x:.2f}" for x in walls[name])
        print(f"| {name} | {w:.2f} ({runs}) | {c:.2f} | {w / floor:.2f} |")
    gen = statistics.median(walls["sd-lora generate (64 px)"])
    ref = statistics.median(walls["diffusers script (64 px)"])
    print(f"sd-lora generate above the import floor: {gen - floor:.2f} s (model load + sampling + our code); "
          f"against the plain diffusers script: {gen / ref:.2f}x its wall time")


if __name__ == "__main__":
    main()
