"""The ``semisam`` command line.

Run ``semisam --help`` (or ``python -m semisam.cli --help``) for the commands. Errors that a
user can fix are printed as one line per problem, without a traceback, with exit status 2
(``validate`` exits 1 when the dataset has problems).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .errors import SemiSAMError

LAYOUT_HELP = """dataset layouts:
  folder:        imagesTr/<case>.nii.gz + labelsTr/<case>.nii.gz (+ imagesUnlabeled/<case>.nii.gz)
                 (+ imagesVal/ + labelsVal/: validation; imagesTs/ + labelsTs/: test split, never trained on)
  dataset.json:  {"labels": {"0": "background", "1": "target"}, "image_type": "bmode"|"rf",
                  "training": [{"image": ..., "label": ...}], "unlabeled": [{"image": ...}],
                  "validation": [...], "test": [{"image": ..., "label": ...}]}
  nnU-Net v2:    raw data set as it is: dataset.json {"channel_names": {"0": "US"}, "numTraining": N,
                  "labels": {"background": 0, "target": 1}, "file_ending": ".nii.gz"}
                 + imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz (+ imagesTs/ [+ labelsTs/]: test split);
                 one channel, integer labels 0..K; unlabeled images: imagesUnlabeled/, or in dataset.json
                 "unlabeled": "FOLDER" (or a list of folders / image files)
  formats:       .nii .nii.gz .nrrd .nhdr .mha .mhd .png, or a folder holding a DICOM series
"""


def _shape(values: Sequence[int]) -> tuple:
    return tuple(int(v) for v in values)


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import write_cohort

    t0 = time.time()

    def progress(i: int, n: int) -> None:
        if not args.quiet:
            print(f"\rphantom {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    out = write_cohort(args.out, args.n, args.labeled, _shape(args.shape), args.seed, args.rf, args.num_labels, args.overwrite, progress,
                       placement=args.placement)
    labeled = args.labeled if args.labeled is not None else max(1, args.n // 4)
    print(f"wrote {args.n} phantoms ({labeled} labeled, {args.n - labeled} unlabeled) to {out} in {time.time() - t0:.1f} s")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data import load_dataset, validate_dataset

    spec = load_dataset(args.dataset)
    print(f"format: {spec.format_description}")
    problems = validate_dataset(spec, allow_2d=args.allow_2d, num_labels=args.num_labels)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        print(p, file=sys.stderr if p.severity == "error" else sys.stdout)
    split = "".join(f", {len(cases)} {name}" for name, cases in (("validation", spec.validation), ("test", spec.test)) if cases)
    summary = f"{len(spec.labeled)} labeled, {len(spec.unlabeled)} unlabeled{split} case(s) ({spec.source}: {spec.root})"
    if errors:
        print(f"dataset NOT usable: {len(errors)} problem(s); {summary}", file=sys.stderr)
        return 1
    print(f"dataset OK: {summary}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), args.labeled, args.unlabeled, args.validation, args.test, args.seed,
             progress=args.progress, schedule=args.schedule, compile=args.compile, plan=args.plan)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import json

    from .models.registry import models_folder, status

    rows = status()
    if args.json:
        print(json.dumps({"models_folder": str(models_folder()), "models": rows}, indent=2))
        return 0
    print(f"models folder: {models_folder()} (set SEMISAM_MODELS to change it)")
    print(f"{'name':<17}{'roles':<38}{'checkpoint':<12}file")
    for r in rows:
        state = "present" if r["present"] else "missing"
        where = r["path"] or f"{r['expected_at']}  <- {r['obtain']}"
        print(f"{r['name']:<17}{', '.join(r['roles']):<38}{state:<12}{where}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import Segmenter
    from .models.encoders import EmbeddingCache
    from .volume import format_of, read_volume, write_volume

    for out in [args.output] + ([args.uncertainty] if args.uncertainty else []):
        format_of(out)  # refuse an unknown extension before any work
    t0 = time.time()
    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else EmbeddingCache()
    if args.compile and args.backend in ("openvino", "onnxruntime"):
        raise ValueError(f"--compile compiles the torch backend; drop it or use --backend torch (not {args.backend})")
    # auto falls back to torch with one warning line if the runtime cannot load (with --compile it is torch);
    # a named runtime is an error
    fallback = (lambda m: print(f"warning: {m}", file=sys.stderr)) if args.backend == "auto" else None
    segmenter = Segmenter(args.checkpoint, args.device, args.encoder_checkpoint, args.compile, cache, backend=args.backend, fallback=fallback,
                          refine=not args.no_refine)
    volume = read_volume(args.input)
    result = segmenter.segment(volume, uncertainty=bool(args.uncertainty), largest_component=args.largest_component)
    write_volume(result.label, args.output)
    if args.uncertainty:
        write_volume(result.uncertainty, args.uncertainty)
    voxels = int((result.label.array > 0).sum())
    ml = voxels * float(__import__("numpy").prod(volume.spacing)) / 1000.0
    cfg = segmenter.preprocess_config
    print(f"whole field of view: grid {result.grid} (z, y, x) at {cfg.target_spacing} mm (x, y, z), "
          f"{result.tiles} in-plane tile(s) of {tuple(cfg.target_shape[1:])} per slice")
    if result.refined:
        print(f"refined: {segmenter.refiner.describe()}, as chosen at training (--no-refine: the student alone)")
    print(f"wrote {args.output}: {voxels} foreground voxels ({ml:.2f} ml) on the input grid {volume.shape}; {time.time() - t0:.1f} s")
    return 0


def _overrides(pairs: Sequence[str]) -> dict:
    """``--set phases.semi.epochs=3`` -> {"phases.semi.epochs": 3} (values parsed as YAML)."""
    from .config import parse_overrides

    return parse_overrides(list(pairs or []))


def _resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # torch missing or broken: plan for the CPU
        return "cpu"


def _make_plan(dataset: str, device: str, budget_minutes: Optional[float], memory_gb: Optional[float], config=None,
               headers_only: bool = False, quiet: bool = False):
    """Fingerprint ``dataset`` (progress on a terminal's stderr) and plan it."""
    from .plan import fingerprint, make_plan

    for name, value in (("--budget-minutes", budget_minutes), ("--memory-gb", memory_gb)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value:g}")
    show = not quiet and sys.stderr.isatty()

    def progress(i: int, n: int, case: str) -> None:
        if show:
            print(f"\rreading {i}/{n} ({case})\x1b[K", end="" if i < n else "\n", file=sys.stderr, flush=True)

    records = fingerprint(dataset, voxels=not headers_only, progress=progress)
    return make_plan(records, _resolve_device(device), budget_minutes, memory_gb, config)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .config import config_from_dict
    from .plan import update_config_file

    base = None
    if args.config and Path(args.config).is_file():  # the estimates use its epochs, batch and teacher views
        import yaml

        try:
            raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SemiSAMError(f"{args.config}: not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise SemiSAMError(f"{args.config}: must be a mapping of settings, got {type(raw).__name__}")
        base = config_from_dict(raw, args.config, require_dataset=False)
    plan = _make_plan(args.dataset, args.device, args.budget_minutes, args.memory_gb, base, args.headers_only)
    for line in plan.lines():
        print(line)
    written = None
    if args.config:
        path, created = update_config_file(args.config, plan, args.dataset)
        written = str(path)
        keys = ", ".join(plan.settings())
        print(f"wrote {path} (the defaults plus the plan)" if created else f"updated {path}: {keys} (other settings kept)")
    if args.json:
        print(json.dumps({"dataset": str(args.dataset), **plan.to_dict(), "config": written}))
    return 0


def cmd_init_config(args: argparse.Namespace) -> int:
    from .config import TrainConfig, write_config

    cfg = TrainConfig()
    if args.dataset:
        cfg.dataset = args.dataset
    if args.output_dir:
        cfg.output = args.output_dir
    if args.dataset and args.plan:
        from .plan import PlanError, apply_plan

        if Path(args.out).exists() and not args.force:  # refuse before reading the whole data set
            raise SemiSAMError(f"{args.out} exists; choose another name or pass --force")
        try:
            plan = _make_plan(args.dataset, args.device, args.budget_minutes, args.memory_gb)
        except SemiSAMError as exc:
            raise PlanError(f"{exc} (--no-plan writes the defaults without reading the dataset)") from None
        cfg = apply_plan(cfg, plan)
        for line in plan.lines():
            print(line)
    path = write_config(args.out, cfg, overwrite=args.force)
    print(f"wrote {path}: edit 'dataset' (and anything else), then run: semisam train --config {path}")
    return 0


def honour_sigint() -> None:
    """Make SIGINT raise KeyboardInterrupt even where it was inherited as ignored.

    A process started in the background of a non-interactive shell (``nohup``, ``cmd &``) ignores
    SIGINT, and Python then installs no handler: the Slicer module's Stop (SIGINT, so that the
    trainer says "stopped" and keeps its last finished epoch) would wait for its SIGTERM fallback."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import train

    honour_sigint()

    try:
        cfg = load_config(args.config, _overrides(args.set))
    except SemiSAMError as exc:
        if args.progress == "json":  # a reader of the JSON stream learns the outcome there too
            import json

            print(json.dumps({"type": "final", "status": "failed", "error": str(exc), "error_type": type(exc).__name__}), flush=True)
        raise
    summary = train(cfg, progress=args.progress, resume=args.resume)
    if args.progress != "json" and int(os.environ.get("RANK", "0")) == 0:
        dice = summary.get("best_val_dice")
        shown = f"{dice:.3f}" if isinstance(dice, float) else "n/a (no validation cases)"
        print(f"training finished: best validation Dice {shown} at epoch {summary.get('best_global_epoch')}; "
              f"student: {summary['best_checkpoint']} ({summary['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semisam",
        description="Semi-supervised SAM-family segmentation of 3D ultrasound (Semi-SAM+).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=LAYOUT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"semisam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("phantom", help="write a synthetic 3D ultrasound cohort (dataset folder + dataset.json)",
                       description="Write N synthetic 3D ultrasound phantoms with exact labels as a dataset.")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--labeled", type=int, default=None, help="how many cases get labels (default: a quarter, at least 1)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("Z", "Y", "X"), help="grid size (default 64 64 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same cohort)")
    p.add_argument("--rf", action="store_true", help="write RF data instead of B-mode (dataset.json says image_type rf)")
    p.add_argument("--num-labels", type=int, default=1, help="structures per case, labels 1..K (default 1)")
    p.add_argument("--placement", default="auto", choices=("auto", "anywhere", "central"),
                   help="where the targets go: anywhere in the sector (organ-sized, edges included) or central (at mid depth "
                        "near the central ray, sized to the grid); default auto: anywhere from 256 voxels in depth or lateral")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("validate", help="check a dataset; exit 0 when usable, else one line per problem",
                       description="Check every file of a dataset (folder or dataset.json).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAYOUT_HELP)
    p.add_argument("dataset", help="dataset folder or dataset.json")
    p.add_argument("--allow-2d", action="store_true", help="accept 2D images (one-slice volumes)")
    p.add_argument("--num-labels", type=int, default=None, help="highest label value allowed (default: from dataset.json)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("models", help="list the model catalogue and which checkpoints are present",
                       description="List the catalogued models, their roles, and whether their checkpoints are present.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("segment", help="segment a volume with a trained student (output on the input's grid)",
                       description="One-click segmentation with a trained Slicing-SAM3D student.")
    p.add_argument("input", help="image volume (any supported format, or a DICOM folder)")
    p.add_argument("output", help="label map to write; the format follows the extension")
    p.add_argument("--checkpoint", required=True, help="student checkpoint (.pt) written by training")
    p.add_argument("--uncertainty", default=None, metavar="PATH", help="also write the per-voxel uncertainty volume")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    p.add_argument("--encoder-checkpoint", default=None, help="SAM/MedSAM ViT-B weights when the student was trained on them")
    p.add_argument("--cache-dir", default=None, help="keep slice embeddings here for later runs")
    p.add_argument("--compile", action="store_true", help="compile the torch encoder (about a minute the first time, then ~2x faster per slice; implies --backend torch)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino", "onnxruntime"),
                   help="the encoder's runtime (default auto: OpenVINO on the CPU when installed, else torch; torch on CUDA). "
                        "A runtime's converted encoder is made once and kept beside the embedding cache")
    p.add_argument("--largest-component", dest="largest_component", action="store_true", default=None,
                   help="keep each structure's largest connected piece (default: as the student was trained)")
    p.add_argument("--all-components", dest="largest_component", action="store_false", help="keep every piece")
    p.add_argument("--no-refine", action="store_true",
                   help="the student's mask alone, even where training recorded that the LiteMedSAM teacher refines it "
                        "(validation.refine: chosen on the validation cases)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("init-config", help="write a commented training config (YAML) with the defaults",
                       description="Write every training setting with its default and a comment.")
    p.add_argument("out", help="YAML file to write")
    p.add_argument("--dataset", default=None, help="fill in the dataset (folder or dataset.json) and plan the grid from it (`semisam plan`)")
    p.add_argument("--output-dir", default=None, help="fill in the run folder")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--no-plan", dest="plan", action="store_false",
                   help="with --dataset: keep the default grid instead of planning it from the data (see `semisam plan`)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="plan for this device (default: cuda when torch sees one)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M", help="as for `semisam plan`")
    p.add_argument("--memory-gb", type=float, default=None, metavar="G", help="as for `semisam plan`")
    p.set_defaults(func=cmd_init_config)

    p = sub.add_parser("plan", help="plan spacing, tiles and encoder side from a dataset; write them into a config",
                       description="Read every image of a dataset (labeled, unlabeled, validation; one at a time) and plan the\n"
                                   "training grid: target spacing, in-plane tile and depth block, encoder input side, tiling,\n"
                                   "with a reason for each and the costs (embedding time and memory, training time).\n"
                                   "With --config the planned keys go into that YAML (created with the defaults if missing;\n"
                                   "otherwise only those keys change).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset folder or dataset.json")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="plan for this device: 128 px encoder input on cpu, 256 on cuda (default: cuda when torch sees one)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="encoder time allowed to embed the dataset once; coarsen until it fits (default: not limited)")
    p.add_argument("--memory-gb", type=float, default=None, metavar="G",
                   help="memory one volume may take (embeddings + voxels); default 75%% of this machine's RAM")
    p.add_argument("--config", default=None, metavar="PATH", help="write the planned keys into this training YAML")
    p.add_argument("--json", action="store_true", help="also print the plan as one JSON object (last line)")
    p.add_argument("--headers-only", action="store_true",
                   help="read headers only (fast): the whole grid counts as the field of view, not the non-zero sector")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train a student semi-supervised (Semi-SAM+); torchrun-ready",
                       description="Train the Slicing-SAM3D student in three phases (warm-up, semi-supervised, fine-tune).\n"
                                   "Several processes: torchrun --nproc_per_node=N -m semisam.cli train --config CFG",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (semisam init-config writes one)")
    p.add_argument("--resume", action="store_true", help="continue the run in the config's output folder after its last finished epoch")
    p.add_argument("--progress", default="auto", choices=("auto", "tqdm", "json", "text", "none"),
                   help="auto: bars on a terminal, else one line per epoch; json: one JSON object per line on stdout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set phases.semi.epochs=3 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job on the embedded default: phantoms -> Semi-SAM+ training -> held-out Dice",
                       description="Make a phantom cohort, train a student in three phases with the shipped LiteMedSAM\n"
                                   "(encoder and teacher), segment held-out phantoms, print a Dice table, write overlays.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output/); the embedding cache there is reused")
    p.add_argument("--labeled", type=int, default=8, help="labeled phantoms (default 8)")
    p.add_argument("--unlabeled", type=int, default=6, help="unlabeled phantoms (default 6)")
    p.add_argument("--validation", type=int, default=2, help="validation phantoms (default 2)")
    p.add_argument("--test", type=int, default=3, help="held-out test phantoms (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="demo", choices=("demo", "tiny"), help="tiny: a seconds-long smoke run")
    p.add_argument("--plan", action="store_true",
                   help="train on the grid `semisam plan` makes for the cohort (1.5 min of embedding) instead of the demo's fixed "
                        "central grid (lower held-out Dice on the 64^3 phantoms: BENCHMARKS.md)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="do not torch.compile the encoder (compiling takes ~1 min once per machine, then halves the time per slice)")
    p.add_argument("--progress", default="auto", choices=("auto", "tqdm", "json", "text", "none"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SemiSAMError as exc:
        print(f"semisam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argument values our functions refuse (e.g. --labeled > --n)
        print(f"semisam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
