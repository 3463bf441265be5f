#!/usr/bin/env python
"""Does the unlabeled data pay? Semi-SAM+ variants against supervised-only, over seeds and
label counts, on held-out test cases.

    python scripts/bench_ssl.py --dataset phantom --labeled 2 4 --seeds 3
    python scripts/bench_ssl.py --dataset ../shared/data/promise12 --labeled 2 --seeds 3
    python scripts/bench_ssl.py --dataset path/to/dataset --labeled 2 --variants supervised full unet

Datasets: ``phantom`` (a fixed pool of synthetic phantoms, fixed held-out test phantoms),
``promise12`` or the folder of PROMISE12 ``.npy.gz`` volumes (converted once; a fixed test
split), or any SemiSAM dataset (folder or ``dataset.json``) with a test split (``imagesTs/`` +
``labelsTs/``, or a ``"test"`` list). Per seed, ``k`` labeled and ``--validation`` validation
cases are drawn from the labeled pool; the rest of the pool (with its labels kept as hidden
references for the pseudo-label statistics) and the dataset's own unlabeled images are the
unlabeled cases. The seed changes that draw and the training seed.

Variants (identical seeds, batches and schedule; they differ only in their loss terms):
``supervised`` (λ = β = 0, no teachers), ``mean-teacher`` (L_con only), ``teacher-only``
(L_rs-con only), ``full`` (both), and ``unet`` (a MONAI 3D U-Net from scratch, supervised,
same labeled cases and grid, the supervised run's training time).

Human lines first; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from semisam.config import TrainConfig, apply_overrides, parse_overrides
from semisam.demo import TestCase, demo_config, evaluate, make_test_cases
from semisam.models.student import load_student
from semisam.phantom import write_cohort
from semisam.preprocess import PreprocessConfig
from semisam.progress import read_metrics
from semisam.training import WARMUP_SNAPSHOT, Trainer
from semisam.volume import Volume, read_volume, write_volume

VARIANTS = ("supervised", "mean-teacher", "teacher-only", "full", "unet")


# ------------------------------------------------------------------------------------------
# Pools: labeled cases to draw from, unlabeled extras, a fixed test set
# ------------------------------------------------------------------------------------------


def phantom_pool(work: Path, n_pool: int, n_test: int):
    pool = write_cohort(work / "pool", n_pool, n_pool, seed=0, overwrite=True)
    doc = json.loads((pool / "dataset.json").read_text())
    labeled = [{"id": e["id"], "image": str(pool / e["image"]), "label": str(pool / e["label"])} for e in doc["training"]]
    return labeled, [], make_test_cases(n_test, 0), doc["labels"]


def promise12_pool(src: Path, work: Path, n_test: int):
    """PROMISE12 volumes as NIfTI (1 x 1 x 3 mm assumed: the source kept no spacing); the test
    split is a fixed draw of ``n_test`` volumes."""
    images = sorted(src.glob("image_train*.npy.gz"))
    if len(images) < n_test + 4:
        raise SystemExit(f"{src} has {len(images)} PROMISE12 volumes; at least {n_test + 4} needed")
    order = np.random.default_rng(12345).permutation(len(images))
    spacing = (1.0, 1.0, 3.0)
    labeled, tests = [], []
    for n, i in enumerate(order):
        img_path = images[i]
        cid = img_path.name.split(".")[0].replace("image_", "")
        image = Volume(np.load(gzip.open(img_path)).astype(np.float32), spacing)
        label = Volume((np.load(gzip.open(img_path.with_name(img_path.name.replace("image_", "label_")))) > 0).astype(np.uint8), spacing)
        if n < n_test:
            tests.append(TestCase(cid, image, label))
            continue
        ip, lp = work / "pool" / "images" / f"{cid}.nii.gz", work / "pool" / "labels" / f"{cid}.nii.gz"
        if not (ip.exists() and lp.exists()):
            write_volume(image, ip)
            write_volume(label, lp)
        labeled.append({"id": cid, "image": str(ip), "label": str(lp)})
    return labeled, [], tests, {"0": "background", "1": "prostate"}


def folder_pool(path: Path):
    from semisam.data import load_dataset

    spec = load_dataset(path)
    if not spec.test:
        raise SystemExit(f"{path} has no test split: add imagesTs/ + labelsTs/ (folder) or a \"test\" list (dataset.json)")
    labeled = [{"id": c.id, "image": str(c.image), "label": str(c.label)} for c in spec.labeled + spec.validation]
    unlabeled = [{"id": c.id, "image": str(c.image), **({"reference": str(c.reference)} if c.reference else {})} for c in spec.unlabeled]
    tests = [TestCase(c.id, read_volume(c.image, "image"), read_volume(c.label, "label")) for c in spec.test]
    labels = {str(k): v for k, v in spec.labels.items()} if spec.labels else {"0": "background", "1": "target"}
    return labeled, unlabeled, tests, labels, spec


def draw_dataset(out: Path, labeled_pool: List[dict], extra_unlabeled: List[dict], labels: Dict[str, str], k: int, n_val: int,
                 n_unlabeled: int, seed: int, extra: Dict[str, Any]) -> Path:
    """dataset.json with k labeled + n_val validation cases drawn from the pool for this seed;
    up to ``n_unlabeled`` of the rest (label kept as the hidden reference) + the extras unlabeled."""
    need = k + n_val
    if len(labeled_pool) < need:
        raise SystemExit(f"the labeled pool has {len(labeled_pool)} cases; k={k} + {n_val} validation need {need}")
    order = np.random.default_rng([seed, k, 0x55]).permutation(len(labeled_pool))
    pick = [labeled_pool[int(i)] for i in order]
    rest = [{"id": e["id"], "image": e["image"], "reference": e["label"]} for e in pick[need:]]
    if n_unlabeled >= 0:
        rest = rest[:n_unlabeled]
    doc = {"labels": labels, **extra, "training": pick[:k], "validation": pick[k:need], "unlabeled": rest + list(extra_unlabeled)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(doc, indent=1))
    return out / "dataset.json"


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------


def variant_config(base: TrainConfig, variant: str, output: Path) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.output = str(output)
    if variant in ("supervised", "unet"):
        cfg.loss.lambda_max, cfg.loss.beta_max, cfg.pseudo.teachers = 0.0, 0.0, []
    elif variant == "mean-teacher":
        cfg.loss.beta_max, cfg.pseudo.teachers = 0.0, []
    elif variant == "teacher-only":
        cfg.loss.lambda_max = 0.0
    elif variant != "full":
        raise SystemExit(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return cfg


def run_student(cfg: TrainConfig, tests: List[TestCase], progress: str, branch_from: Path = None) -> Dict[str, Any]:
    """Train one variant and score it. ``branch_from``: a finished run of the same seed and k
    whose warm-up (identical for every variant: same seed, same batches, labeled data only) is
    reused: its ``warmup_end/`` state seeds this run, which resumes into phase 1."""
    if Path(cfg.output).exists():
        shutil.rmtree(cfg.output)
    resume = False
    if branch_from is not None and (branch_from / WARMUP_SNAPSHOT / "last.pt").exists():
        out = Path(cfg.output)
        out.mkdir(parents=True)
        for name in ("last.pt", "best.pt"):
            if (branch_from / WARMUP_SNAPSHOT / name).exists():
                shutil.copyfile(branch_from / WARMUP_SNAPSHOT / name, out / name)
        shutil.copyfile(branch_from / "metrics.jsonl", out / "metrics.jsonl")  # resuming truncates it to the warm-up
        resume = True
    t0 = time.time()
    trainer = Trainer(cfg, progress=progress, resume=resume)
    summary = trainer.run()
    seconds = time.time() - t0
    student, extra = load_student(summary["best_checkpoint"])
    post = extra.get("postprocess", {})
    rows = evaluate(student, trainer.encoder, trainer.cache, PreprocessConfig(**extra["preprocess"]), tests,
                    largest_component=bool(post.get("largest_component")), threshold=float(post.get("threshold", 0.5)))
    records = read_metrics(Path(cfg.output) / "metrics.jsonl")
    pseudo = [r["pseudo"] for r in records if r.get("pseudo")]
    result = {
        "test_dice": [round(r["dice"], 4) for r in rows],
        "test_dice_mean": round(float(np.mean([r["dice"] for r in rows])), 4),
        "test_hd95_mm_mean": _mean([r["hd95_mm"] for r in rows]),
        "best_val_dice": summary["best_val_dice"], "best_epoch": summary["best_global_epoch"],
        "best_phase": extra.get("phase"), "train_s": round(seconds, 1), "loop_s": summary["seconds"],
    }
    if pseudo:
        result["pseudo"] = [{k: p.get(k) for k in ("refreshed", "empty", "coarse_dice_vs_reference", "dice_vs_reference",
                                                      "confident_fraction_in_union", "confident_fraction", "seconds", "prompt_growth_mm",
                                                      "val_coarse_dice", "val_pseudo_dice", "val_pseudo_dice_ungrown")} for p in pseudo]
    semi = [r for r in records if r.get("phase") == 1]
    if semi:
        result["semi_losses_last"] = {k: round(v, 4) for k, v in semi[-1]["losses"].items()}
    return result


def run_unet(cfg: TrainConfig, tests: List[TestCase], seconds: float) -> Dict[str, Any]:
    from semisam.baseline import preprocessed_pair, segment_unet, train_unet
    from semisam.data import load_dataset
    from semisam.training import dice_hd95

    spec = load_dataset(cfg.dataset)
    # The U-Net baseline trains and segments on one fixed grid (target_shape around the field of
    # view): a whole-field-of-view setting falls back to that crop for it.
    crop = "fov" if cfg.preprocess.crop == "whole" else cfg.preprocess.crop
    pre = spec.preprocess_config(target_spacing=cfg.preprocess.target_spacing, target_shape=cfg.preprocess.target_shape, crop=crop)
    train = [preprocessed_pair(read_volume(c.image, "image"), read_volume(c.label, "label"), pre) for c in spec.labeled]
    val = [preprocessed_pair(read_volume(c.image, "image"), read_volume(c.label, "label"), pre) for c in spec.validation]
    t0 = time.time()
    net, info = train_unet([a for a, _ in train], [b for _, b in train], [a for a, _ in val], [b for _, b in val], seconds, seed=cfg.seed)
    dices = []
    for case in tests:
        seg = segment_unet(net, case.image, pre, largest_component=cfg.validation.largest_component)
        dices.append(dice_hd95(seg, case.label.array, tuple(case.image.spacing[::-1]), 1, hd95=False)[0])
    return {"test_dice": [round(d, 4) for d in dices], "test_dice_mean": round(float(np.mean(dices)), 4),
            "best_val_dice": info["best_val_dice"], "steps": info["steps"], "train_s": round(time.time() - t0, 1), "loop_s": info["seconds"]}


def reuse(src: Path, cfg: TrainConfig) -> Dict[str, Any]:
    """The result of an earlier bench's run of this variant (``--reuse-first``), refused when its
    settings differ in anything but the loss and pseudo-label sections (the ones a later
    variant changes after the shared warm-up)."""
    path = src / "result.json"
    if not path.exists():
        raise SystemExit(f"--reuse-first: {path} does not exist (run that bench to the end first)")
    doc = json.loads(path.read_text())
    mine, theirs = cfg.to_dict(), dict(doc["config"])
    ids = [{key: [e.get("id") for e in json.loads(Path(d["dataset"]).read_text()).get(key, [])] for key in ("training", "validation", "unlabeled")}
           for d in (mine, theirs)]
    if ids[0] != ids[1]:
        raise SystemExit(f"--reuse-first: {src} was trained on another draw of cases ({ids[1]['training']} labeled, here {ids[0]['training']})")
    for d in (mine, theirs):
        for key in ("output", "dataset", "loss", "pseudo"):  # the data: compared by case ids above
            d.pop(key, None)
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise SystemExit(f"--reuse-first: {src} was trained with other settings ({', '.join(diff)})")
    return dict(doc["result"], reused_from=str(src))


def _mean(values):
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def _sd(values):
    return round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0


def summarise(runs: List[Dict[str, Any]], variants: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in sorted({r["labeled"] for r in runs}):
        mine = [r for r in runs if r["labeled"] == k]
        entry: Dict[str, Any] = {}
        for v in variants:
            vals = [r["variants"][v]["test_dice_mean"] for r in mine if v in r["variants"]]
            entry[v] = {"mean": _mean(vals), "sd": _sd(vals), "per_seed": vals}
        if "supervised" in variants:
            for v in variants:
                if v == "supervised":
                    continue
                diffs = [round(r["variants"][v]["test_dice_mean"] - r["variants"]["supervised"]["test_dice_mean"], 4)
                         for r in mine if v in r["variants"] and "supervised" in r["variants"]]
                entry[f"{v}_minus_supervised"] = {"mean": _mean(diffs), "sd": _sd(diffs), "min": min(diffs) if diffs else None, "per_seed": diffs}
        out[str(k)] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="phantom", help="phantom | promise12 (or the PROMISE12 folder) | a SemiSAM dataset with a test split")
    ap.add_argument("--labeled", type=int, nargs="+", default=[2], help="labeled counts k to try (default 2)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1: the labeled/unlabeled draw and the training seed")
    ap.add_argument("--variants", nargs="+", default=["supervised", "full"], choices=VARIANTS)
    ap.add_argument("--unlabeled", type=int, default=None, help="unlabeled cases drawn from the pool (default: phantom 6, promise12 8, folder all)")
    ap.add_argument("--validation", type=int, default=4, help="validation cases drawn per seed (default 4: with 2, best.pt was picked on noise)")
    ap.add_argument("--test", type=int, default=None, help="test cases (phantom default 6, promise12 default 8; a folder uses its split)")
    ap.add_argument("--schedule", default="demo", choices=("demo", "tiny"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every variant (e.g. loss.pseudo_loss=mse)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one); its cache/ is reused")
    ap.add_argument("--cache-dir", default=None, help="embedding cache shared between benches (default: <out>/cache)")
    ap.add_argument("--reuse-first", default=None, metavar="WORK", help="take the first variant's runs (result and warm-up) from an earlier bench's work folder instead of training them again")
    ap.add_argument("--no-branch", action="store_true", help="train every variant's warm-up itself (default: later variants start from the first one's warm-up, which is identical)")
    ap.add_argument("--progress", default="none", choices=("text", "none", "tqdm"))
    ap.add_argument("--input-size", type=int, default=None, help="encoder.input_size (default: the demo's, 128)")
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="semisam-bench-ssl-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    extra_doc: Dict[str, Any] = {}
    if args.dataset == "phantom":
        n_unl = 6 if args.unlabeled is None else args.unlabeled
        n_test = 6 if args.test is None else args.test
        labeled_pool, extra_unl, tests, labels = phantom_pool(work, max(args.labeled) + args.validation + n_unl, n_test)
        name = "phantom"
    elif args.dataset == "promise12" or Path(args.dataset, "image_train00.npy.gz").exists():
        src = Path(args.dataset) if args.dataset != "promise12" else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "promise12"
        n_unl = 8 if args.unlabeled is None else args.unlabeled
        labeled_pool, extra_unl, tests, labels = promise12_pool(src, work, 8 if args.test is None else args.test)
        name = "promise12"
    else:
        labeled_pool, extra_unl, tests, labels, spec = folder_pool(Path(args.dataset))
        n_unl = -1 if args.unlabeled is None else args.unlabeled
        extra_doc = {"image_type": spec.image_type, "beam_axis": spec.beam_axis}
        name = str(args.dataset)
    print(f"bench_ssl: {name}: labeled pool {len(labeled_pool)}, extra unlabeled {len(extra_unl)}, test {len(tests)}; "
          f"k = {args.labeled}, seeds {args.seeds}, variants {args.variants}", flush=True)
    runs = []
    first_dirs: Dict[Any, Path] = {}
    for seed in range(args.seeds):
        for k in args.labeled:
            ds = draw_dataset(work / f"s{seed}_k{k}" / "data", labeled_pool, extra_unl, labels, k, args.validation, n_unl, seed, extra_doc)
            base = demo_config(ds, work / "unused", Path(args.cache_dir) if args.cache_dir else work / "cache", seed, args.schedule)
            # The demo's warm-up is 50 epochs of its 8 labeled cases (400 steps); an epoch is one pass
            # over the labeled cases, so at small k the same epochs are too few steps to learn
            # anything (k = 2: 100 steps, validation Dice 0). Every k gets the demo's 400 warm-up steps.
            base.phases.warmup.epochs = max(1, math.ceil(base.phases.warmup.epochs * 8 / k)) if args.schedule == "demo" else base.phases.warmup.epochs
            if name == "promise12":
                base.preprocess.target_spacing, base.preprocess.target_shape, base.preprocess.crop = (1.0, 1.0, 3.0), (32, 128, 128), "center"
            base.encoder.compile = args.compile
            if args.input_size is not None:
                base.encoder.input_size = args.input_size
            if args.set:
                base = apply_overrides(base, parse_overrides(args.set))
            record: Dict[str, Any] = {"seed": seed, "labeled": k, "variants": {}}
            order = [v for v in args.variants if v != "unet"] + (["unet"] if "unet" in args.variants else [])
            for v in order:
                out = work / f"s{seed}_k{k}" / v
                if v == "unet":
                    budget = record["variants"].get("supervised", {}).get("loop_s") or 120.0
                    res = run_unet(variant_config(base, v, out), tests, float(budget))
                elif v == order[0] and args.reuse_first:
                    src = Path(args.reuse_first) / f"s{seed}_k{k}" / v
                    res = reuse(src, variant_config(base, v, out))
                    first_dirs[(seed, k)] = src
                else:
                    first = first_dirs.get((seed, k), work / f"s{seed}_k{k}" / order[0])
                    branch = first if (v != order[0] and not args.no_branch) else None
                    cfg_v = variant_config(base, v, out)
                    res = run_student(cfg_v, tests, args.progress, branch)
                    res["branched_from"] = str(branch) if branch else None
                    (out / "result.json").write_text(json.dumps({"config": cfg_v.to_dict(), "result": res}))
                record["variants"][v] = res
                extra = ""
                if res.get("pseudo"):
                    p = res["pseudo"][-1]
                    extra = (f"; coarse {p.get('coarse_dice_vs_reference')}, pseudo {p.get('dice_vs_reference')} vs truth, "
                             f"confident in union {p.get('confident_fraction_in_union')}, prompt grown {p.get('prompt_growth_mm')} mm")
                print(f"seed {seed} k={k} {v:<13} test Dice {res['test_dice_mean']:.4f} {res['test_dice']} "
                      f"(best val {res.get('best_val_dice')}, epoch {res.get('best_epoch')}, phase {res.get('best_phase')}; {res['train_s']:.0f} s{extra})", flush=True)
            runs.append(record)
    summary = summarise(runs, args.variants)
    for k, entry in summary.items():
        for v in args.variants:
            e = entry[v]
            diff = entry.get(f"{v}_minus_supervised")
            d = f"   {v} - supervised {diff['mean']:+.4f} ± {diff['sd']:.4f} (min {diff['min']:+.4f})" if diff else ""
            print(f"k={k} {v:<13} {e['mean']:.4f} ± {e['sd']:.4f}{d}")
    line = {
        "bench": "ssl", "dataset": name, "labeled": args.labeled, "seeds": args.seeds, "variants": args.variants,
        "schedule": args.schedule, "overrides": args.set, "test": len(tests), "validation": args.validation,
        "unlabeled": n_unl, "grid": list(base.preprocess.target_shape), "encoder_input_size": base.encoder.input_size,
        "epochs": [base.phases.warmup.epochs, base.phases.semi.epochs, base.phases.finetune.epochs],
        "summary": summary, "runs": runs, "total_s": round(time.time() - t_all, 1), "work": str(work),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
