#!/usr/bin/env python
"""Benchmark of the LiteMedSAM slice encoder and of `semisam segment` (one JSON line at the end).

Measures, in one run on this machine:
* a matrix-product probe (fp32, and bf16 where the CPU has it): the attainable GFLOP/s;
* the encoder's FLOPs per 256x256 slice (counted by torch's FlopCounterMode);
* the plain PyTorch path (fp32 eager, one slice at a time) and the optimised paths
  (`semisam.models.encoders.fast_encoder`: BatchNorm folded, channels-last, bf16 autocast where
  native, batches of slices; then also torch.compile): slices/s, effective GFLOP/s, and each
  as a fraction of the probe;
* how close the optimised embeddings are to the plain ones (cosine similarity);
* LiteMedSAM at other input sides (``--input-sizes``, ``encoder.input_size``): FLOPs and
  time per slice, fast and compiled, and the ratio to the native 256 px;
* `semisam segment` on a 128^3 phantom with a (random) student: wall time and peak RSS.

Usage: .venv/bin/python scripts/bench_encoder.py [--slices 16] [--batch 8] [--no-segment] [--input-sizes 128]
Medians over --repeats runs; the machine is noisy, compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.models.encoders import bf16_supported, fast_encoder, litemedsam_encoder  # noqa: E402


def probe(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_slice(encoder) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = encoder.to_input(torch.rand(1, encoder.input_size, encoder.input_size))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.module(x)
    return counter.get_total_flops() / 1e9


def time_encoder(encoder, slices: np.ndarray, batch: int, repeats: int) -> float:
    encoder.encode(slices[:batch], batch_size=batch)  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encoder.encode(slices, batch_size=batch)
        times.append(time.perf_counter() - t)
    return len(slices) / statistics.median(times)


def bench_segment(shape, flags) -> dict:
    from semisam.models.student import SlicingSAM3D
    from semisam.phantom import make_phantom
    from semisam.volume import write_volume

    with tempfile.TemporaryDirectory() as tmp:
        case = make_phantom(0, shape)
        write_volume(case.image, Path(tmp) / "in.nii.gz")
        torch.manual_seed(0)  # the same (random) student for every run
        SlicingSAM3D().save(Path(tmp) / "student.pt")
        # The child reports its own peak RSS (RUSAGE_CHILDREN would mix several children).
        wrapper = (
            "import resource, runpy, sys\n"
            "sys.argv = ['semisam'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('semisam.cli', run_name='__main__')\n"
            "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        )
        cmd = [sys.executable, "-c", wrapper, "segment", str(Path(tmp) / "in.nii.gz"), str(Path(tmp) / "out.nii.gz"), "--checkpoint", str(Path(tmp) / "student.pt"), *flags]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t
        if run.returncode != 0:
            raise SystemExit(f"semisam segment failed:\n{run.stderr}")
        peak_kb = int(run.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
        return {"flags": flags, "input_shape": list(shape), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "printed": run.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-segment", action="store_true")
    parser.add_argument("--input-sizes", default="128",
                        help="comma-separated other input sides to time LiteMedSAM at (encoder.input_size; default 128; '' for none)")
    args = parser.parse_args()

    from semisam.models.encoders import build_litemedsam

    plain_net = build_litemedsam()
    plain = litemedsam_encoder(plain_net)
    fast = fast_encoder(plain)
    compiled = fast_encoder(plain, compile=True, batch_size=args.batch)
    rng = np.random.default_rng(0)
    slices = rng.random((args.slices, 128, 128)).astype(np.float32)

    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_native": bf16_supported(),
        "probe_gflops_fp32": round(probe(torch.float32), 1),
    }
    if result["bf16_native"]:
        result["probe_gflops_bf16"] = round(probe(torch.bfloat16), 1)
    gflop = flops_per_slice(plain)
    result["gflop_per_slice"] = round(gflop, 2)
    t = time.perf_counter()
    compiled.encode(slices[:1])
    result["compile_s"] = round(time.perf_counter() - t, 1)  # short when inductor's disk cache is warm
    for name, enc, batch in (("plain", plain, 1), ("fast", fast, args.batch), ("compiled", compiled, args.batch)):
        sps = time_encoder(enc, slices, batch, args.repeats)
        result[name] = {
            "batch": batch,
            "slices_per_s": round(sps, 3),
            "s_per_slice": round(1 / sps, 3),
            "gflops": round(sps * gflop, 1),
            "fraction_of_fp32_probe": round(sps * gflop / result["probe_gflops_fp32"], 3),
        }
    for name in ("fast", "compiled"):
        result[name]["precision"] = "bf16" if "fast-bf16" in fast.cache_id else "fp32"
        result[name]["speedup_over_plain"] = round(result[name]["slices_per_s"] / result["plain"]["slices_per_s"], 2)
    if "probe_gflops_bf16" in result:
        result["compiled"]["fraction_of_bf16_probe"] = round(result["compiled"]["gflops"] / result["probe_gflops_bf16"], 3)
    a = plain.encode(slices[:4]).flatten(1)
    for name, enc in (("fast", fast), ("compiled", compiled)):
        b = enc.encode(slices[:4]).flatten(1)
        result[name]["cosine_min"] = round(float(torch.nn.functional.cosine_similarity(a, b).min()), 5)
    # The same weights at other input sides (encoder.input_size): cost per slice and FLOPs.
    for size in [int(v) for v in args.input_sizes.split(",") if v.strip()]:
        other = litemedsam_encoder(plain_net, input_size=size)
        row = {"gflop_per_slice": round(flops_per_slice(other), 2)}
        for name, enc, batch in (("fast", fast_encoder(other), args.batch), ("compiled", fast_encoder(other, compile=True, batch_size=args.batch), args.batch)):
            sps = time_encoder(enc, slices, batch, args.repeats)
            row[f"{name}_s_per_slice"] = round(1 / sps, 3)
            row[f"{name}_ratio_to_native"] = round(result[name]["s_per_slice"] * sps, 2)  # native time / this time
        result[f"input_{size}"] = row
    if not args.no_segment:
        result["segment"] = bench_segment((128, 128, 128), [])
        result["segment_compiled"] = bench_segment((128, 128, 128), ["--compile"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
