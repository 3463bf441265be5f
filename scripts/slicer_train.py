#!/usr/bin/env python
"""Headless Semi-SAM+ training: the same script under 3D Slicer, plain Python and torchrun.

    Slicer --no-main-window --python-script scripts/slicer_train.py --config CFG.yaml [--resume] [--progress text]
    python scripts/slicer_train.py --config CFG.yaml [--resume] [--progress text|json|tqdm|none]
    torchrun --nproc_per_node=4 scripts/slicer_train.py --config CFG.yaml

Training runs *in this process*, through the same code as ``semisam train`` (there is no GUI
to keep responsive, and torchrun needs the training in the process it starts). Outputs go to
the config's ``output`` folder: ``best.pt`` (the student), ``last.pt`` (to resume),
``metrics.jsonl``, ``curves.png``, ``config.yaml``.

Exit status (under Slicer passed on with ``slicer.util.exit``, so Slicer exits with it):

* 0: training finished;
* 2: the config or the dataset is wrong: one line ``semisam train: error: ...`` naming the key
  or file (nothing is trained);
* 1: training failed (the traceback, then one line ``slicer_train: error: ...``), or SemiSAM's
  Python packages are missing;
* 130: interrupted (Ctrl-C); ``--resume`` continues after the last finished epoch.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

_THIS = Path(globals().get("__file__") or sys.argv[0]).resolve()
_PROG = "slicer_train"


def _in_slicer() -> bool:
    """Whether this runs inside the Slicer application (``--python-script``), not a plain Python."""
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None


def _script_args(argv: Sequence[str]) -> List[str]:
    """The arguments meant for this script: after its own path when it appears in ``argv``
    (Slicer passes ``[script, args...]``; be tolerant of a launcher passing its own too)."""
    argv = list(argv)
    for i in range(len(argv) - 1, -1, -1):
        try:
            if Path(argv[i]).resolve() == _THIS:
                return argv[i + 1:]
        except (OSError, ValueError):
            continue
    return argv[1:]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Train a SemiSAM student (Semi-SAM+) from a YAML config, headless: "
                    "Slicer --no-main-window --python-script scripts/slicer_train.py --config CFG.yaml, "
                    "or python scripts/slicer_train.py --config CFG.yaml (semisam init-config writes a config).",
    )
    parser.add_argument("--config", required=True, help="training YAML (semisam init-config NEW.yaml writes a commented one)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's output folder after its last finished epoch")
    parser.add_argument("--progress", default="text", choices=("auto", "tqdm", "json", "text", "none"),
                        help="text (default): one line per epoch on stderr; json: one JSON object per line on stdout")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set phases.semi.epochs=3 (repeatable)")
    return parser


def _import_semisam() -> Optional[str]:
    """Make ``semisam`` and its training dependencies importable; returns a problem or None."""
    try:
        import semisam  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(_THIS.parents[1]))  # a source checkout: scripts/.. holds semisam/
    try:
        import semisam.training  # noqa: F401  (torch, monai, ...)
    except ImportError as exc:
        where = ("in Slicer: open the SemiSAM Segment or SemiSAM Train module once and accept the package installation"
                 if _in_slicer() else "run scripts/setup.sh, or pip install the semisam package")
        return f"SemiSAM's Python packages are missing here ({exc}); {where}"
    return None


def run(argv: Sequence[str]) -> int:
    """Parse the script's arguments, train, and return the exit status (see the module docstring)."""
    args = _parser().parse_args(list(argv))
    problem = _import_semisam()
    if problem:
        print(f"{_PROG}: error: {problem}", file=sys.stderr, flush=True)
        return 1
    from semisam.cli import main as semisam_main

    command = ["train", "--config", args.config, "--progress", args.progress]
    command += ["--resume"] if args.resume else []
    for pair in args.set:
        command += ["--set", pair]
    try:
        code = semisam_main(command)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; run again with --resume to continue after the last finished epoch", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line must say what happened, whatever it was
        traceback.print_exc()
        print(f"{_PROG}: error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return int(code or 0)


def _slicer_train_entry() -> None:
    """Run with this process's arguments and exit with the status (through Slicer when inside it)."""
    code = run(_script_args(sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    if _in_slicer():
        import slicer

        slicer.util.exit(code)  # Slicer leaves its event loop with this status once the script returns
    else:
        sys.exit(code)


if __name__ == "__main__":
    _slicer_train_entry()
