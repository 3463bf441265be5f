#!/usr/bin/env python
"""One semi-supervised training epoch with and without the slice-embedding cache.

Both epochs run the same code (``Trainer._run_epoch``, phase 1: labeled + unlabeled blocks,
student + EMA teacher, all losses) on the demo's phantom cohort and grid. "Without the cache"
replaces each volume's cached embeddings by an object that runs the frozen encoder on the
block's slices whenever the training loop takes a block, i.e. what training costs when the
encoder is not shared through a cache. Pseudo-label refreshes are not part of either epoch.

    python scripts/bench_cache.py [--compile] [--repeats 3]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.demo import demo_config  # noqa: E402
from semisam.phantom import write_cohort  # noqa: E402
from semisam.training import Trainer  # noqa: E402


class Reencode:
    """Stands in for a cached ``(z, C, G, G)`` embedding stack: slicing it runs the encoder."""

    def __init__(self, image, encoder, shape):
        self.image, self.encoder, self.shape = image, encoder, shape
        self.slices = 0

    def __getitem__(self, index):
        chunk = self.image[index]
        self.slices += chunk.shape[0]
        return self.encoder.encode(chunk).half()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="cached epochs to time (median)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="semisam-bench-cache-"))
    cohort = write_cohort(work / "cohort", 10, 4, seed=0, overwrite=True, validation=2)
    cfg = demo_config(cohort, work / "run", work / "cache", 0)
    cfg.encoder.compile = args.compile
    trainer = Trainer(cfg, progress="none")
    # set-up as Trainer.run does, without training
    from semisam.progress import Progress

    trainer.progress = Progress("none")
    trainer._load_data()
    trainer._embed_all()
    trainer._build_student()
    trainer.teachers, trainer.pseudo, trainer._pseudo_version, trainer._target_cache, trainer._seen = None, {}, {}, {}, []
    steps = trainer.steps_per_epoch(1)

    def epoch() -> float:
        t0 = time.perf_counter()
        trainer._run_epoch(1, 0, 41, 1e-3, 0, 100, 40)
        return time.perf_counter() - t0

    epoch()  # warm-up (allocations, oneDNN kernels)
    cached = [epoch() for _ in range(args.repeats)]
    saved = {it.id: it.emb for it in trainer.labeled + trainer.unlabeled}
    wrappers = []
    for it in trainer.labeled + trainer.unlabeled:
        it.emb = Reencode(it.image, trainer.encoder, tuple(saved[it.id].shape))
        wrappers.append(it.emb)
    uncached = epoch()
    for it in trainer.labeled + trainer.unlabeled:
        it.emb = saved[it.id]
    med = statistics.median(cached)
    # the decoder's training step in fp32 and under CPU bf16 autocast (what optim.amp=auto picks)
    from semisam.models.student import SlicingSAM3D

    x = torch.randn(cfg.data.batch_size, 256, cfg.student.block_depth, 64, 64)
    amp_times = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        net = SlicingSAM3D(trainer.student.config)
        runs = []
        for _ in range(4):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(x, tuple(cfg.preprocess.target_shape[1:]))
            out.float().mean().backward()
            runs.append(time.perf_counter() - t0)
        amp_times[name] = round(statistics.median(runs[1:]), 3)
    line = {
        "bench": "epoch_cache", "torch": torch.__version__, "threads": torch.get_num_threads(), "compile": args.compile,
        "grid": list(cfg.preprocess.target_shape), "batch": cfg.data.batch_size, "block_depth": cfg.student.block_depth,
        "steps_per_epoch": steps, "cached_epoch_s": [round(c, 3) for c in cached], "cached_epoch_median_s": round(med, 3),
        "uncached_epoch_s": round(uncached, 2), "slices_encoded_uncached": sum(w.slices for w in wrappers),
        "ratio": round(uncached / med, 1),
        "decoder_step_s": amp_times, "bf16_speedup": round(amp_times["fp32"] / amp_times["bf16"], 2),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
