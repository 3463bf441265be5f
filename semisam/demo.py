"""The embedded default end to end: a phantom cohort, three-phase Semi-SAM+ training with the
shipped LiteMedSAM (encoder + teacher), segmentation of held-out phantoms, a Dice table,
overlays and output volumes. Also the building blocks of ``scripts/bench_ssl.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .config import TrainConfig
from .volume import Volume


@dataclass
class TestCase:
    id: str
    image: Volume
    label: Volume


def demo_config(dataset: Path, output: Path, cache_dir: Path, seed: int = 0, schedule: str = "demo") -> TrainConfig:
    """A short schedule for 64³ phantoms on two CPU cores (the full defaults are for real runs).

    ``semisam demo`` (:func:`run_demo`) replaces the grid below by the one ``semisam plan``
    makes for its cohort (:func:`plan_demo`); the benchmark scripts keep this fixed grid, the
    one their recorded numbers were measured on.

    Fixed training grid: 24 slices of 96² at 0.75 mm in-plane, 2 mm apart (48 mm around the centre
    of the field of view, where the phantoms' targets lie) (the encoder's
    cost is per slice, the decoder's per voxel). One depth block per step: the same
    compute as two per step, twice the updates (6 held-out phantoms after the warm-up alone,
    mean Dice 0.763 -> 0.797). Pseudo-label views flip depth only, so refreshing them encodes
    no new slices. ``schedule="tiny"`` is for tests.
    """
    cfg = TrainConfig(dataset=str(dataset), output=str(output), seed=seed)
    cfg.preprocess.target_spacing = (0.75, 0.75, 2.0)
    cfg.preprocess.target_shape = (24, 96, 96)
    # Trained on that crop (the phantoms' targets lie in it); validation and the held-out test
    # phantoms are segmented over their whole field of view, as `semisam segment` does. Training
    # on whole fields of view (34-45 slices of 2 mm) scored 0.844 at seed 0 against 0.867.
    cfg.preprocess.crop = "fov"
    # The encoder at 128 px instead of its native 256: about a quarter of the cost per slice
    # (scripts/bench_encoder.py, 2-core Zen 3: 0.234 vs 0.912 s compiled, 20 vs 75 GFLOP) and, after the warm-up alone, 6 held-out phantoms at
    # mean Dice 0.817 against 0.787 (96 px: 0.725); LiteMedSAM's boxes on phantoms 0.885 vs 0.844.
    cfg.encoder.input_size = 128
    cfg.student.channels = (32, 16)
    cfg.student.context = 3  # dilated in-plane blocks (field of view 5 -> 33 tokens): 6 held-out Dice after the warm-up 0.745 -> 0.787 (bench_student --warmup-only)
    cfg.student.block_depth = 16
    cfg.data.cache_dir = str(cache_dir)
    # Refreshed from the EMA teacher every 4 epochs of phase 1: on PROMISE12 with 2 labels the
    # coarse masks of the unlabeled cases went 0.41 -> 0.60 Dice over phase 1 and the pseudo-labels
    # 0.46 -> 0.62; the last EMA student scored 0.537 on test against 0.514 with one refresh.
    cfg.pseudo.refresh_every = 4
    cfg.pseudo.inplane_views = False
    cfg.data.batch_size = 1
    # Whole slices: at 128 px, crops of 24 of the 32 tokens (72 of 96 px) made warm-up epochs
    # cheaper but 6 held-out Dice 0.807 against 0.817 (bench_student --warmup-only).
    cfg.augment.inplane_crop = 0
    cfg.loss.ramp_up = 4.0
    cfg.loss.ramp_down = 16.0
    cfg.phases.warmup.epochs, cfg.phases.warmup.lr = 50, 5e-3  # 8 labeled cases = 8 steps per epoch
    cfg.phases.semi.epochs, cfg.phases.semi.lr = 16, 3e-3
    cfg.phases.finetune.epochs, cfg.phases.finetune.lr = 8, 1e-3
    cfg.validation.every = 5
    cfg.validation.largest_component = True  # a phantom has one target
    if schedule == "tiny":
        cfg.preprocess.target_spacing = (1.5, 1.5, 4.0)
        cfg.preprocess.target_shape = (8, 32, 32)
        cfg.preprocess.crop = "fov"  # tests: one 8 x 32 x 32 grid per case (a whole field of view is 2-4 tiles and 3x the slices)
        cfg.student.channels = (16, 8)
        cfg.student.block_depth = 4
        cfg.phases.warmup.epochs, cfg.phases.semi.epochs, cfg.phases.finetune.epochs = 2, 2, 1
        cfg.pseudo.refresh_every = 1
        cfg.data.batch_size = 2
    return cfg


#: The demo plans its grid (``semisam plan``) for this many minutes of embedding on the
#: reference CPU below, so that the whole demo stays within 10 minutes on 2 cores.
DEMO_EMBEDDING_MINUTES = 1.5
#: The demo plans for the 2-core reference CPU on every machine, so its grid (and its numbers)
#: are the same everywhere; `semisam plan` on a real data set uses the cores it is given.
DEMO_PLAN_CORES = 2


def plan_demo(dataset: Path, cfg: TrainConfig):
    """The demo's grid from ``semisam plan`` on its cohort (budget :data:`DEMO_EMBEDDING_MINUTES`
    on :data:`DEMO_PLAN_CORES` cores): ``(planned config, plan)``."""
    from .plan import apply_plan, fingerprint, make_plan

    plan = make_plan(fingerprint(dataset), device="cpu", budget_minutes=DEMO_EMBEDDING_MINUTES, config=cfg, cores=DEMO_PLAN_CORES)
    return apply_plan(cfg, plan), plan


def make_test_cases(n: int, seed: int, shape=(64, 64, 64)) -> List[TestCase]:
    """Held-out phantoms from a seed stream disjoint from the cohort's."""
    from .phantom import make_phantom

    seeds = np.random.SeedSequence([seed, 0x7E57]).spawn(n)
    cases = []
    for i, s in enumerate(seeds):
        ph = make_phantom(int(s.generate_state(1)[0]), shape)
        cases.append(TestCase(f"test_{i:03d}", ph.image, ph.label))
    return cases


def evaluate(student, encoder, cache, config, cases: Sequence[TestCase], device: str = "cpu", largest_component: bool = False,
             threshold: float = 0.5, refiner=None) -> List[Dict[str, Any]]:
    """Segment each held-out case (on its own grid) and score it against its label. With a
    ``refiner`` (:class:`semisam.inference.Refiner`) each row also has ``student_dice``: the
    student's mask alone."""
    from .inference import segment_volume
    from .training import dice_hd95

    rows = []
    for case in cases:
        t0 = time.time()
        seg = segment_volume(case.image, student, encoder, config, cache, device=device, largest_component=largest_component, threshold=threshold,
                             refiner=refiner)
        spacing = tuple(case.image.spacing[::-1])
        dice, hd = dice_hd95(seg.label.array, case.label.array, spacing, student.config.num_labels)
        row = {"case": case.id, "dice": dice, "hd95_mm": hd, "seconds": round(time.time() - t0, 1), "segmentation": seg}
        if refiner is not None:
            row["student_dice"] = dice_hd95(seg.student_label.array, case.label.array, spacing, student.config.num_labels, hd95=False)[0]
        rows.append(row)
    return rows


def run_demo(out: Path, n_labeled: int = 8, n_unlabeled: int = 6, n_val: int = 2, n_test: int = 3, seed: int = 0,
             progress: str = "auto", schedule: str = "demo", compile: bool = False, plan: bool = False) -> Dict[str, Any]:
    from .figures import save_mid_slices
    from .inference import Refiner, recorded_refinement, recorded_threshold
    from .models.student import load_student
    from .phantom import write_cohort
    from .preprocess import PreprocessConfig
    from .training import Trainer
    from .volume import write_volume

    t0 = time.time()
    out = Path(out)
    cohort = write_cohort(out / "cohort", n_labeled + n_unlabeled, n_labeled, seed=seed, overwrite=True, validation=n_val)
    tests = make_test_cases(n_test, seed)
    print(f"cohort: {n_labeled} labeled + {n_unlabeled} unlabeled + {n_val} validation phantoms in {cohort}; {n_test} held-out test phantoms", flush=True)
    cfg = demo_config(cohort, out / "run", out / "cache", seed, schedule)
    if schedule == "demo" and plan:
        cfg, planned = plan_demo(cohort, cfg)
        print("\n".join(planned.lines()), flush=True)
    # The encoder on the fastest compiler-free runtime (OpenVINO on a CPU, torch on CUDA, torch when
    # compiling): 0.16 against 0.25 s per 128 px slice here, about a minute of the demo's ten.
    cfg.encoder.backend = "torch" if compile else "auto"
    cfg.encoder.compile = compile
    if schedule == "demo" and plan and not compile:
        print("the encoder runs on the fastest runtime installed (encoder.backend: auto, OpenVINO on a CPU): the plan's costs are "
              "for the torch path, the slower one", flush=True)
    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    trainer = Trainer(cfg, progress=progress)
    summary = trainer.run()
    t_train = time.time() - t0
    student, extra = load_student(Path(summary["best_checkpoint"]))
    pre = PreprocessConfig(**extra["preprocess"])
    threshold = recorded_threshold(extra)
    refinement = recorded_refinement(extra)
    refiner = Refiner.from_record(refinement, trainer.encoder, trainer.cache) if refinement else None
    rows = evaluate(student, trainer.encoder, trainer.cache, pre, tests, largest_component=bool(extra.get("postprocess", {}).get("largest_component")),
                    threshold=threshold, refiner=refiner)
    seg_dir = out / "segmentations"
    for case, row in zip(tests, rows):
        write_volume(row["segmentation"].label, seg_dir / f"{case.id}_seg.nii.gz")
        write_volume(row["segmentation"].probability, seg_dir / f"{case.id}_probability.nii.gz")
        write_volume(case.image, seg_dir / f"{case.id}_image.nii.gz")
        write_volume(case.label, seg_dir / f"{case.id}_label.nii.gz")
    picture = save_mid_slices(
        [c.image for c in tests], out / "test_overlays.png", [c.label for c in tests],
        [f"{c.id} Dice {r['dice']:.3f}" for c, r in zip(tests, rows)], [r["segmentation"].label for r in rows],
    )
    print()
    chosen = " (chosen on the validation phantoms)" if "threshold" in extra.get("postprocess", {}) else ""
    print(f"held-out phantoms, student (best EMA checkpoint, foreground threshold {threshold:.2f}{chosen}) on each input grid:")
    refine_info = dict(extra.get("postprocess", {}).get("refine") or {})
    if refiner is not None:
        print(f"  then {refiner.describe()}: chosen on the {refine_info.get('validation_cases')} validation phantoms; "
              "'student' is the student's mask alone")
    elif refine_info:
        print(f"  the teachers' refinement was not better on the validation phantoms (student {refine_info.get('val_dice_student')}, "
              f"refined {refine_info.get('val_dice_refined')}): the student's mask alone")
    print(f"{'case':<12}{'Dice':>8}{'HD95 mm':>10}{'seconds':>9}" + (f"{'student':>9}" if refiner is not None else ""))
    for r in rows:
        hd = f"{r['hd95_mm']:.2f}" if r["hd95_mm"] is not None else "n/a"
        print(f"{r['case']:<12}{r['dice']:>8.3f}{hd:>10}{r['seconds']:>9.1f}" + (f"{r['student_dice']:>9.3f}" if refiner is not None else ""))
    mean = float(np.mean([r["dice"] for r in rows]))
    print(f"{'mean':<12}{mean:>8.3f}" + (f"{'':>19}{np.mean([r['student_dice'] for r in rows]):>9.3f}" if refiner is not None else ""))
    pseudo = [rec["pseudo"] for rec in _records(run / "metrics.jsonl") if rec.get("pseudo")]
    if pseudo:
        first, last = pseudo[0], pseudo[-1]
        print(f"pseudo-labels of the {last.get('refreshed')} unlabeled volumes against their hidden truth (Dice): "
              f"the student's coarse mask that prompts the teachers {_fmt(first.get('coarse_dice_vs_reference'))} -> "
              f"the teachers' pseudo-label {_fmt(first.get('dice_vs_reference'))}"
              + (f" (last of {len(pseudo)} refreshes: {_fmt(last.get('coarse_dice_vs_reference'))} -> {_fmt(last.get('dice_vs_reference'))})" if len(pseudo) > 1 else ""))
        grown = [p.get("prompt_growth_mm") for p in pseudo]
        if first.get("val_pseudo_dice") is not None:
            print(f"coarse masks grown by {', '.join(f'{g:g}' for g in grown)} mm before they prompt the teachers (chosen at each refresh "
                  f"on the validation phantoms: first refresh, their coarse masks {_fmt(first.get('val_coarse_dice'))}, pseudo-labels "
                  f"{_fmt(first.get('val_pseudo_dice_ungrown'))} ungrown, {_fmt(first.get('val_pseudo_dice'))} grown)")
        print(f"teachers' agreement: {_pct(last.get('confident_fraction_in_union'))} of the voxels inside the coarse mask or the pseudo-label "
              f"are confident (variance < pseudo.u_th) and trained on; outside them every prediction is background")
    print(f"overlays (solid: truth, dashed: student): {picture}")
    print(f"segmentations and probabilities: {seg_dir}")
    print(f"training curves: {run / 'curves.png'}; student checkpoint: {summary['best_checkpoint']}")
    total = time.time() - t0
    print(f"demo finished in {total:.0f} s (training {t_train:.0f} s)")
    return {"mean_dice": mean, "threshold": threshold, "refine": refine_info or None, "rows": [{k: v for k, v in r.items() if k != "segmentation"} for r in rows], "seconds": total, "summary": summary}


def _records(path: Path) -> List[Dict[str, Any]]:
    from .progress import read_metrics

    return read_metrics(path)


def _pct(v: Optional[float]) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "n/a"


def _fmt(v: Optional[float]) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"
