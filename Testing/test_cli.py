"""The command line: the contract's names and flags, help everywhere, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from semisam.cli import main


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "semisam.cli", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ("phantom", "validate", "demo", "plan"):
        assert command in out.stdout


@pytest.mark.parametrize("command,flags", [
    ("phantom", ["--n", "--out", "--labeled", "--shape", "--seed", "--rf"]),
    ("validate", ["DATASET", "--allow-2d", "--num-labels"]),
    ("demo", ["--out"]),
    ("plan", ["DATASET", "--device", "--budget-minutes", "--memory-gb", "--config", "--json", "--headers-only"]),
    ("init-config", ["--no-plan", "--device", "--budget-minutes", "--memory-gb"]),
])
def test_help_of_each_command(command, flags):
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout.replace("dataset", "DATASET")


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "semisam"
    if not exe.exists():
        exe = shutil.which("semisam")
    assert exe, "the `semisam` console command is not installed (pyproject [project.scripts])"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("semisam ")


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: semisam" in capsys.readouterr().out


def test_phantom_then_validate(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["phantom", "--n", "3", "--out", str(out), "--labeled", "1", "--shape", "16", "20", "20", "--seed", "5", "--quiet"]) == 0
    assert "wrote 3 phantoms (1 labeled, 2 unlabeled)" in capsys.readouterr().out
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["generator"] == {"seed": 5, "n": 3, "validation": 0, "shape": [16, 20, 20], "rf": False}
    assert main(["validate", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "format: SemiSAM dataset.json (case lists: training, unlabeled, validation, test)"
    assert lines[1].startswith("dataset OK: 1 labeled, 2 unlabeled")
    # the folder layout validates too (without dataset.json)
    (out / "dataset.json").unlink()
    assert main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "format: folder layout (imagesTr/ + labelsTr/, imagesUnlabeled/; no dataset.json)"


def test_phantom_refuses_impossible_counts(tmp_path, capsys):
    assert main(["phantom", "--n", "2", "--labeled", "3", "--out", str(tmp_path / "x")]) == 2
    assert "labeled must be between 0 and n=2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rf_phantom_flag(tmp_path):
    out = tmp_path / "rf"
    assert main(["phantom", "--n", "2", "--out", str(out), "--rf", "--shape", "12", "32", "16", "--quiet"]) == 0
    assert json.loads((out / "dataset.json").read_text())["image_type"] == "rf"


def test_validate_2d_dataset_needs_allow_2d(tmp_path, capsys):
    import numpy as np
    import SimpleITK as sitk

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    img = (np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8)
    lab = np.zeros((20, 30), np.uint8)
    lab[5:10, 5:10] = 1
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "imagesTr" / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "labelsTr" / "a.png"))
    assert main(["validate", str(tmp_path)]) == 1
    assert "a 3D volume is required" in capsys.readouterr().err
    assert main(["validate", str(tmp_path), "--allow-2d"]) == 0


@pytest.mark.slow
def test_demo_tiny_schedule_runs_the_whole_job(tmp_path, capsys):
    """The demo's real path (cohort -> three phases -> held-out segmentation), seconds-long schedule."""
    from semisam.volume import read_volume

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--labeled", "2", "--unlabeled", "2", "--validation", "1", "--test", "1", "--schedule", "tiny", "--progress", "none", "--no-compile"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith("test_000")]
    assert len(rows) == 1 and 0.0 <= float(rows[0][1]) <= 1.0
    assert "mean" in printed and "demo finished in" in printed
    png = out / "test_overlays.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    seg = read_volume(out / "segmentations" / "test_000_seg.nii.gz", "label")
    image = read_volume(out / "segmentations" / "test_000_image.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.spacing, image.spacing)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_epoch"] for r in records] == list(range(1, 6)) and {r["phase"] for r in records} == {0, 1, 2}
    assert (out / "run" / "best.pt").exists() and (out / "run" / "curves.png").exists()
