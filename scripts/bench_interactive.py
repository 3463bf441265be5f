#!/usr/bin/env python
"""Simulated-user benchmark of the interactive core (``semisam.interactive``).

A simulated user clicks, like the RITM / SAM protocol, at the centre (the maximum of the
distance transform) of the largest error region of the current mask: a positive click in a
false negative region, a negative click in a false positive one. Each new click is sent with
all earlier ones to ``InteractiveSession.predict`` (which applies only the new one).

Cases:
* phantom target slices: ``semisam.phantom.make_phantom`` volumes (raw B-mode, anisotropic
  spacing), along each array axis the slice with the largest target area;
* HC18 fetal-head ultrasound images (``../shared/data/hc18-dev``, skipped when absent), one
  slice each, with their pixel size.

Reported per dataset: Dice after 1, 3 and 5 clicks and NoC@90 (clicks to reach Dice >= 0.90,
at most 20; 20 when never reached), median and mean. Latency: the first click on a new slice
(includes its encoding), a click on a slice whose embedding is cached (median over all such
clicks), the first click on a cached slice (candidate boxes), and propagation through a
128-slice phantom (seconds in all and per slice).

Prefetch (``--no-prefetch`` skips it): the Segment Editor effect's worker
(``SemiSAMSegmentLib.worker.ModelWorker`` owning a ``Refiner`` on the same session) on phantom
volumes: the first click on a new slice (nothing embedded), then, as the effect does, the
neighbours are prefetched while idle; the user scrolls to the next slice, waits 1 s and clicks
there (time from the click's submission to its mask); and a repeated click (same prompts on an
embedded slice: no decoding, so it measures the worker's answer time) alone and while a prefetch
of far slices is running (it must not wait for it).

``--compare`` runs the click-rule variants of ``VARIANTS`` on the same slices (the
embeddings are shared) and prints one line each. Human lines first, one JSON object last.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from scipy import ndimage

warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.interactive import ClickPolicy, InteractiveSession  # noqa: E402
from semisam.phantom import make_phantom  # noqa: E402

HC18 = REPO.parent / "shared" / "data" / "hc18-dev"
MAX_CLICKS = 20

#: Click-rule variants compared with ``--compare``: ClickPolicy fields, or the session
#: settings "square_pixels" and "precision"; each differs from the default in one thing.
VARIANTS: Dict[str, dict] = {
    "default": {},
    "select=iou": {"select": "iou"},
    "select=consensus*iou": {"select": "consensus*iou"},
    "scales=0.05..0.33 (6)": {"scales": (0.05, 0.08, 0.12, 0.17, 0.24, 0.33)},
    "refine=0": {"refine": 0},
    "threshold=0": {"threshold": 0.0},
    "local_radius=24": {"local_radius": 24.0},
    "local_radius=48": {"local_radius": 48.0},
    "core=False": {"core": False},
    "constrain=inside": {"constrain": "inside"},
    "constrain=pixel": {"constrain": "pixel"},
    "adaptive=False": {"adaptive": False},
    "pos_inside=push": {"pos_inside": "push"},
    "neg_inside=none": {"neg_inside": "none"},
    "remove_parts=False": {"remove_parts": False},
    "square_pixels=False": {"square_pixels": False},
    "precision=fp32": {"precision": "fp32"},
}


@dataclass
class Case:
    dataset: str
    name: str
    image: np.ndarray  # raw (z, y, x)
    spacing: tuple  # (x, y, z) mm
    axis: int
    index: int
    truth: np.ndarray  # (rows, cols) bool


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


def next_click(pred: np.ndarray, truth: np.ndarray):
    """(row, col, positive) at the centre of the largest error region, or None when perfect."""
    best = None
    for positive, error in ((True, truth & ~pred), (False, pred & ~truth)):
        labels, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (sizes[k - 1], positive, labels == k)
    if best is None:
        return None
    _, positive, region = best
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(r), int(c), positive)


def phantom_cases(seeds, shape, axes) -> List[Case]:
    cases = []
    for seed in seeds:
        ph = make_phantom(seed, shape)
        label = ph.label.array > 0
        for axis in axes:
            area = label.sum(axis=tuple(a for a in range(3) if a != axis))
            index = int(np.argmax(area))
            truth = np.take(label, index, axis=axis)
            cases.append(Case("phantom", f"phantom{seed}-axis{axis}", ph.image.array, tuple(ph.image.spacing), axis, index, truth))
    return cases


def hc18_cases(n: int) -> List[Case]:
    if not HC18.is_dir() or n <= 0:
        return []
    from semisam.volume import read_volume

    rows = list(csv.reader((HC18 / "pixel_size_and_HC.csv").open()))[1:]
    cases = []
    for name, pixel, _ in rows[:n]:
        image = read_volume(HC18 / name).array
        truth = read_volume(HC18 / name.replace(".png", "_Annotation.png"), "label").array[0] > 0
        ps = float(pixel)
        cases.append(Case("hc18", name, image, (ps, ps, 1.0), 0, 0, truth))
    return cases


def simulate(session: InteractiveSession, case: Case, max_clicks: int = MAX_CLICKS) -> dict:
    """One simulated user on one slice; returns Dice per click, NoC@90 and latencies."""
    session.reset(case.axis, case.index)
    clicks, pred = [], np.zeros(case.truth.shape, bool)
    dices, seconds, encoded, decoded = [], [], [], []
    for _ in range(max_clicks):
        click = next_click(pred, case.truth)
        if click is None:  # perfect: later clicks would change nothing
            dices.append(1.0)
            continue
        clicks.append(click)
        t = time.perf_counter()
        pred = session.predict(case.axis, case.index, clicks, previous=pred if pred.any() else None)
        seconds.append(time.perf_counter() - t)
        encoded.append(bool(session.last_info["encoded"]))
        decoded.append(int(session.last_info["decoded"]))
        dices.append(dice(pred, case.truth))
    noc = next((k + 1 for k, d in enumerate(dices) if d >= 0.90), MAX_CLICKS)
    return {"dice": dices, "noc90": noc, "seconds": seconds, "encoded": encoded, "decoded": decoded}


def summarise(results: List[dict]) -> dict:
    def at(k):
        return [r["dice"][min(k, len(r["dice"])) - 1] for r in results]

    noc = [r["noc90"] for r in results]
    return {
        "n": len(results),
        **{f"dice@{k}": {"median": round(float(np.median(at(k))), 4), "mean": round(float(np.mean(at(k))), 4)} for k in (1, 3, 5)},
        "noc90": {"median": float(np.median(noc)), "mean": round(float(np.mean(noc)), 2)},
    }


#: Slice embeddings of the cases, kept between runs so --compare encodes each slice once
#: (the session's own cache is private and emptied by set_image; this is a benchmark).
EMBEDDINGS: Dict[tuple, object] = {}


def set_case(session: InteractiveSession, case: Case) -> None:
    """set_image for the case's volume, with its slice embedding restored when known."""
    session.set_image(case.image, case.spacing)
    key = (case.name, case.axis, case.index, session.square_pixels)
    if key in EMBEDDINGS:
        session._embeddings[(case.axis, case.index)] = EMBEDDINGS[key]


def keep_case(session: InteractiveSession, case: Case) -> None:
    key = (case.name, case.axis, case.index, session.square_pixels)
    if (case.axis, case.index) in session._embeddings:
        EMBEDDINGS[key] = session._embeddings[(case.axis, case.index)]


def run_all(session: InteractiveSession, cases: List[Case], max_clicks: int) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for case in cases:
        set_case(session, case)
        out.setdefault(case.dataset, []).append(simulate(session, case, max_clicks))
        keep_case(session, case)
    return out


def bench_propagation(session: InteractiveSession, depth: int, seed: int = 7) -> dict:
    """Propagate the truth of the largest target slice through every slice of a phantom
    (``stop_when_empty=False``, timed, includes encoding), then again with the stopping
    rule (embeddings cached) for its 3D Dice."""
    ph = make_phantom(seed, (depth, 96, 96))
    label = ph.label.array > 0
    z = int(np.argmax(label.sum(axis=(1, 2))))
    session.set_image(ph.image.array, ph.image.spacing)
    before = session.encoded_slices
    t = time.perf_counter()
    full = session.propagate(0, z, label[z], stop_when_empty=False)
    total = time.perf_counter() - t
    encoded = session.encoded_slices - before
    t = time.perf_counter()
    stopped = session.propagate(0, z, label[z])
    cached = time.perf_counter() - t
    zs = np.flatnonzero(stopped.any(axis=(1, 2)))
    return {
        "slices": depth - 1,
        "seconds": round(total, 2),
        "seconds_per_slice": round(total / max(depth - 1, 1), 3),
        "encoded": int(encoded),
        "cached_seconds_per_slice": round(cached / max(len(zs) - 1, 1), 3),
        "dice3d_stop": round(dice(stopped, label), 4),
        "dice3d_nostop": round(dice(full, label), 4),
        "target_slices": int(label.any(axis=(1, 2)).sum()),
        "propagated_slices": int(len(zs)),
    }


def bench_prefetch(session: InteractiveSession, seeds, idle_s: float = 1.0) -> dict:
    """Clicks through the effect's worker with idle prefetching (see the module doc)."""
    sys.path.insert(0, str(REPO / "SemiSAMSegment"))
    from SemiSAMSegmentLib.refine import Refiner
    from SemiSAMSegmentLib.worker import ModelWorker

    refiner = Refiner(session=session, medsam2=None)
    worker = ModelWorker(lambda: refiner, name="bench worker")

    def click(z, point):
        t = time.perf_counter()
        worker.submit(lambda r, c: r.predict(0, z, [point]), key="predict").result(timeout=300)
        return time.perf_counter() - t, bool(session.last_info["encoded"])

    new, neighbour, during, cached = [], [], [], []
    try:
        for seed in seeds:
            ph = make_phantom(seed, (64, 96, 96))
            label = ph.label.array > 0
            z = int(np.argmax(label.sum(axis=(1, 2))))
            worker.submit(lambda r, c: r.set_volume(ph.image.array, ph.image.spacing, key=("bench", seed))).result(timeout=60)
            first = next_click(np.zeros_like(label[z]), label[z])
            new.append(click(z, first))
            worker.submit_idle(lambda r, c: r.prefetch(0, z, cancel=c.is_set))  # after the result is shown
            time.sleep(0.1)  # the user scrolls to the next slice
            worker.submit_idle(lambda r, c: r.prefetch(0, z + 1, cancel=c.is_set))  # the slice under the mouse
            time.sleep(idle_s)
            neighbour.append(click(z + 1, next_click(np.zeros_like(label[z + 1]), label[z + 1])))
            cached.append(click(z, first)[0])
            # a click on an embedded slice while a prefetch of far slices (not embedded) runs
            far = worker.submit_idle(lambda r, c: r.prefetch(0, 5, cancel=c.is_set))
            time.sleep(0.05)
            during.append(click(z, first)[0])
            far.cancelled() or far.result(timeout=60)
    finally:
        worker.shutdown()
    ms = lambda v: round(1000 * float(np.median(v)), 1)  # noqa: E731
    return {
        "cases": len(seeds),
        "idle_s": idle_s,
        "first_click_new_slice_ms": ms([t for t, _ in new]),
        "first_click_prefetched_neighbour_ms": ms([t for t, _ in neighbour]),
        "prefetched_neighbour_was_embedded": [not e for _, e in neighbour],
        "repeat_click_ms": ms(cached),
        "repeat_click_during_prefetch_ms": ms(during),
        "per_case_ms": {"new": [round(1000 * t, 1) for t, _ in new], "neighbour": [round(1000 * t, 1) for t, _ in neighbour],
                        "during_prefetch": [round(1000 * t, 1) for t in during]},
    }


def latency_summary(per_dataset: Dict[str, List[dict]]) -> dict:
    first, cached, decoding = [], [], []
    for results in per_dataset.values():
        for r in results:
            for s, e, d in zip(r["seconds"], r["encoded"], r["decoded"]):
                (first if e else cached).append(s)
                if not e and d == 1:
                    decoding.append(s)
    return {
        "first_click_new_slice_s": round(float(np.median(first)), 3) if first else None,
        "cached_click_ms": round(1000 * float(np.median(cached)), 1) if cached else None,
        "cached_click_p90_ms": round(1000 * float(np.percentile(cached, 90)), 1) if cached else None,
        "cached_clicks": len(cached),
        "cached_click_with_decode_ms": round(1000 * float(np.median(decoding)), 1) if decoding else None,
        "cached_clicks_with_decode": len(decoding),
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few cases, 10 clicks, a short propagation")
    ap.add_argument("--hc18", type=int, default=None, help="HC18 images (default 16, quick 3)")
    ap.add_argument("--phantoms", type=int, default=None, help="phantoms, 3 axes each (default 4, quick 1)")
    ap.add_argument("--compare", action="store_true", help="also run the click-rule variants")
    ap.add_argument("--variants", nargs="*", default=None, help="subset of variants for --compare")
    ap.add_argument("--no-propagation", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino", "onnxruntime"), help="the encoder's runtime (default auto)")
    ap.add_argument("--precision", default="auto", help="the encoder's precision on that runtime (auto, fp32, bf16)")
    args = ap.parse_args(argv)

    n_hc = args.hc18 if args.hc18 is not None else (3 if args.quick else 16)
    n_ph = args.phantoms if args.phantoms is not None else (1 if args.quick else 4)
    max_clicks = 10 if args.quick else MAX_CLICKS
    import torch

    from semisam.models.backends import accelerated_encoder
    from semisam.models.encoders import build_litemedsam, litemedsam_encoder

    t0 = time.perf_counter()
    net = build_litemedsam()
    encoder = accelerated_encoder(litemedsam_encoder(net), args.backend, args.precision)
    session = InteractiveSession(net=net, encoder=encoder)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s (encoder {encoder.cache_id.split(':fast-')[-1]}); torch threads {torch.get_num_threads()}")
    cases = phantom_cases(range(200, 200 + n_ph), (64, 96, 96), (0, 1, 2)) + hc18_cases(n_hc)
    print(f"{len(cases)} slices: " + ", ".join(f"{d} {sum(c.dataset == d for c in cases)}" for d in dict.fromkeys(c.dataset for c in cases)))

    t = time.perf_counter()
    results = run_all(session, cases, max_clicks)
    summary = {d: summarise(r) for d, r in results.items()}
    for d, s in summary.items():
        print(f"{d:8s} n={s['n']:2d}  Dice@1/3/5 median {s['dice@1']['median']:.3f} / {s['dice@3']['median']:.3f} / {s['dice@5']['median']:.3f}"
              f"  mean {s['dice@1']['mean']:.3f} / {s['dice@3']['mean']:.3f} / {s['dice@5']['mean']:.3f}"
              f"  NoC@90 median {s['noc90']['median']:.1f} mean {s['noc90']['mean']:.2f}")
    for d, rs in results.items():
        print(f"  {d} NoC@90 per slice: {[r['noc90'] for r in rs]}")
    latency = latency_summary(results)
    print(f"latency: first click on a new slice {latency['first_click_new_slice_s']} s (with encoding); "
          f"cached click median {latency['cached_click_ms']} ms (p90 {latency['cached_click_p90_ms']} ms, {latency['cached_clicks']} clicks; "
          f"the {latency['cached_clicks_with_decode']} that moved the box, one decode: median {latency['cached_click_with_decode_ms']} ms)")
    print(f"simulation took {time.perf_counter() - t:.0f} s")

    # The first click on a slice that is already embedded: candidate boxes + one refit.
    first_cached = []
    for case in cases[: min(len(cases), 6)]:
        set_case(session, case)
        click = next_click(np.zeros_like(case.truth), case.truth)
        session.predict(case.axis, case.index, [click])
        for _ in range(3):
            session.reset(case.axis, case.index)
            t = time.perf_counter()
            session.predict(case.axis, case.index, [click])
            first_cached.append(time.perf_counter() - t)
    latency["first_click_cached_slice_ms"] = round(1000 * float(np.median(first_cached)), 1)
    print(f"latency: first click on a cached slice ({len(session.policy.scales)} candidate boxes + refit) {latency['first_click_cached_slice_ms']} ms")

    compare = {}
    if args.compare:
        names = args.variants or list(VARIANTS)
        for name in names:
            kw = dict(VARIANTS[name])
            settings = {k: kw.pop(k) for k in ("square_pixels", "precision") if k in kw}
            s2 = InteractiveSession(net=session.net, encoder=session.encoder, policy=ClickPolicy(**kw), **settings)
            r = run_all(s2, cases, max_clicks)
            compare[name] = {d: summarise(v) for d, v in r.items()}
            line = "  ".join(
                f"{d}: Dice@1 {s['dice@1']['median']:.3f} @3 {s['dice@3']['median']:.3f} NoC90 med {s['noc90']['median']:.1f} mean {s['noc90']['mean']:.2f}"
                for d, s in compare[name].items()
            )
            print(f"variant {name:22s} {line}")

    prop = None
    if not args.no_propagation:
        depth = 24 if args.quick else 128
        prop = bench_propagation(session, depth)
        print(f"propagation through {prop['slices']} slices: {prop['seconds']} s ({prop['seconds_per_slice']} s/slice, {prop['encoded']} encoded); "
              f"cached {prop['cached_seconds_per_slice']} s/slice; 3D Dice {prop['dice3d_stop']} with the stopping rule "
              f"({prop['propagated_slices']} slices, target spans {prop['target_slices']}), {prop['dice3d_nostop']} without")

    prefetch = None
    if not args.no_prefetch:
        prefetch = bench_prefetch(session, range(300, 300 + (2 if args.quick else 4)))
        print(f"prefetch ({prefetch['cases']} phantoms, through the effect's worker): first click on a new slice {prefetch['first_click_new_slice_ms']} ms; "
              f"on the neighbour scrolled to after {prefetch['idle_s']} s idle {prefetch['first_click_prefetched_neighbour_ms']} ms "
              f"(embedded ahead: {prefetch['prefetched_neighbour_was_embedded']}); a repeated click (no decoding) {prefetch['repeat_click_ms']} ms, "
              f"during a prefetch {prefetch['repeat_click_during_prefetch_ms']} ms")

    goals = {
        "noc90_le_3": all(s["noc90"]["median"] <= 3 for s in summary.values()),
        "cached_click_le_50ms": latency["cached_click_ms"] is not None and latency["cached_click_ms"] <= 50,
    }
    if prefetch is not None:
        goals["first_click_new_slice_le_300ms"] = prefetch["first_click_new_slice_ms"] <= 300
        goals["prefetched_neighbour_le_50ms"] = prefetch["first_click_prefetched_neighbour_ms"] <= 50
    print(f"goals: {goals}")
    record = {"quick": args.quick, "max_clicks": max_clicks, "encoder": encoder.cache_id.split(":fast-")[-1], "datasets": summary,
              "latency": latency, "propagation": prop, "prefetch": prefetch, "goals": goals}
    if compare:
        record["compare"] = compare
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
