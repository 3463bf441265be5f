#!/usr/bin/env python
"""Benchmark of one-click segmentation (``semisam.inference.Segmenter.segment``) by input size.

Segments phantoms of each ``--sizes`` (default 64^3, 128^3 and 288 x 256 x 256 voxels, z y x:
the grid of a RESECT volume) and every ``--input`` file (e.g. a RESECT case) with one student
checkpoint, each size in a fresh child process, so that its peak RSS is its own. Per size:

* ``wall_s``: seconds of ``Segmenter(...).segment(volume, progress=...)`` (median over
  ``--repeats``; every repeat starts from an empty embedding cache, so it encodes again);
* ``encode_s``: seconds spent inside the encoder's ``encode`` (the frozen slice encoder);
  ``embed_phase_s``: from the call to the last progress report (preprocessing + embedding);
* ``encoded_slices``: slices the encoder computed (``EmbeddingCache.encoded_slices``);
* ``peak_rss_mb``: the child's peak resident memory (``getrusage``; loading a runtime's
  converted encoder can be its largest moment); ``rss_before_mb``: resident memory before the
  first segmentation (interpreter, torch, student and encoder loaded, input read);
  ``segment_peak_rss_mb`` (Linux): the peak during the segmentations alone (the kernel's
  high-water mark reset through ``/proc/self/clear_refs`` after loading);
* ``s_per_mvox``: ``wall_s`` per million input voxels; and, over the sizes, the ratio of
  s/Mvox of the largest input to that of 128^3 (1 when the cost grows linearly with the voxels).

Whatever ``segment`` does is what is measured: the whole field of view at the student's
spacing, cut into its in-plane training tiles. ``Segmentation``'s grid (z, y, x) and tiles per
slice are copied into ``segmentation``.

Student: ``--student best.pt`` (then each phantom's ``dice`` against its label is reported
too), or else a freshly initialised student of the demo's architecture and preprocessing
(``semisam.demo.demo_config``; ``--tiny``: the tiny schedule's) on the LiteMedSAM encoder at
``--encoder-size`` px, saved as training saves one. Its output is meaningless, but its cost is
that of a trained one (the weights do not change the work) and it needs no training run.
Phantoms (``semisam.phantom.make_phantom``, seed ``--seed``; targets anywhere in the sector from
256 voxels in-plane) are written to ``.nii`` files first and read in the child, as a user's
volume is.

Usage: .venv/bin/python scripts/bench_segment.py [--sizes 64,128,288x256x256] [--input PATH ...]
       [--student best.pt] [--backend auto|torch|openvino|onnxruntime] [--encoder-size 128]
       [--repeats 1] [--tiny] [--work DIR] [--model-cache DIR]
Human lines first, one JSON object last. The machine is noisy: compare numbers from one run.
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
from typing import Any, Dict, List, Optional, Tuple

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SIZES = "64,128,288x256x256"
TINY_SIZES = "16,24x32x32"
RESULT = "BENCH_SEGMENT_RESULT "


def parse_size(text: str) -> Tuple[int, int, int]:
    """``N`` -> (N, N, N); ``ZxYxX`` -> (Z, Y, X)."""
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: use N (a cube) or ZxYxX, each at least 8")
    return parts[0], parts[1], parts[2]


def size_name(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def untrained_student(path: Path, encoder_size: int, tiny: bool) -> Dict[str, Any]:
    """A freshly initialised student of the demo's architecture and preprocessing (the tiny
    schedule's with ``tiny``), on LiteMedSAM at ``encoder_size`` px, saved as training saves one."""
    import torch

    from semisam.demo import demo_config
    from semisam.models.encoders import litemedsam_encoder
    from semisam.models.student import SlicingSAM3D, StudentConfig
    from semisam.preprocess import PreprocessConfig

    cfg = demo_config(path.parent / "dataset", path.parent / "run", path.parent / "cache", schedule="tiny" if tiny else "demo")
    encoder = litemedsam_encoder(input_size=encoder_size)
    s, p = cfg.student, cfg.preprocess
    torch.manual_seed(0)
    student = SlicingSAM3D(StudentConfig(
        channels=tuple(s.channels), num_labels=1, block_depth=s.block_depth, block_overlap=s.block_overlap, context=s.context,
        image_channels=s.image_channels, encoder=encoder.name, encoder_id=encoder.weights_id, encoder_input_size=encoder.input_size,
    ))
    preprocess = PreprocessConfig(target_spacing=p.target_spacing, target_shape=p.target_shape, crop=p.crop)
    student.save(path, extra={"preprocess": preprocess.to_dict(), "postprocess": {"largest_component": bool(cfg.validation.largest_component)},
                              "labels": {"1": "target"}})
    return {"kind": "untrained", "schedule": "tiny" if tiny else "demo", "preprocess": preprocess.to_dict(),
            "channels": list(s.channels), "block_depth": s.block_depth, "encoder_size": encoder.input_size}


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One size in this (fresh) process: load, read, segment ``repeats`` times, report."""
    import resource

    import numpy as np
    import torch

    from semisam.inference import Segmenter
    from semisam.models.encoders import EmbeddingCache
    from semisam.volume import read_volume

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    def status_mb(field: str) -> Optional[float]:  # VmRSS (now) or VmHWM (peak since the last reset), Linux only
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    def reset_peak() -> bool:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    said: List[str] = []
    t = time.perf_counter()
    segmenter = Segmenter(spec["student"], backend=spec["backend"], cache=EmbeddingCache(), warn=said.append, fallback=said.append)
    load_s = time.perf_counter() - t
    encoder = segmenter.encoder
    encode_s = [0.0]
    plain_encode = encoder.encode

    def timed_encode(*args, **kwargs):  # the encoder's own time, whatever calls it
        t0 = time.perf_counter()
        try:
            return plain_encode(*args, **kwargs)
        finally:
            encode_s[0] += time.perf_counter() - t0

    encoder.encode = timed_encode
    t = time.perf_counter()
    volume = read_volume(spec["image"])
    read_s = time.perf_counter() - t
    rss_before, peak_before = status_mb("VmRSS"), peak_mb()
    peak_reset = reset_peak()
    runs = []
    seg = None
    for _ in range(int(spec["repeats"])):
        segmenter.cache = EmbeddingCache()  # nothing embedded yet: every repeat encodes
        encode_s[0] = 0.0
        reports: List[Tuple[float, int, int]] = []
        t = time.perf_counter()
        seg = segmenter.segment(volume, progress=lambda done, total: reports.append((time.perf_counter(), done, total)))
        wall = time.perf_counter() - t
        runs.append({"wall_s": wall, "encode_s": encode_s[0], "embed_phase_s": (reports[-1][0] - t) if reports else None,
                     "encoded_slices": int(segmenter.cache.encoded_slices), "progress_total": reports[-1][2] if reports else None})
    best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run
    mvox = float(np.prod(volume.shape)) / 1e6
    out: Dict[str, Any] = {
        "shape": [int(n) for n in volume.shape],
        "spacing": [round(float(v), 4) for v in volume.spacing],
        "mvox": round(mvox, 3),
        "wall_s": round(best["wall_s"], 3),
        "wall_s_runs": [round(r["wall_s"], 3) for r in runs],
        "encode_s": round(best["encode_s"], 3),
        "embed_phase_s": None if best["embed_phase_s"] is None else round(best["embed_phase_s"], 3),
        "encoded_slices": best["encoded_slices"],
        "progress_total": best["progress_total"],
        "s_per_mvox": round(best["wall_s"] / mvox, 4),
        "s_per_encoded_slice": round(best["encode_s"] / best["encoded_slices"], 4) if best["encoded_slices"] else None,
        "load_s": round(load_s, 2),
        "read_s": round(read_s, 2),
        "peak_rss_before_mb": round(peak_before),
        "rss_before_mb": None if rss_before is None else round(rss_before),
        "threads": torch.get_num_threads(),
        "encoder": encoder.cache_id.split(":fast-")[1] if ":fast-" in encoder.cache_id else encoder.cache_id.rsplit(":", 1)[-1],
        "foreground_fraction": round(float((seg.label.array > 0).mean()), 5),
        "messages": said,
    }
    segment_peak = status_mb("VmHWM") if peak_reset else None
    if segment_peak is not None:
        out["segment_peak_rss_mb"] = round(segment_peak)
    out["peak_rss_mb"] = round(max(peak_before, peak_mb(), segment_peak or 0.0))  # the reset may lower getrusage's figure too
    info = _plain_fields(seg)
    if info:
        out["segmentation"] = info
    if spec.get("label") and spec.get("score"):
        truth = read_volume(spec["label"]).array > 0
        pred = seg.label.array > 0
        denom = int(truth.sum() + pred.sum())
        out["dice"] = round(2.0 * float((truth & pred).sum()) / denom, 4) if denom else 1.0
    return out


def _plain_fields(seg) -> Dict[str, Any]:
    """Fields of a ``Segmentation`` other than its volumes that JSON can hold (e.g. the grid it
    was computed on, once it records one)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(seg) if dataclasses.is_dataclass(seg) else ():
        value = getattr(seg, f.name)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            if isinstance(value, tuple) and all(isinstance(v, int) or hasattr(v, "__index__") for v in value):
                value = [int(v) for v in value]
            else:
                continue
        if value is not None:
            out[f.name] = value
    return out


def run_child(spec: Dict[str, Any], env: Dict[str, str]) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], capture_output=True, text=True,
                          encoding="utf-8", env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"segmenting {spec['name']} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help=f"phantom sizes, comma-separated: N (a cube) or ZxYxX (default {DEFAULT_SIZES}; "
                                                      f"--tiny: {TINY_SIZES}; '' for none)")
    parser.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH", help="also segment these volumes")
    parser.add_argument("--student", default=None, help="student checkpoint (default: an untrained one of the demo's architecture)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino", "onnxruntime"), help="the encoder's runtime (default auto)")
    parser.add_argument("--encoder-size", type=int, default=None, help="encoder input side of the untrained student (default 128; --tiny: 64)")
    parser.add_argument("--repeats", type=int, default=1, help="segmentations per size (median reported; each encodes afresh)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--tiny", action="store_true", help="small sizes, the tiny schedule's student (for CI)")
    parser.add_argument("--work", default=None, help="folder for the phantoms and the student (default: a temporary one)")
    parser.add_argument("--model-cache", default=None, help="SEMISAM_CACHE of the children: converted encoders are kept in its encoders/ "
                                                            "(default: inside --work, so the first size pays the export in its load_s)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.student is not None and args.encoder_size is not None:
        parser.error("--encoder-size sets the untrained student's encoder; a given --student has its own")
    sizes_text = args.sizes if args.sizes is not None else (TINY_SIZES if args.tiny else DEFAULT_SIZES)
    try:
        sizes = [parse_size(v.strip()) for v in sizes_text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    for path in args.input:
        if not Path(path).exists():
            parser.error(f"--input {path}: no such file or folder")
    if args.student is not None and not Path(args.student).is_file():
        parser.error(f"--student {args.student}: no such file")
    if not sizes and not args.input:
        parser.error("nothing to segment: give --sizes or --input")

    import torch

    from semisam.phantom import make_phantom
    from semisam.volume import write_volume

    tmp = tempfile.TemporaryDirectory(prefix="bench_segment-")
    work = Path(args.work) if args.work else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cache_root = Path(args.model_cache) if args.model_cache else work / "semisam-cache"  # converted encoders: cache_root/encoders
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "SEMISAM_CACHE": str(cache_root.resolve())}

    if args.student:
        student_path, student = Path(args.student).resolve(), {"kind": "checkpoint", "path": str(Path(args.student).resolve())}
    else:
        student_path = work / "student" / "untrained.pt"
        student = untrained_student(student_path, args.encoder_size or (64 if args.tiny else 128), args.tiny)
    print(f"student: {student.get('path') or 'untrained, ' + student['schedule'] + ' architecture, encoder ' + str(student['encoder_size']) + ' px'}; "
          f"backend {args.backend}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    jobs = []
    for shape in sizes:
        t = time.perf_counter()
        case = make_phantom(args.seed, shape)
        phantom_s = time.perf_counter() - t
        image, label = work / f"phantom_{size_name(shape)}.nii", work / f"phantom_{size_name(shape)}_label.nii"
        write_volume(case.image, image)
        write_volume(case.label, label)
        placement = case.image.meta.get("placement", "central")
        jobs.append(({"name": size_name(shape), "image": str(image), "label": str(label)},
                     {"source": "phantom", "placement": placement, "phantom_s": round(phantom_s, 2)}))
        del case
    for path in args.input:
        jobs.append(({"name": str(path), "image": str(Path(path).resolve())}, {"source": "file"}))

    rows = []
    for spec, about in jobs:
        spec.update({"student": str(student_path), "backend": args.backend, "repeats": args.repeats, "score": student["kind"] == "checkpoint"})
        row = {"name": spec["name"], **about, **run_child(spec, env)}
        rows.append(row)
        print(f"{row['name']:>14s}: {row['wall_s']:.2f} s wall ({row['s_per_mvox']:.3f} s/Mvox), encoder {row['encode_s']:.2f} s for "
              f"{row['encoded_slices']} slices, peak RSS {row['peak_rss_mb']} MB (while segmenting {row.get('segment_peak_rss_mb', '?')} MB, "
              f"from {row['rss_before_mb']} MB), "
              f"load {row['load_s']} s" + (f", dice {row['dice']}" if "dice" in row else "")
              + "".join(f"\n{'':16s}{m}" for m in row["messages"]), flush=True)

    result: Dict[str, Any] = {"backend": args.backend, "student": student, "repeats": args.repeats, "torch": torch.__version__, "sizes": rows}
    reference = next((r for r in rows if r["shape"] == [128, 128, 128]), rows[0])
    largest = max(rows, key=lambda r: r["mvox"])
    result["ratio_s_per_mvox"] = {"largest": largest["name"], "reference": reference["name"],
                                  "value": round(largest["s_per_mvox"] / reference["s_per_mvox"], 4)}
    print(f"s/Mvox {largest['name']} / {reference['name']}: {result['ratio_s_per_mvox']['value']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
