"""scripts/bench_student.py end to end on the tiny schedule: its JSON line and its errors."""

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
