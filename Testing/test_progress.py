"""Progress reporting (json/text/tqdm), the crash-safe metrics log and the curve plot."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest

from semisam.progress import MetricsLog, Progress, dumps, format_duration, plot_curves, read_metrics

PLAN = [(0, "warmup", 3, 4), (1, "semi", 4, 4), (2, "finetune", 2, 4)]  # 36 steps, 9 epochs


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float = 1.0) -> None:
        self.t += dt


def _strict(name):
    raise ValueError(f"non-strict JSON constant {name}")


def parse(buf: io.StringIO):
    lines = buf.getvalue().splitlines()
    assert lines, "nothing was written"
    return [json.loads(line, parse_constant=_strict) for line in lines]


def run_plan(p: Progress, clock: FakeClock, plan=PLAN, dt=1.0, resume=None):
    """Drive ``p`` like a training loop; ``resume=(phase, epoch)`` skips everything before."""
    p.start(output_dir="/tmp/x")
    for phase, _name, epochs, steps in plan:
        first_epoch = 0
        if resume is not None:
            if phase < resume[0]:
                continue
            if phase == resume[0]:
                first_epoch = resume[1]
        p.phase_start(phase, start_epoch=first_epoch)
        for epoch in range(first_epoch, epochs):
            for step in range(steps):
                clock.tick(dt)
                p.step(phase, epoch, step, {"total": 1.0 / (step + 1), "sup": 0.5}, lam=0.1 * phase, beta=0.5, lr=1e-3)
            p.epoch({"phase": phase, "epoch": epoch, "losses": {"total": 0.3}, "lambda": 0.1, "beta": 0.5, "val_dice": 0.8, "val_hd95": 3.5})
        p.phase_end(phase)
    p.final("finished", best_dice=0.9)


def test_json_lines_schema_strict_and_monotone():
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=PLAN, stream=buf, clock=clock)
    run_plan(p, clock)
    lines = parse(buf)
    types = [d["type"] for d in lines]
    assert types[0] == "start" and types[-1] == "final"
    assert types.count("step") == 36 and types.count("epoch") == 9
    assert types.count("phase_start") == 3 and types.count("phase_end") == 3

    start = lines[0]
    assert start["plan"] == [
        {"phase": 0, "name": "warmup", "epochs": 3, "steps_per_epoch": 4},
        {"phase": 1, "name": "semi", "epochs": 4, "steps_per_epoch": 4},
        {"phase": 2, "name": "finetune", "epochs": 2, "steps_per_epoch": 4},
    ]
    assert start["output_dir"] == "/tmp/x" and start["total_steps"] == 36

    step_keys = {"type", "phase", "phase_name", "epoch", "step", "steps", "losses", "lambda", "beta", "lr", "eta_s", "elapsed_s"}
    steps = [d for d in lines if d["type"] == "step"]
    for d in steps:
        assert step_keys <= set(d), step_keys - set(d)
        assert d["steps"] == 4 and d["phase_name"] == {0: "warmup", 1: "semi", 2: "finetune"}[d["phase"]]
        assert set(d["losses"]) == {"total", "sup"}
    assert steps[0]["phase"] == 0 and steps[0]["epoch"] == 0 and steps[0]["step"] == 0
    assert steps[-1]["progress"] == pytest.approx(1.0)

    epochs = [d for d in lines if d["type"] == "epoch"]
    assert [d["global_epoch"] for d in epochs] == list(range(1, 10))
    assert {"phase", "epoch", "losses", "val_dice", "val_hd95", "eta_s", "elapsed_s", "phase_name"} <= set(epochs[4])
    assert epochs[-1]["eta_s"] == 0

    elapsed = [d["elapsed_s"] for d in lines if "elapsed_s" in d]
    assert all(b >= a for a, b in zip(elapsed, elapsed[1:]))
    assert elapsed[-1] == pytest.approx(36.0)
    final = lines[-1]
    assert final["status"] == "finished" and final["best_dice"] == 0.9
    # compact: one object per line, no spaces after separators
    assert all(", " not in line and ": " not in line for line in buf.getvalue().splitlines())


def test_nan_inf_and_numpy_scalars_become_strict_json():
    class FakeTensor:  # what a 0-d torch tensor offers
        def item(self):
            return 0.25

    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=PLAN, stream=buf, clock=clock)
    p.start()
    p.phase_start(0)
    clock.tick()
    p.step(0, 0, 3, {"total": float("nan"), "sup": np.float32(0.5), "con": float("inf"), "t": FakeTensor()}, lam=np.float64("nan"), beta=np.int64(2), lr=-math.inf)
    p.epoch({"phase": 0, "epoch": 0, "val_dice": np.float32("nan"), "val_hd95": np.array(4.5), "ok": np.bool_(True)})
    lines = parse(buf)  # raises on NaN/Infinity
    step = next(d for d in lines if d["type"] == "step")
    assert step["losses"] == {"total": None, "sup": 0.5, "con": None, "t": 0.25}
    assert step["lambda"] is None and step["beta"] == 2 and isinstance(step["beta"], int) and step["lr"] is None
    epoch = next(d for d in lines if d["type"] == "epoch")
    assert epoch["val_dice"] is None and epoch["val_hd95"] == 4.5 and epoch["ok"] is True
    assert dumps({"a": float("nan"), "b": [np.float16(1.5)]}) == '{"a":null,"b":[1.5]}'


def test_step_every_thins_but_keeps_last_step_of_each_epoch():
    plan = [(0, "warmup", 3, 10)]
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=plan, stream=buf, step_every=4, clock=clock)
    run_plan(p, clock, plan=plan)
    steps = [d for d in parse(buf) if d["type"] == "step"]
    emitted = [(d["epoch"], d["step"]) for d in steps]
    assert len(emitted) < 30 / 2, emitted
    for epoch in range(3):
        assert (epoch, 9) in emitted
    assert emitted[0] == (0, 0)  # the first step shows that training runs
    flat = [e * 10 + s for e, s in emitted]
    assert all(0 < b - a <= 4 for a, b in zip(flat, flat[1:])), flat


def test_eta_none_before_first_step_then_decreasing():
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=PLAN, stream=buf, clock=clock)
    assert p.eta_s() is None
    clock.tick(50.0)  # e.g. loading models before start(): not part of elapsed_s
    p.start()
    assert p.elapsed_s() == 0.0
    p.phase_start(0)
    clock.tick(5.0)
    assert p.eta_s() is None  # time passed but no step measured yet
    p.epoch({"phase": 0, "epoch": 0})
    assert parse(buf)[-1]["eta_s"] is None

    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=PLAN, stream=buf, clock=clock)
    run_plan(p, clock, dt=2.0)
    steps = [d for d in parse(buf) if d["type"] == "step"]
    etas = [d["eta_s"] for d in steps]
    assert all(e is not None for e in etas)
    assert all(b < a for a, b in zip(etas, etas[1:])), etas
    # constant 2 s/step: the estimate is exact
    assert etas[0] == pytest.approx(35 * 2.0) and etas[-1] == pytest.approx(0.0)


def test_resume_does_not_distort_eta():
    # resume in phase 1 at epoch 2: phase 0 (12 steps) and 2 epochs of phase 1 (8 steps) are done
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("json", plan=PLAN, stream=buf, clock=clock)
    run_plan(p, clock, dt=3.0, resume=(1, 2))
    lines = parse(buf)
    steps = [d for d in lines if d["type"] == "step"]
    assert len(steps) == 36 - 20
    assert steps[0]["progress"] == pytest.approx(21 / 36)
    for k, d in enumerate(steps, start=1):
        remaining = 36 - 20 - k
        assert d["eta_s"] == pytest.approx(3.0 * remaining), (k, d)


def test_eta_follows_speed_of_current_phase():
    plan = [(0, "warmup", 2, 5), (1, "semi", 2, 5)]
    clock = FakeClock()
    p = Progress("none", plan=plan, clock=clock)
    p.start()
    p.phase_start(0)
    for i in range(10):
        clock.tick(1.0)
        p.step(0, i // 5, i % 5, {"total": 1.0})
    assert p.eta_s() == pytest.approx(10.0)
    p.phase_start(1)
    for i in range(5):
        clock.tick(4.0)  # the teacher makes steps 4x slower
        p.step(1, i // 5, i % 5, {"total": 1.0})
    assert p.eta_s() == pytest.approx(5 * 4.0)


def test_text_mode_prints_one_line_per_epoch():
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("auto", plan=PLAN, stream=buf, clock=clock)  # StringIO is no terminal
    assert p.mode == "text"
    run_plan(p, clock)
    out = buf.getvalue()
    lines = out.splitlines()
    epoch_lines = [ln for ln in lines if " epoch " in ln]
    assert len(epoch_lines) == 9
    assert "semi" in epoch_lines[3] and "epoch 1/4" in epoch_lines[3] and "(all 4/9)" in epoch_lines[3]
    assert "dice 0.8" in epoch_lines[0] and "hd95 3.5 mm" in epoch_lines[0] and "eta" in epoch_lines[0]
    assert lines[-1].startswith("training finished")
    assert not any(ln.lstrip().startswith("{") for ln in lines)
    assert len(lines) < 20  # no step lines


def test_tqdm_mode_draws_bars_and_summaries():
    buf, clock = io.StringIO(), FakeClock()
    p = Progress("tqdm", plan=PLAN[:1], stream=buf, clock=clock)
    run_plan(p, clock, plan=PLAN[:1])
    out = buf.getvalue()
    assert "0 warmup" in out and "12/12" in out
    assert "\u03bb" in out and "total" in out
    assert "warmup  epoch 3/3" in out
    assert not p._bars


def test_context_manager_reports_failure_once_and_reraises():
    buf = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        with Progress("json", plan=PLAN, stream=buf) as p:
            p.start()
            p.phase_start(0)
            raise RuntimeError("boom")
    final = [d for d in parse(buf) if d["type"] == "final"]
    assert len(final) == 1
    assert final[0]["status"] == "failed" and final[0]["error"] == "boom" and final[0]["error_type"] == "RuntimeError"
    assert not p._bars

    buf = io.StringIO()
    with pytest.raises(ValueError):
        with Progress("json", plan=PLAN, stream=buf) as p:
            p.final("stopped")
            raise ValueError("after final")
    assert [d["status"] for d in parse(buf) if d["type"] == "final"] == ["stopped"]
    with pytest.raises(ValueError):
        p.final("done")


def test_message_and_broken_stream():
    buf = io.StringIO()
    p = Progress("json", plan=PLAN, stream=buf)
    p.message("caching 12 volumes", level="warning")
    assert parse(buf)[-1] == {"type": "message", "level": "warning", "text": "caching 12 volumes", "elapsed_s": parse(buf)[-1]["elapsed_s"]}
    buf.close()
    p.message("reader gone")  # must not raise
    p.final("finished")


def test_metrics_log_survives_partial_line_and_truncates_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    assert log.read() == [] and read_metrics(path) == []
    for g in range(1, 4):
        log.append({"type": "epoch", "global_epoch": g, "losses": {"total": np.float32(1.0 / g)}, "val_dice": float("nan")})
    with open(path, "ab") as fh:  # a kill -9 in the middle of a write
        fh.write(b'{"type":"epoch","global_epoch":4,"los')
    records = read_metrics(path)
    assert [r["global_epoch"] for r in records] == [1, 2, 3]
    assert records[0]["val_dice"] is None and records[1]["losses"]["total"] == 0.5

    log.append({"type": "epoch", "global_epoch": 4})  # the partial line must not swallow it
    assert [r["global_epoch"] for r in log.read()] == [1, 2, 3, 4]
    assert b"\n\n" not in path.read_bytes()  # a newline is added only after a partial line
    path.open("ab").write(b"not json\n[1, 2]\n\xff\xfe\n")
    assert len(log.read()) == 4

    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        log.truncate(lambda r: r["global_epoch"] <= 2)
    assert path.read_bytes() == before  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no temp left
    monkeypatch.undo()

    assert log.truncate(lambda r: r["global_epoch"] <= 2) == 2
    assert [r["global_epoch"] for r in log.read()] == [1, 2]
    text = path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]
    assert MetricsLog(tmp_path / "missing.jsonl").truncate(lambda r: True) == 0


def realistic_records():
    """Epoch records as a run with three phases writes them, with gaps and a NaN."""
    rng = np.random.default_rng(0)
    records = []
    clock = FakeClock()
    p = Progress("none", plan=[(0, "warmup", 4, 10), (1, "semi", 8, 10), (2, "finetune", 3, 10)], clock=clock)
    p.start()
    g = 0
    for phase, epochs in ((0, 4), (1, 8), (2, 3)):
        p.phase_start(phase)
        for epoch in range(epochs):
            g += 1
            clock.tick(10)
            p.step(phase, epoch, 9, {"total": 1.0})
            losses = {"total": 1.5 / g + 0.05 * rng.random(), "sup": 1.0 / g}
            if phase == 1:
                losses["con"] = 0.2 / g
                losses["rs_con"] = 0.1 / g
            if g == 6:
                losses["total"] = float("nan")
            validated = g % 2 == 0
            records.append(
                p.epoch(
                    {
                        "phase": phase,
                        "epoch": epoch,
                        "losses": losses,
                        "lambda": 0.0 if phase == 0 else min(1.0, 0.15 * (epoch + 1)),
                        "beta": None if phase != 1 else 0.5,
                        "lr": 1e-3,
                        "val_dice": 0.3 + 0.04 * g if validated else None,
                        "val_hd95": 20.0 / g if validated else None,
                    }
                )
            )
    records.insert(3, {"type": "step", "phase": 0})  # not an epoch record: ignored
    return records


def _image_check(path, min_bytes=20_000):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes, len(data)
    img = imread(path)[..., :3]
    assert img.std() > 0.05
    coloured = (img.max(axis=2) - img.min(axis=2)) > 0.3  # lines, not just grey axes
    return img, int(coloured.sum())


def test_plot_curves_writes_a_nonblank_png(tmp_path):
    records = realistic_records()
    assert [r["global_epoch"] for r in records if r.get("type") == "epoch"] == list(range(1, 16))
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in records:
        log.append(r)
    out = plot_curves(log.path, tmp_path / "plots" / "curves.png", title="phantom run")
    assert out == tmp_path / "plots" / "curves.png"
    img, coloured = _image_check(out)
    assert img.shape[0] > 800 and img.shape[1] > 800
    assert coloured > 2000, coloured
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]

    # a single epoch with missing keys and NaN still draws something coloured
    single = [{"type": "epoch", "phase": 0, "epoch": 0, "global_epoch": 1, "losses": {"total": float("nan"), "sup": 0.7}, "lambda": None}]
    _, coloured = _image_check(plot_curves(single, tmp_path / "one.png"), min_bytes=10_000)
    assert coloured > 20
    # nothing to draw: a figure that says so, not an exception
    _image_check(plot_curves(tmp_path / "absent.jsonl", tmp_path / "empty.png"), min_bytes=5_000)


def test_format_duration():
    assert format_duration(None) == "?"
    assert format_duration(42.4) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3725) == "1h02m"
