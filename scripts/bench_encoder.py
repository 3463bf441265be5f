#!/usr/bin/env python
"""Benchmark of the LiteMedSAM slice encoder on every backend, and of `semisam segment` per backend.

Measures, in one run on this machine (human lines first, one JSON object last):
* a matrix-product probe (fp32, and bf16 where the CPU has it): the attainable GFLOP/s;
* the encoder's FLOPs per slice at each input side (``--sizes``, default 128 and 256; counted
  by torch's FlopCounterMode);
* per side, every backend side by side (``--backends``): eager PyTorch fp32 one slice at a time
  (the reference), torch's fast path (``fast_encoder``: BatchNorm folded, channels-last, bf16
  autocast where native; batches), torch.compile (optional: it needs a compiler), OpenVINO
  fp32 and bf16, ONNX Runtime fp32 (``semisam.models.backends``). For each: seconds per slice,
  effective GFLOP/s and its fraction of the fp32 probe, speed-up over eager fp32, and the
  cosine similarity of its embeddings to eager fp32 (minimum over phantom slices, and HC18
  images when ``../shared/data/hc18-dev`` exists). Runtimes also report the export time (0 when
  the export was already on disk) and the load time of the export (a second load, from disk);
* `semisam segment` of a 128^3 phantom with a (random) student at 256 px, once per backend
  (``--segment-backends``): wall time and the child's peak RSS. The converted encoders come from
  this run's model cache (exported above), as on a user's second run.

Usage: .venv/bin/python scripts/bench_encoder.py [--slices 8] [--repeats 3] [--sizes 128,256]
       [--backends ...] [--segment-backends torch,openvino,onnxruntime] [--no-segment] [--compile]
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
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.models import backends  # noqa: E402
from semisam.models.encoders import bf16_supported, build_litemedsam, fast_encoder, litemedsam_encoder  # noqa: E402

ALL = ("torch-eager-fp32", "torch-fast", "torch-compiled", "openvino-fp32", "openvino-bf16", "onnxruntime-fp32")
HC18 = REPO.parent / "shared" / "data" / "hc18-dev"


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


def seconds_per_slice(encoder, slices: np.ndarray, batch: int, repeats: int) -> float:
    encoder.encode(slices[:batch], batch_size=batch)  # warm-up (primitive creation, first inference)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encoder.encode(slices, batch_size=batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(slices)


def test_slices(n: int) -> np.ndarray:
    """Phantom B-mode slices in [0, 1] through a target (what the encoder sees in use)."""
    from semisam.phantom import make_phantom
    from semisam.preprocess import normalise

    ph = make_phantom(0, (max(n, 32), 128, 128))
    z = int(np.argmax((ph.label.array > 0).sum(axis=(1, 2))))
    lo = min(max(z - n // 2, 0), ph.image.shape[0] - n)
    return normalise(ph.image.array.astype(np.float32))[0][lo : lo + n]


def hc18_slices(n: int = 4):
    if not HC18.is_dir():
        return None
    from semisam.preprocess import normalise
    from semisam.volume import read_volume

    out = []
    for path in sorted(p for p in HC18.glob("*HC.png"))[:n]:
        img = read_volume(path).array[0].astype(np.float32)
        img = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(256, 256), mode="bilinear", antialias=True)[0, 0].numpy()
        out.append(normalise(img)[0])
    return np.stack(out) if out else None


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def bench_segment(shape, flags, root: Path) -> dict:
    from semisam.models.student import SlicingSAM3D
    from semisam.phantom import make_phantom
    from semisam.volume import write_volume

    with tempfile.TemporaryDirectory() as tmp:
        case = make_phantom(0, shape)
        write_volume(case.image, Path(tmp) / "in.nii.gz")
        torch.manual_seed(0)  # the same (random) student for every run
        SlicingSAM3D().save(Path(tmp) / "student.pt")
        cache = Path(tmp) / "cache"  # embeddings fresh for each run; converted encoders from this bench's model cache
        cache.mkdir()
        os.symlink(root, cache / "encoders")
        # The child reports its own peak RSS (RUSAGE_CHILDREN would mix several children).
        wrapper = (
            "import resource, runpy, sys\n"
            "sys.argv = ['semisam'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('semisam.cli', run_name='__main__')\n"
            "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        )
        cmd = [sys.executable, "-c", wrapper, "segment", str(Path(tmp) / "in.nii.gz"), str(Path(tmp) / "out.nii.gz"),
               "--checkpoint", str(Path(tmp) / "student.pt"), "--cache-dir", str(cache), *flags]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t
        if run.returncode != 0:
            raise SystemExit(f"semisam segment {' '.join(flags)} failed:\n{run.stderr}")
        peak_kb = int(run.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
        return {"flags": flags, "input_shape": list(shape), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "printed": run.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=8, help="slices timed per repeat")
    parser.add_argument("--batch", type=int, default=8, help="slices per encode call (the eager reference runs one at a time)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="128,256", help="input sides (comma-separated)")
    parser.add_argument("--backends", default=",".join(b for b in ALL if b != "torch-compiled"),
                        help=f"comma-separated, from {', '.join(ALL)} (torch-compiled needs a C++ compiler and ~1 min per side)")
    parser.add_argument("--compile", action="store_true", help="add torch-compiled")
    parser.add_argument("--segment-backends", default="torch,openvino,onnxruntime", help="semisam segment --backend values to time")
    parser.add_argument("--no-segment", action="store_true")
    parser.add_argument("--model-cache", default=None, help="folder for the converted encoders (default: a temporary one, so exports are timed)")
    args = parser.parse_args()
    chosen = [b for b in args.backends.split(",") if b]
    if args.compile and "torch-compiled" not in chosen:
        chosen.append("torch-compiled")
    chosen = sorted(chosen, key=lambda b: ALL.index(b) if b in ALL else len(ALL))  # the eager reference first
    unknown = [b for b in chosen if b not in ALL]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}: choose from {', '.join(ALL)}")
    for b in chosen:
        runtime = b.split("-")[0]
        if runtime in backends.PACKAGES and not backends.installed(runtime):
            raise SystemExit(f"{runtime} is not installed ({backends.INSTALL[runtime]}), or leave {b} out of --backends")

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.model_cache) if args.model_cache else Path(tmp.name) / "encoders"
    root.mkdir(parents=True, exist_ok=True)
    net = build_litemedsam()
    phantom = test_slices(args.slices)
    hc18 = hc18_slices()
    result = {
        "torch": torch.__version__,
        "openvino": _version("openvino"),
        "onnxruntime": _version("onnxruntime"),
        "threads": torch.get_num_threads(),
        "bf16_native": bf16_supported(),
        "probe_gflops_fp32": round(probe(torch.float32), 1),
        "cosine_slices": {"phantom": int(len(phantom)), "hc18": 0 if hc18 is None else int(len(hc18))},
    }
    if result["bf16_native"]:
        result["probe_gflops_bf16"] = round(probe(torch.bfloat16), 1)
    print(f"torch {result['torch']}, openvino {result['openvino']}, onnxruntime {result['onnxruntime']}; {result['threads']} threads; "
          f"probe fp32 {result['probe_gflops_fp32']} GFLOP/s" + (f", bf16 {result['probe_gflops_bf16']}" if "probe_gflops_bf16" in result else ""))
    for size in [int(v) for v in args.sizes.split(",") if v.strip()]:
        plain = litemedsam_encoder(net, input_size=size)
        gflop = flops_per_slice(plain)
        refs = {"phantom": plain.encode(phantom)}
        if hc18 is not None:
            refs["hc18"] = plain.encode(hc18)
        side = {"gflop_per_slice": round(gflop, 2), "backends": {}}
        print(f"input {size} px: {gflop:.2f} GFLOP per slice")
        eager_s = None
        for name in chosen:
            row = {}
            if name == "torch-eager-fp32":
                enc, batch = plain, 1
            elif name == "torch-fast":
                enc, batch = fast_encoder(plain), args.batch
            elif name == "torch-compiled":
                enc, batch = fast_encoder(plain, compile=True, batch_size=args.batch), args.batch
                t = time.perf_counter()
                enc.encode(phantom[:1])
                row["compile_s"] = round(time.perf_counter() - t, 1)
            else:
                runtime, precision = name.split("-")
                if precision == "bf16" and not result["bf16_native"]:
                    print(f"  {name:18s} skipped: no native bf16 on this CPU")
                    continue
                fresh = not (backends.export_dir(plain, runtime, root) / "meta.json").is_file()
                t = time.perf_counter()
                backends.runtime_encoder(plain, runtime, precision, root)
                row["export_s"] = round(time.perf_counter() - t, 1) if fresh else 0.0
                t = time.perf_counter()
                enc = backends.runtime_encoder(plain, runtime, precision, root)  # from disk
                row["load_s"] = round(time.perf_counter() - t, 2)
                batch = args.batch
            s = seconds_per_slice(enc, phantom, batch, args.repeats)
            if name == "torch-eager-fp32":
                eager_s = s
            row.update({
                "cache_id_suffix": enc.cache_id.split(":fast-")[1] if ":fast-" in enc.cache_id else "eager-fp32",
                "s_per_slice": round(s, 4),
                "gflops": round(gflop / s, 1),
                "fraction_of_fp32_probe": round(gflop / s / result["probe_gflops_fp32"], 3),
            })
            if eager_s is not None:
                row["speedup_over_eager"] = round(eager_s / s, 2)
            for data, ref in refs.items():
                row[f"cosine_min_{data}"] = round(cosine_min(enc.encode(phantom if data == "phantom" else hc18), ref), 6)
            side["backends"][name] = row
            extra = "".join(f", {k} {v}" for k, v in row.items() if k in ("export_s", "load_s", "compile_s"))
            cos = ", ".join(f"cosine {k[11:]} {v:.5f}" for k, v in row.items() if k.startswith("cosine_min_"))
            print(f"  {name:18s} {row['s_per_slice']:.3f} s/slice, {row['gflops']} GFLOP/s ({row['fraction_of_fp32_probe']:.2f} of fp32 probe), "
                  f"x{row.get('speedup_over_eager', float('nan')):.2f} over eager, {cos}{extra}", flush=True)
        result[f"input_{size}"] = side
    if not args.no_segment:
        result["segment"] = {}
        for b in [v for v in args.segment_backends.split(",") if v]:
            if b in backends.PACKAGES and not backends.installed(b):
                print(f"segment --backend {b}: skipped, not installed")
                continue
            row = bench_segment((128, 128, 128), ["--backend", b], root)
            result["segment"][b] = row
            print(f"semisam segment 128^3 --backend {b}: {row['wall_s']} s wall, peak RSS {row['peak_rss_mb']} MB", flush=True)
    print(json.dumps(result))


def _version(name: str):
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
