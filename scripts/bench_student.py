#!/usr/bin/env python
"""Student variants on the demo's phantom cohort: held-out Dice and training time per variant.

Each variant is the demo's configuration (``semisam.demo.demo_config``) with some settings
changed; all variants share one cohort, one embedding cache and the same seeds, and are scored
on the same held-out phantoms (on their own grids, largest component, as the demo does).

    python scripts/bench_student.py                                   # the demo's schedule vs + image branch
    python scripts/bench_student.py --warmup-only --variant base '{}' \\
        --variant batch2 '{"data.batch_size": 2}'                     # warm-up alone, other settings

``--variant NAME JSON`` (repeatable) gives dotted TrainConfig keys and values. Progress goes to
stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.config import config_from_dict, set_dotted  # noqa: E402
from semisam.demo import demo_config, evaluate, make_test_cases  # noqa: E402
from semisam.models.student import load_student  # noqa: E402
from semisam.phantom import write_cohort  # noqa: E402
from semisam.preprocess import PreprocessConfig  # noqa: E402
from semisam.training import Trainer  # noqa: E402

DEFAULT_VARIANTS = [("demo", {}), ("image_branch", {"student.image_channels": 8})]


def run_variant(name, overrides, cohort, work, n_test, seed, warmup_only, schedule):
    run = work / f"run_{name}"
    if run.exists():  # the bench's own scratch run of an earlier call in a reused --work folder
        shutil.rmtree(run)
    cfg = demo_config(cohort, run, work / "cache", seed, schedule)
    if warmup_only:
        cfg.phases.semi.epochs = cfg.phases.finetune.epochs = 0
    data = cfg.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    cfg = config_from_dict(data, f"variant {name}")  # validated: a bad key is a clear error
    t0 = time.time()
    trainer = Trainer(cfg, progress="none")
    summary = trainer.run()
    seconds = time.time() - t0
    student, extra = load_student(Path(summary["best_checkpoint"]))
    rows = evaluate(student, trainer.encoder, trainer.cache, PreprocessConfig(**extra["preprocess"]),
                    make_test_cases(n_test, seed), largest_component=True)
    dice = [round(float(r["dice"]), 4) for r in rows]
    result = {"variant": name, "overrides": overrides, "dice": dice, "mean_dice": round(float(np.mean(dice)), 4),
              "best_val_dice": summary["best_val_dice"], "train_seconds": round(seconds, 1)}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), help="a variant: name and JSON overrides (repeatable)")
    p.add_argument("--labeled", type=int, default=8)
    p.add_argument("--unlabeled", type=int, default=6)
    p.add_argument("--validation", type=int, default=2)
    p.add_argument("--test", type=int, default=6, help="held-out phantoms (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-only", action="store_true", help="phase 0 only (labeled data)")
    p.add_argument("--schedule", choices=("demo", "tiny"), default="demo", help="tiny: a seconds-long smoke run")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one); its cache is reused")
    args = p.parse_args(argv)
    variants = [(n, json.loads(j)) for n, j in args.variant] if args.variant else DEFAULT_VARIANTS
    for name, overrides in variants:
        if not isinstance(overrides, dict):
            p.error(f"variant {name}: JSON must be an object of dotted keys, got {overrides!r}")
    with tempfile.TemporaryDirectory(prefix="semisam_bench_student_") as tmp:
        work = args.work or Path(tmp)
        cohort = write_cohort(work / "cohort", args.labeled + args.unlabeled, args.labeled, seed=args.seed, overwrite=True, validation=args.validation)
        results = [run_variant(n, o, cohort, work, args.test, args.seed, args.warmup_only, args.schedule) for n, o in variants]
    print(json.dumps({"labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test, "warmup_only": args.warmup_only,
                      "schedule": args.schedule, "variants": results}))
    return 0


if __name__ == "__main__":
    from semisam.errors import SemiSAMError

    try:
        raise SystemExit(main())
    except SemiSAMError as exc:  # a bad variant key or value: say which, no traceback
        print(f"bench_student: {exc}", file=sys.stderr)
        raise SystemExit(2)
