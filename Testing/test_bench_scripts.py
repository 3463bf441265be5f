"""scripts/bench_student.py, scripts/bench_ssl.py and scripts/bench_segment.py end to end on tiny settings: their JSON lines and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

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


SEGMENT = REPO / "scripts" / "bench_segment.py"


def test_bench_segment_reports_every_size_with_sane_values(tmp_path: Path):
    """scripts/bench_segment.py --tiny: one fresh child per size, each with wall and encoder
    seconds, encoded slices, peak RSS and s/Mvox that make sense; the ratio over sizes last."""
    done = subprocess.run([sys.executable, str(SEGMENT), "--tiny", "--backend", "torch", "--work", str(tmp_path / "w")], cwd=tmp_path,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.strip().startswith("16x16x16:") for line in lines[:-1])  # human lines before the JSON
    assert result["backend"] == "torch" and result["student"]["kind"] == "untrained" and result["repeats"] == 1
    rows = result["sizes"]
    assert [r["name"] for r in rows] == ["16x16x16", "24x32x32"] and [r["shape"] for r in rows] == [[16, 16, 16], [24, 32, 32]]
    for r in rows:
        assert r["source"] == "phantom" and r["placement"] == "central"
        assert 0 < r["encode_s"] <= r["wall_s"] and 0 < r["embed_phase_s"] <= r["wall_s"]  # both within the call
        depth = result["student"]["preprocess"]["target_shape"][0]
        assert r["encoded_slices"] >= depth and r["progress_total"] > 0  # a fresh cache: every slice of the model's grid encoded
        assert r["mvox"] == round(np.prod(r["shape"]) / 1e6, 3)
        assert abs(r["s_per_mvox"] - r["wall_s"] / (np.prod(r["shape"]) / 1e6)) <= 1e-3 * r["s_per_mvox"]
        assert 100 < r["rss_before_mb"] <= r["peak_rss_mb"] < 16000  # MB of a process that loaded torch and the encoder
        if "segment_peak_rss_mb" in r:  # Linux: the high-water mark of the segmentations alone
            assert r["rss_before_mb"] - 50 <= r["segment_peak_rss_mb"] <= r["peak_rss_mb"]
        assert r["load_s"] > 0 and r["threads"] >= 1
        assert "dice" not in r  # an untrained student's output is not scored
    ratio = result["ratio_s_per_mvox"]
    assert (ratio["largest"], ratio["reference"]) == ("24x32x32", "16x16x16")  # no 128^3 here: the first size is the reference
    assert abs(ratio["value"] - rows[1]["s_per_mvox"] / rows[0]["s_per_mvox"]) <= 1e-3 * ratio["value"]
    assert (tmp_path / "w" / "student" / "untrained.pt").is_file()


def test_bench_segment_refuses_a_missing_input(tmp_path: Path):
    done = subprocess.run([sys.executable, str(SEGMENT), "--sizes", "", "--input", str(tmp_path / "nope.nii.gz")], cwd=tmp_path,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 2 and "nope.nii.gz: no such file" in done.stderr and "Traceback" not in done.stderr
