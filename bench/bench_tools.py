"""Resize a full-size SD1.5 kohya-preset LoRA (r32 -> r16) and measure time, size and delta error.

The LoRA has the real module set and shapes of kohya's default targets on SD1.5 (UNet transformer
blocks + text-encoder attention/MLP: 264 modules), taken from the meta-device models (no weights
needed), with random factors. Two spectra:
  random  Gaussian up and down: a flat singular-value spectrum, the worst case for any resize
  decay   singular values falling as 1/(1+i), closer to what training produces
The "measured" error is read back from the written fp16 file: ||delta_new - delta_old||_F / ||delta_old||_F
over every module, so it includes fp16 rounding; "reported" is what `resize_lora` predicts from the SVD.

With --dense the same resize is also timed the way kohya's resize_lora.py does it (the dense
up @ down per module, then a full SVD; kohya switches to svd_lowrank above 2048 x 2048, which none
of these modules reach in both dimensions) and the ratio is printed.

Usage: PYTHONPATH=. python bench/bench_tools.py [--rank 32] [--new-rank 16] [--dense] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from sd_lora.formats import load_lora, save_lora
from sd_lora.formats.metadata import build_training_metadata
from sd_lora.network.presets import select_targets
from sd_lora.testing import full_size_text_encoders, full_size_unet
from sd_lora.tools import resize_lora
from sd_lora.tools.svd import weight_shape


def build_lora(rank: int, spectrum: str, seed: int = 0) -> dict[str, torch.Tensor]:
    components = {"unet": full_size_unet("sd1"), "text_encoder": full_size_text_encoders("sd1")[0]}
    targets = select_targets(components, "sd1", "kohya")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    scale = 1.0 / (1.0 + torch.arange(rank, dtype=torch.float32)) if spectrum == "decay" else torch.ones(rank)
    for t in targets:
        w_shape = tuple(t.module.weight.shape)
        fan_in = t.in_features * t.kernel_numel
        down = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
        up = torch.randn(t.out_features, rank, generator=g) * 0.02 * scale
        if len(w_shape) == 4:
            down, up = down.reshape(rank, *w_shape[1:]), up.reshape(t.out_features, rank, 1, 1)
        sd[f"{t.kohya_name}.lora_down.weight"] = down
        sd[f"{t.kohya_name}.lora_up.weight"] = up
        sd[f"{t.kohya_name}.alpha"] = torch.tensor(float(rank))
    return sd


def delta_error(a_path: Path, b_path: Path) -> float:
    a, b = load_lora(a_path), load_lora(b_path)
    num = den = 0.0
    for name, ma in a.modules.items():
        shape = weight_shape(ma)
        da, db = ma.delta(shape), b.modules[name].delta(shape)
        num += float((db - da).double().pow(2).sum())
        den += float(da.double().pow(2).sum())
    return math.sqrt(num / den)


def dense_resize_seconds(path: Path, new_rank: int) -> float:
    """kohya resize_lora.py's arithmetic: dense up @ down, SVD, truncate (no file written).

    kohya calls torch.linalg.svd with full_matrices=True; the thin SVD timed here is faster, so the
    ratio printed understates the difference."""
    lora = load_lora(path)
    start = time.perf_counter()
    for m in lora.modules.values():
        up = m.tensors["lora_up.weight"].float().flatten(1)
        down = m.tensors["lora_down.weight"].float().flatten(1)
        u, s, vh = torch.linalg.svd(up @ down, full_matrices=False)
        _ = (u[:, :new_rank] * s[:new_rank], vh[:new_rank])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--new-rank", type=int, default=16)
    ap.add_argument("--spectra", default="random,decay")
    ap.add_argument("--dense", action="store_true", help="also time kohya's dense-SVD arithmetic")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_tools_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {torch.get_num_threads()}")
    for spectrum in args.spectra.split(","):
        src = out_dir / f"sd15-kohya-r{args.rank}-{spectrum}.safetensors"
        md = build_training_metadata("sd1", rank=args.rank, alpha=args.rank, output_name=src.stem)
        save_lora(src, build_lora(args.rank, spectrum), md, dtype="fp16")
        dst = out_dir / f"sd15-kohya-r{args.new_rank}-{spectrum}.safetensors"
        start = time.perf_counter()
        report = resize_lora(src, dst, rank=args.new_rank)
        seconds = time.perf_counter() - start
        result = {
            "spectrum": spectrum,
            "modules": len(report.modules),
            "rank": f"{args.rank} -> {args.new_rank}",
            "size_mb_before": round(src.stat().st_size / 1e6, 2),
            "size_mb_after": round(dst.stat().st_size / 1e6, 2),
            "seconds": round(seconds, 2),
            "reported_rel_error": round(report.rel_error, 4),
            "measured_rel_error_fp16_file": round(delta_error(src, dst), 4),
            "kept_energy": round(report.kept_energy, 4),
        }
        if args.dense:
            dense = dense_resize_seconds(src, args.new_rank)
            result["dense_svd_seconds"] = round(dense, 2)
            result["speedup_vs_dense"] = round(dense / seconds, 1)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
