"""scripts/bench_student.py and scripts/bench_ssl.py end to end on the tiny schedule: their JSON lines and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_student.py"
TINY = ["--schedule", "tiny", "--test", "1", "--labeled", "2", "--unlabeled", "1", "--validation", "1"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=600)


def test_bench_student_compares_variants_on_one_cohort(tmp_path: Path):
    done = run("--work", str(tmp_path / "work"), "--variant", "base", "{}",
               "--variant", "image", '{"student.image_channels": 4}', cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [v["variant"] for v in result["variants"]] == ["base", "image"]
    assert result["variants"][1]["overrides"] == {"student.image_channels": 4}
    for v in result["variants"]:
        assert len(v["dice"]) == 1 and 0.0 <= v["mean_dice"] <= 1.0 and v["train_seconds"] > 0
    ckpt = tmp_path / "work" / "run_image" / "best.pt"
    from semisam.models.student import load_student

    assert load_student(ckpt)[0].config.image_channels == 4  # the override reached the trained student
    assert load_student(tmp_path / "work" / "run_base" / "best.pt")[0].config.image_channels == 0
    again = run("--work", str(tmp_path / "work"), "--variant", "base", '{"phases.warmup.epochs": 1}', cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]  # a reused --work folder: the earlier run_base is replaced
    assert json.loads(again.stdout.strip().splitlines()[-1])["variants"][0]["overrides"] == {"phases.warmup.epochs": 1}


def test_bench_student_names_a_bad_variant_key(tmp_path: Path):
    done = run("--variant", "x", '{"student.nope": 1}', cwd=tmp_path)
    assert done.returncode == 2
    assert "student.nope" in done.stderr and "unknown setting" in done.stderr and "Traceback" not in done.stderr


SSL = REPO / "scripts" / "bench_ssl.py"


def test_bench_ssl_runs_every_variant_and_reports_every_field(tmp_path: Path):
    """The benchmark that decides whether the unlabeled data pays, on the tiny schedule: two
    seeds, every variant, the JSON summary with its paired differences."""
    done = subprocess.run([sys.executable, str(SSL), "--schedule", "tiny", "--labeled", "1", "--seeds", "2", "--test", "2",
                           "--unlabeled", "2", "--validation", "1", "--variants", "supervised", "mean-teacher", "teacher-only", "full", "unet",
                           "--out", str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("seed 1 k=1 full") for line in lines[:-1])  # human lines before the JSON
    assert (result["dataset"], result["labeled"], result["seeds"]) == ("phantom", [1], 2)
    assert len(result["runs"]) == 2 and [r["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert set(run["variants"]) == {"supervised", "mean-teacher", "teacher-only", "full", "unet"}
        for name, v in run["variants"].items():
            assert len(v["test_dice"]) == 2 and abs(v["test_dice_mean"] - sum(v["test_dice"]) / 2) <= 1e-4
            assert v["train_s"] > 0
        assert Path(run["variants"]["full"]["branched_from"]).parts[-2:] == (f"s{run['seed']}_k1", "supervised")  # the shared warm-up ran once
        assert "con" in run["variants"]["mean-teacher"]["semi_losses_last"]
        assert "con" not in run["variants"]["teacher-only"]["semi_losses_last"]
        for name in ("teacher-only", "full"):
            for p in run["variants"][name]["pseudo"]:
                assert set(p) >= {"coarse_dice_vs_reference", "dice_vs_reference", "confident_fraction_in_union", "empty"}
        assert "pseudo" not in run["variants"]["supervised"] and "pseudo" not in run["variants"]["mean-teacher"]
        assert run["variants"]["unet"]["steps"] > 0
    summary = result["summary"]["1"]
    for name in ("mean-teacher", "teacher-only", "full", "unet"):
        diff = summary[f"{name}_minus_supervised"]
        assert len(diff["per_seed"]) == 2 and diff["min"] == min(diff["per_seed"])
        assert abs(diff["mean"] - (diff["per_seed"][0] + diff["per_seed"][1]) / 2) <= 1e-4


def test_bench_ssl_refuses_a_dataset_without_a_test_split(tmp_path: Path):
    from semisam.phantom import write_cohort

    cohort = write_cohort(tmp_path / "c", 3, 2, shape=(16, 16, 16), overwrite=True)
    done = subprocess.run([sys.executable, str(SSL), "--dataset", str(cohort), "--out", str(tmp_path / "w")], cwd=tmp_path,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode != 0 and "no test split" in done.stderr and "imagesTs/" in done.stderr
