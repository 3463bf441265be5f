#!/usr/bin/env python
"""Semi-supervised (Semi-SAM+) against supervised-only, identical seeds and schedule.

Both runs see exactly the same labeled blocks in the same order (same sampler, same seeds,
unlabeled blocks in every batch); the supervised-only run sets λ = β = 0 and has no teachers,
so the unlabeled blocks contribute nothing. The difference in held-out Dice is the effect of
consistency + pseudo-labels alone.

    python scripts/bench_ssl.py                                  # phantoms: k=4, U=6
    python scripts/bench_ssl.py --dataset ../shared/data/promise12 --labeled 4 --unlabeled 12

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semisam.demo import TestCase, demo_config, evaluate, make_test_cases  # noqa: E402
from semisam.models.student import load_student  # noqa: E402
from semisam.phantom import write_cohort  # noqa: E402
from semisam.preprocess import PreprocessConfig  # noqa: E402
from semisam.progress import read_metrics  # noqa: E402
from semisam.training import Trainer  # noqa: E402
from semisam.volume import Volume, write_volume  # noqa: E402


def promise12_cohort(src: Path, out: Path, k: int, n_unlabeled: int, n_val: int, n_test: int, seed: int):
    """Write a dataset folder (dataset.json) from PROMISE12 .npy.gz volumes; returns test cases.
    The source kept no spacing: 1 mm in-plane and 3 mm between slices are assumed."""
    images = sorted(src.glob("image_train*.npy.gz"))
    need = k + n_unlabeled + n_val + n_test
    if len(images) < need:
        raise SystemExit(f"{src} has {len(images)} volumes; {need} needed")
    order = np.random.default_rng(seed).permutation(len(images))[:need]
    spacing = (1.0, 1.0, 3.0)
    doc = {"labels": {"0": "background", "1": "prostate"}, "image_type": "bmode", "training": [], "unlabeled": [], "validation": []}
    tests = []
    for n, i in enumerate(order):
        img_path = images[i]
        lab_path = img_path.with_name(img_path.name.replace("image_", "label_"))
        image = np.load(gzip.open(img_path)).astype(np.float32)
        label = (np.load(gzip.open(lab_path)) > 0).astype(np.uint8)
        cid = img_path.name.split(".")[0].replace("image_", "")
        vol, lab = Volume(image, spacing), Volume(label, spacing)
        if n < k + n_unlabeled + n_val:
            write_volume(vol, out / "images" / f"{cid}.nii.gz")
            write_volume(lab, out / "labels" / f"{cid}.nii.gz")
            entry = {"id": cid, "image": f"images/{cid}.nii.gz"}
            if n < k:
                doc["training"].append({**entry, "label": f"labels/{cid}.nii.gz"})
            elif n < k + n_unlabeled:
                doc["unlabeled"].append({**entry, "reference": f"labels/{cid}.nii.gz"})
            else:
                doc["validation"].append({**entry, "label": f"labels/{cid}.nii.gz"})
        else:
            tests.append(TestCase(cid, vol, lab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(doc, indent=1))
    return out, tests


def run(cfg, tests, name: str, progress: str):
    t0 = time.time()
    trainer = Trainer(cfg, progress=progress)
    summary = trainer.run()
    seconds = time.time() - t0
    student, extra = load_student(summary["best_checkpoint"])
    rows = evaluate(student, trainer.encoder, trainer.cache, PreprocessConfig(**extra["preprocess"]), tests,
                    largest_component=bool(extra.get("postprocess", {}).get("largest_component")))
    records = read_metrics(Path(cfg.output) / "metrics.jsonl")
    pseudo = [r["pseudo"] for r in records if r.get("pseudo")]
    result = {
        "test_dice_mean": round(float(np.mean([r["dice"] for r in rows])), 4),
        "test_dice": [round(r["dice"], 4) for r in rows],
        "test_hd95_mm_mean": _mean([r["hd95_mm"] for r in rows]),
        "best_val_dice": summary["best_val_dice"], "best_epoch": summary["best_global_epoch"],
        "train_s": round(seconds, 1),
    }
    if pseudo:
        result["pseudo_last"] = pseudo[-1]
        result["pseudo_dice_vs_reference"] = [p.get("dice_vs_reference") for p in pseudo]
    print(f"[{name}] test Dice {result['test_dice_mean']:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return result


def _mean(values):
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 3) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="phantom", help="'phantom' or a PROMISE12 folder (../shared/data/promise12)")
    ap.add_argument("--labeled", type=int, default=4)
    ap.add_argument("--unlabeled", type=int, default=6)
    ap.add_argument("--validation", type=int, default=2)
    ap.add_argument("--test", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", default="demo", choices=("demo", "tiny"))
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile the encoder")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one); its cache/ is reused")
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default: <out>/cache); e.g. the demo's, same phantoms")
    ap.add_argument("--progress", default="text", choices=("text", "none", "tqdm"))
    ap.add_argument("--input-size", type=int, default=None,
                    help="encoder.input_size for both runs (default: the demo's, 128; 256 = LiteMedSAM's native side)")
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="semisam-bench-ssl-"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    t0 = time.time()
    if args.dataset == "phantom":
        cohort = write_cohort(work / "cohort", args.labeled + args.unlabeled, args.labeled, seed=args.seed, overwrite=True, validation=args.validation)
        tests = make_test_cases(args.test, args.seed)
        cfg = demo_config(cohort, work / "semi", cache, args.seed, args.schedule)
        name = "phantom"
    else:
        cohort, tests = promise12_cohort(Path(args.dataset), work / "cohort", args.labeled, args.unlabeled, args.validation, args.test, args.seed)
        cfg = demo_config(cohort, work / "semi", cache, args.seed, args.schedule)
        cfg.preprocess.target_spacing = (1.0, 1.0, 3.0)  # the volumes' own grid: no resampling
        cfg.preprocess.target_shape = (32, 128, 128)
        cfg.preprocess.crop = "center"
        cfg.augment.inplane_flip = True
        name = "promise12"
    cfg.encoder.compile = args.compile
    if args.input_size is not None:
        cfg.encoder.input_size = args.input_size
    sup = copy.deepcopy(cfg)
    sup.output = str(work / "supervised")
    sup.loss.lambda_max = 0.0
    sup.loss.beta_max = 0.0
    sup.pseudo.teachers = []
    for c in (cfg, sup):
        if Path(c.output).exists():
            import shutil

            shutil.rmtree(c.output)
    semi_result = run(cfg, tests, "semi-supervised", args.progress)
    sup_result = run(sup, tests, "supervised-only", args.progress)
    line = {
        "bench": "ssl", "dataset": name, "labeled": args.labeled, "unlabeled": args.unlabeled,
        "validation": args.validation, "test": len(tests), "seed": args.seed, "schedule": args.schedule,
        "grid": list(cfg.preprocess.target_shape), "encoder_input_size": cfg.encoder.input_size, "epochs": [cfg.phases.warmup.epochs, cfg.phases.semi.epochs, cfg.phases.finetune.epochs],
        "semi": semi_result, "supervised": sup_result,
        "delta_test_dice": round(semi_result["test_dice_mean"] - sup_result["test_dice_mean"], 4),
        "total_s": round(time.time() - t0, 1), "work": str(work),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
