"""SemiSAMTrain without Slicer: the training runner against real child processes, the headless
entry ``scripts/slicer_train.py``, GUI values ⇄ config, the dataset check, the chart nodes.

* a real ``python -m semisam.cli train --progress json`` child: a normal run to ``finished``
  (events for every phase, ``best.pt``), then Stop (SIGINT) → ``stopped`` and Resume →
  ``finished`` with ``metrics.jsonl`` continuing without a duplicate epoch;
* fake children written here: malformed stdout, a crash (exit 3 after some lines), a child
  that ignores SIGINT and SIGTERM (Stop escalates to SIGKILL), one that cannot be spawned;
* ``python scripts/slicer_train.py --config CFG``: 0 on a good config, 2 and one clear line on
  a wrong key or a missing dataset.

One tiny cohort (2 labeled + 1 unlabeled + 1 validation phantom, trained on a 4 x 32 x 32 grid)
and one embedding cache (filled by the first run) serve every training, so each costs seconds.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "SemiSAMTrain"
sys.path.insert(0, str(MODULE))

from SemiSAMTrainLib import chart, runner, settings  # noqa: E402

GRID = [4, 32, 32]  # training grid (z, y, x): 4 slices per volume to embed (2 make the losses NaN)
RUN_TIMEOUT = 600.0  # one training; the first embeds 16 slices (~1-2 s each on 2 shared cores)
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def tiny_overrides(cache: Path, phases: Sequence[int]) -> Dict[str, Any]:
    warmup, semi, finetune = phases
    return {
        "preprocess.target_spacing": [1.5, 1.5, 4.0],
        "preprocess.target_shape": GRID,
        "student.channels": [16, 8],
        "student.block_depth": GRID[0],
        "data.cache_dir": str(cache),
        "pseudo.refresh_every": 1,
        "pseudo.inplane_views": False,  # flipped/transposed views would need new slices embedded
        "validation.hd95": False,
        "phases.warmup.epochs": warmup, "phases.warmup.lr": 0.005,
        "phases.semi.epochs": semi, "phases.semi.lr": 0.003,
        "phases.finetune.epochs": finetune, "phases.finetune.lr": 0.001,
        "device": "cpu",
    }


def write_config(folder: Path, cohort: Path, phases: Sequence[int]) -> Path:
    """The tiny config, written the way the GUI writes it (``settings.write_training_config``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    settings.write_training_config(path, cohort, folder / "run", tiny_overrides(cohort.parent / "cache", phases))
    return path


def of_type(events: List[runner.Event], cls) -> List[Any]:
    return [e for e in events if isinstance(e, cls)]


def wait_until(run: runner.TrainingRun, predicate, timeout: float = RUN_TIMEOUT) -> List[runner.Event]:
    """Poll until ``predicate(new_events)`` holds or the child is gone; fails on a timeout."""
    events: List[runner.Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = run.poll()
        events.extend(new)
        if predicate(new) or not run.state.active:
            return events
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"training still {run.state.value} after {timeout:.0f} s; stderr tail:\n" + "\n".join(run.stderr_tail))


def finish(run: runner.TrainingRun, timeout: float = RUN_TIMEOUT) -> List[runner.Event]:
    try:
        return run.wait(timeout)
    except TimeoutError:
        run.kill()
        pytest.fail(f"training still {run.state.value} after {timeout:.0f} s; stderr tail:\n" + "\n".join(run.stderr_tail))


def fake_child(tmp_path: Path, body: str, name: str = "fake_child.py") -> List[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


# ------------------------------------------------------------------------------------------
# Fixtures: one cohort, one normal run (it fills the embedding cache for the others)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from semisam.phantom import write_cohort

    root = tmp_path_factory.mktemp("train_module")
    return Path(write_cohort(root / "cohort", 3, 2, validation=1, overwrite=True))


@pytest.fixture(scope="module")
def normal(cohort: Path):
    """A real three-phase training through the runner, read to the end."""
    folder = cohort.parent / "normal"
    config = write_config(folder, cohort, (1, 1, 1))
    run = runner.TrainingRun(config, env=ENV)
    seen: List[runner.Event] = []
    cmd = run.start()
    seen.extend(finish(run))
    return run, seen, folder / "run", cmd


# ------------------------------------------------------------------------------------------
# 1. real training children
# ------------------------------------------------------------------------------------------


def test_normal_run_finishes_with_events_for_every_phase(normal):
    run, events, output, cmd = normal
    assert cmd == [sys.executable, "-m", "semisam.cli", "train", "--config", str(run.config), "--progress", "json"]
    assert run.state == runner.RunState.FINISHED, run.reason
    assert run.returncode == 0
    states = [(e.previous, e.state) for e in of_type(events, runner.StateEvent)]
    assert states == [(runner.RunState.IDLE, runner.RunState.RUNNING), (runner.RunState.RUNNING, runner.RunState.FINISHED)]

    start = of_type(events, runner.StartEvent)
    assert len(start) == 1 and [(p["phase"], p["epochs"]) for p in start[0].plan] == [(0, 1), (1, 1), (2, 1)]
    assert start[0].output == str(output) and start[0].resumed is False
    assert [e.phase for e in of_type(events, runner.PhaseStartEvent)] == [0, 1, 2]
    assert [e.phase for e in of_type(events, runner.PhaseEndEvent)] == [0, 1, 2]
    steps = of_type(events, runner.StepEvent)
    assert {e.phase for e in steps} == {0, 1, 2} and all(isinstance(e.losses.get("total"), float) for e in steps)
    assert any(e.lam is not None and e.beta is not None for e in steps if e.phase == 1)
    epochs = of_type(events, runner.EpochEvent)
    assert [e.global_epoch for e in epochs] == [1, 2, 3]
    assert all(isinstance(e.val_dice, float) and 0.0 <= e.val_dice <= 1.0 for e in epochs)
    messages = [e.text for e in of_type(events, runner.MessageEvent)]
    assert any("embedded" in t or "found in the cache" in t for t in messages), messages
    final = of_type(events, runner.FinalEvent)
    assert len(final) == 1 and final[0].status == "finished"

    assert (output / "best.pt").is_file() and (output / "last.pt").is_file()
    assert run.best_checkpoint == output / "best.pt"
    progress = run.progress
    assert list(progress.phases) == [0, 1, 2] and all(p.state == "done" and p.fraction == 1.0 for p in progress.phases.values())
    assert progress.current_phase == progress.last_phase == 2
    assert progress.fraction == 1.0 and progress.eta_s == 0.0
    assert [r["global_epoch"] for r in progress.history] == [1, 2, 3]
    assert progress.latest.global_epoch == 3 and progress.latest.val_dice is not None
    assert progress.global_epoch == 3
    with pytest.raises(runner.IllegalTransition):
        run.stop()  # nothing runs


def test_stop_then_resume_continues_the_metrics_without_duplicates(normal, cohort: Path):
    from semisam.progress import read_metrics

    folder = cohort.parent / "stop_resume"
    # six epochs: room to stop after the first even when a loaded machine delays the epoch lines
    config = write_config(folder, cohort, (1, 4, 1))
    output = folder / "run"
    run = runner.TrainingRun(config, env=ENV, stop_timeout=60.0)
    run.start()
    seen = wait_until(run, lambda new: any(isinstance(e, runner.EpochEvent) for e in new))
    # the epoch line comes just before last.pt is written: stop once the checkpoint is there
    deadline = time.time() + 60
    while not (output / "last.pt").is_file() and time.time() < deadline:
        seen += run.poll()
        time.sleep(0.05)
    assert run.state == runner.RunState.RUNNING, f"the run ended before it could be stopped: {run.reason}"
    run.stop()
    assert run.state == runner.RunState.STOPPING
    run.stop()  # a second Stop while stopping changes nothing
    seen += finish(run, timeout=120)
    assert run.state == runner.RunState.STOPPED, run.reason
    # the trainer turned SIGINT into its own "stopped" line and died of SIGINT, also where this
    # process (and so the child) inherited an ignored SIGINT (semisam.cli.honour_sigint)
    assert run.final is not None and run.final.status == "stopped", run.stderr_tail
    assert run.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" in (run.final.error or "") + (run.final.error_type or "")
    states = [e.state for e in of_type(seen, runner.StateEvent)]
    assert states == [runner.RunState.RUNNING, runner.RunState.STOPPING, runner.RunState.STOPPED]
    stopped_at = [r["global_epoch"] for r in read_metrics(output / "metrics.jsonl")]
    assert stopped_at and stopped_at == list(range(1, len(stopped_at) + 1)) and len(stopped_at) < 6
    assert (output / "last.pt").is_file() and runner.has_checkpoint(output)

    cmd = run.start(resume=True)
    assert cmd[-1] == "--resume"
    events = finish(run)
    assert run.state == runner.RunState.FINISHED, run.reason
    start = of_type(events, runner.StartEvent)[0]
    assert start.resumed is True
    resumed = [e.text for e in of_type(events, runner.MessageEvent) if e.text.startswith("resumed after epoch")]
    assert resumed, [e.text for e in of_type(events, runner.MessageEvent)]
    done_before = int(resumed[0].split()[3])
    assert done_before >= 1
    new_epochs = [e.global_epoch for e in of_type(events, runner.EpochEvent)]
    assert new_epochs == list(range(done_before + 1, 7))  # no epoch done twice
    assert [r["global_epoch"] for r in read_metrics(output / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["global_epoch"] for r in run.progress.history] == [1, 2, 3, 4, 5, 6]  # the chart continues
    assert all(p.state == "done" for p in run.progress.phases.values())
    assert (output / "best.pt").is_file()


# ------------------------------------------------------------------------------------------
# 2. fake children: malformed output, crashes, stubborn processes
# ------------------------------------------------------------------------------------------

MALFORMED = r'''
import json, sys
def out(x):
    print(x if isinstance(x, str) else json.dumps(x), flush=True)
out("Loading weights... (a library printing to stdout)")
out({"type": "start", "plan": [{"phase": 0, "name": "warmup", "epochs": 2, "steps_per_epoch": 2}, {"phase": 1, "name": "semi", "epochs": 0, "steps_per_epoch": 3}], "total_epochs": 2, "total_steps": 4, "output": "/nowhere", "resumed": False})
out('{"type": "step", "phase": 0, "epoch": 0')  # cut off
out("[1, 2, 3]")
out('"just a string"')
out({"no_type": 1})
out({"type": "telemetry", "gpu": "busy"})
out({"type": "phase_start", "phase": 0, "phase_name": "warmup", "epochs": 2, "steps_per_epoch": 2, "start_epoch": 0})
out('{"type": "step", "phase": 0, "phase_name": "warmup", "epoch": 0, "epochs": 2, "step": 0, "steps": 2, "losses": {"total": NaN, "sup": 0.5}, "lambda": "x", "progress": 0.25, "eta_s": 3}')
out({"type": "step", "phase": "zero", "epoch": [], "losses": 7})
out({"type": "epoch", "phase": 0, "phase_name": "warmup", "epoch": 0, "epochs": 2, "global_epoch": 1, "losses": {"total": 0.9}, "val_dice": 0.4})
sys.stdout.buffer.write(b"\xff\xfe not utf-8\n"); sys.stdout.flush()
out({"type": "message", "level": "info", "text": "half way"})
out({"type": "epoch", "phase": 0, "phase_name": "warmup", "epoch": 1, "epochs": 2, "global_epoch": 2, "losses": {"total": 0.7}, "val_dice": 0.6})
out({"type": "phase_end", "phase": 0, "phase_name": "warmup"})
out({"type": "final", "status": "finished", "best_checkpoint": "/nowhere/best.pt"})
print("a warning on stderr", file=sys.stderr)
'''


def test_malformed_lines_become_log_events_and_never_stop_the_reader(tmp_path: Path):
    run = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, MALFORMED))
    run.start()
    events = finish(run, timeout=60)
    assert run.state == runner.RunState.FINISHED, run.reason
    logs = [e.text for e in of_type(events, runner.LogEvent) if e.stream == "stdout"]
    assert "Loading weights... (a library printing to stdout)" in logs
    assert '{"type": "step", "phase": 0, "epoch": 0' in logs and "[1, 2, 3]" in logs and '"just a string"' in logs
    assert '{"no_type": 1}' in logs
    assert any("not utf-8" in t for t in logs)
    assert [e.raw.get("type") for e in of_type(events, runner.OtherEvent)] == ["telemetry"]
    assert [e.text for e in of_type(events, runner.LogEvent) if e.stream == "stderr"] == ["a warning on stderr"]
    steps = of_type(events, runner.StepEvent)
    assert steps[0].losses == {"total": None, "sup": 0.5} and steps[0].lam is None and steps[0].eta_s == 3.0
    assert steps[1].phase is None and steps[1].losses == {}  # wrong types read as missing
    assert run.progress.phases[0].state == "done" and run.progress.fraction == 1.0
    assert run.progress.phases[1].state == "skipped" and run.progress.last_phase == 0
    assert [r["global_epoch"] for r in run.progress.history] == [1, 2]
    assert run.progress.best_val_dice == 0.6 and run.progress.best_epoch == 2
    assert run.final.best_checkpoint == "/nowhere/best.pt" and run.best_checkpoint is None  # it does not exist


CRASH = r'''
import json, sys
print(json.dumps({"type": "start", "plan": [{"phase": 0, "name": "warmup", "epochs": 5, "steps_per_epoch": 1}], "total_epochs": 5, "total_steps": 5}), flush=True)
print(json.dumps({"type": "phase_start", "phase": 0, "phase_name": "warmup", "epochs": 5, "steps_per_epoch": 1, "start_epoch": 0}), flush=True)
print(json.dumps({"type": "step", "phase": 0, "phase_name": "warmup", "epoch": 0, "epochs": 5, "step": 0, "steps": 1, "losses": {"total": 1.0}}), flush=True)
print("Traceback (most recent call last):", file=sys.stderr)
print('  File "train.py", line 1, in <module>', file=sys.stderr)
print("RuntimeError: CUDA error: an illegal memory access was encountered", file=sys.stderr, flush=True)
sys.exit(3)
'''


def test_a_crash_without_a_final_line_fails_with_the_stderr_tail(tmp_path: Path):
    run = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, CRASH))
    run.start()
    events = finish(run, timeout=60)
    assert run.state == runner.RunState.FAILED
    assert run.returncode == 3 and run.final is None
    assert "exit status 3" in run.reason and "RuntimeError: CUDA error: an illegal memory access was encountered" in run.reason
    last = of_type(events, runner.StateEvent)[-1]
    assert last.state == runner.RunState.FAILED and last.returncode == 3 and last.reason == run.reason
    assert run.progress.phases[0].state == "running" and run.progress.phases[0].fraction == pytest.approx(0.2)
    assert run.best_checkpoint is None


def test_a_final_failed_line_gives_the_reason(tmp_path: Path):
    body = '''
    import json, sys
    print(json.dumps({"type": "final", "status": "failed", "error": "dataset: /data/x does not exist", "error_type": "ConfigError"}), flush=True)
    print("semisam train: error: dataset: /data/x does not exist", file=sys.stderr)
    sys.exit(2)
    '''
    run = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, body))
    run.start()
    finish(run, timeout=60)
    assert run.state == runner.RunState.FAILED and run.returncode == 2
    assert run.reason == "dataset: /data/x does not exist (exit status 2)"


def test_finished_line_with_a_bad_exit_status_is_a_failure(tmp_path: Path):
    body = '''
    import json, sys
    print(json.dumps({"type": "final", "status": "finished"}), flush=True)
    sys.exit(1)
    '''
    run = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, body))
    run.start()
    finish(run, timeout=60)
    assert run.state == runner.RunState.FAILED and "reported 'finished'" in run.reason


STUBBORN = r'''
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"type": "message", "level": "info", "text": "ignoring SIGINT and SIGTERM"}), flush=True)
time.sleep(120)
'''


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_stop_escalates_to_sigterm_then_sigkill(tmp_path: Path):
    run = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, STUBBORN), stop_timeout=1.0, kill_timeout=1.0)
    run.start()
    wait_until(run, lambda new: any(isinstance(e, runner.MessageEvent) for e in new), timeout=60)
    t0 = time.monotonic()
    run.stop()
    events = finish(run, timeout=30)
    assert time.monotonic() - t0 < 15
    assert run.state == runner.RunState.STOPPED and run.returncode == -signal.SIGKILL
    warnings = [e.text for e in of_type(events, runner.LogEvent) if e.stream == "runner" and e.level == "warning"]
    assert len(warnings) == 2 and warnings[0].endswith("terminate") and warnings[1].endswith("kill")
    assert "stopped on request (killed by SIGKILL)" in run.reason


def test_illegal_transitions_and_a_child_that_cannot_start(tmp_path: Path):
    run = runner.TrainingRun(tmp_path / "cfg.yaml", python=str(tmp_path / "no_such_python"))
    with pytest.raises(runner.IllegalTransition, match="from idle to stopping"):
        run.stop()
    run.start()
    assert run.state == runner.RunState.FAILED and "could not start" in run.reason
    events = run.poll()
    assert [(e.previous, e.state) for e in of_type(events, runner.StateEvent)] == [(runner.RunState.IDLE, runner.RunState.FAILED)]

    sleeper = runner.TrainingRun(tmp_path / "cfg.yaml", command=fake_child(tmp_path, "import time; time.sleep(60)", "sleeper.py"))
    sleeper.start()
    try:
        with pytest.raises(runner.IllegalTransition, match="while it is running"):
            sleeper.start()
    finally:
        sleeper.kill()
    finish(sleeper, timeout=30)
    assert sleeper.state == runner.RunState.STOPPED
    for state, allowed in runner.TRANSITIONS.items():  # terminal states only lead back to running
        if state.terminal:
            assert allowed == (runner.RunState.RUNNING,)


def test_parse_line_never_raises():
    assert isinstance(runner.parse_line(""), runner.LogEvent)
    assert isinstance(runner.parse_line("{"), runner.LogEvent)
    assert isinstance(runner.parse_line('{"type": 5}'), runner.LogEvent)
    e = runner.parse_line('{"type":"epoch","phase":1,"epoch":2,"global_epoch":7,"losses":{"total":1,"con":Infinity},"val_dice":null,"elapsed_s":4.5}\n')
    assert isinstance(e, runner.EpochEvent) and e.global_epoch == 7 and e.losses == {"total": 1.0, "con": None}
    assert e.val_dice is None and e.elapsed_s == 4.5 and "val_dice" in e.raw
    f = runner.parse_line('{"type":"final","status":"stopped","error":"KeyboardInterrupt","error_type":"KeyboardInterrupt"}')
    assert isinstance(f, runner.FinalEvent) and f.status == "stopped" and f.error == "KeyboardInterrupt"


def test_child_environment_and_python():
    run = runner.TrainingRun("cfg.yaml", env={"SEMISAM_X": "1"})
    env = run.environment()
    assert env["PYTHONUNBUFFERED"] == "1" and env["SEMISAM_X"] == "1"
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep)  # where this process imports semisam from
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)
    assert runner.default_python() == sys.executable


# ------------------------------------------------------------------------------------------
# 3. the headless entry
# ------------------------------------------------------------------------------------------


def script(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "slicer_train.py"), "--config", str(config), *args],
                            cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


def test_headless_script_trains_and_refuses_bad_configs(normal, cohort: Path, tmp_path: Path):
    good = write_config(tmp_path / "good", cohort, (1, 0, 0))
    bad_key = write_config(tmp_path / "bad_key", cohort, (1, 0, 1))
    data = yaml.safe_load(bad_key.read_text(encoding="utf-8"))
    data["phases"]["warmup"]["epochz"] = 1
    bad_key.write_text(yaml.safe_dump(data), encoding="utf-8")
    missing = write_config(tmp_path / "missing", cohort, (1, 0, 1))
    data = yaml.safe_load(missing.read_text(encoding="utf-8"))
    data["dataset"] = str(tmp_path / "no_such_dataset")
    missing.write_text(yaml.safe_dump(data), encoding="utf-8")

    children = {name: script(path) for name, path in (("bad_key", bad_key), ("missing", missing), ("good", good))}
    results = {}
    for name, child in children.items():
        try:
            out, err = child.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail(f"slicer_train.py ({name}) still running after {RUN_TIMEOUT:.0f} s")
        results[name] = (child.returncode, out, err)

    rc, out, err = results["good"]
    assert rc == 0, err[-3000:]
    assert out.strip().splitlines()[-1].startswith("training finished: best validation Dice"), out
    assert str(tmp_path / "good" / "run" / "best.pt") in out
    assert (tmp_path / "good" / "run" / "best.pt").is_file()
    assert "phase 0 warmup done" in err and "warmup  epoch 1/1" in err  # --progress text: lines on stderr

    for name, needle in (("bad_key", "phases.warmup.epochz: unknown setting"), ("missing", f"{tmp_path / 'no_such_dataset'} does not exist")):
        rc, out, err = results[name]
        lines = err.strip().splitlines()
        assert rc == 2, (name, err)
        assert lines and lines[-1].startswith("semisam train: error:") and needle in lines[-1], err
        assert "Traceback" not in err
        assert not (tmp_path / name / "run" / "last.pt").exists()


def test_headless_script_argument_errors():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "slicer_train.py")], capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert done.returncode == 2 and "--config" in done.stderr


# ------------------------------------------------------------------------------------------
# 4. GUI settings -> config, dataset check, "Use this model", chart
# ------------------------------------------------------------------------------------------


def test_gui_values_are_the_config_defaults():
    from semisam.config import TrainConfig

    values = settings.gui_values()
    cfg = TrainConfig()
    assert set(values) == set(settings.GUI_SETTINGS)
    assert values["warmupEpochs"] == cfg.phases.warmup.epochs and values["semiLr"] == cfg.phases.semi.lr
    assert values["uTh"] == cfg.pseudo.u_th and values["lambdaMax"] == cfg.loss.lambda_max and values["device"] == cfg.device
    assert settings.overrides_from_gui({"semiEpochs": 3}) == {"phases.semi.epochs": 3}
    with pytest.raises(KeyError, match="nope"):
        settings.overrides_from_gui({"nope": 1})
    assert "litemedsam" in settings.teacher_names() and "medsam2" in settings.teacher_names()


def test_write_training_config_validates_with_semisam(cohort: Path, tmp_path: Path):
    from semisam.config import ConfigError, TrainConfig, load_config

    path = tmp_path / "out" / settings.CONFIG_NAME
    teachers = [("litemedsam", None), ("medsam2", str(tmp_path / "medsam2.pt"))]
    cfg = settings.write_training_config(path, cohort, tmp_path / "out", {"phases.semi.epochs": 7, "loss.beta_max": 0.2}, teachers)
    assert cfg.phases.semi.epochs == 7 and cfg.loss.beta_max == 0.2 and cfg.dataset == str(cohort)
    assert cfg.output == str(tmp_path / "out")
    assert [(t.name, t.checkpoint) for t in cfg.pseudo.teachers] == teachers
    assert cfg.phases.warmup.epochs == TrainConfig().phases.warmup.epochs  # everything else: defaults
    assert "# SemiSAM training configuration" in path.read_text(encoding="utf-8")  # semisam's commented YAML
    assert load_config(path).to_dict() == cfg.to_dict()

    with pytest.raises(ConfigError, match=r"phases\.semi\.lr: must be > 0"):
        settings.write_training_config(path, cohort, tmp_path / "out", {"phases.semi.lr": 0.0})
    with pytest.raises(ConfigError, match=r"pseudo\.teachers\[0\]\.name"):
        settings.write_training_config(path, cohort, tmp_path / "out", teachers=[("no-such-teacher", None)])
    with pytest.raises(ConfigError, match="does not exist"):
        settings.write_training_config(path, tmp_path / "no_dataset", tmp_path / "out")

    base = tmp_path / "base" / "base.yaml"  # a user's YAML: its other settings and relative paths are kept
    base.parent.mkdir()
    base.write_text("dataset: nowhere\npreprocess: {target_shape: [8, 32, 32]}\ndata: {cache_dir: shared_cache}\n", encoding="utf-8")
    shown = settings.gui_values(settings.read_base_config(base))
    assert shown["warmupEpochs"] == TrainConfig().phases.warmup.epochs
    cfg = settings.write_training_config(path, cohort, tmp_path / "out", {"phases.warmup.epochs": 2}, base=base)
    assert tuple(cfg.preprocess.target_shape) == (8, 32, 32) and cfg.phases.warmup.epochs == 2
    assert cfg.data.cache_dir == str(base.parent / "shared_cache") and cfg.dataset == str(cohort)


def test_check_dataset_says_what_semisam_validate_says(cohort: Path, tmp_path: Path, capsys):
    import shutil

    from semisam.cli import main

    ok = settings.check_dataset(cohort)
    assert ok.ok and (ok.labeled, ok.unlabeled, ok.validation) == (2, 1, 1)
    assert main(["validate", str(cohort)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ok.messages

    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    label = sorted((broken / "labelsTr").iterdir())[0]
    label.write_bytes(b"not an image")
    bad = settings.check_dataset(broken)
    assert not bad.ok and bad.errors >= 1
    assert main(["validate", str(broken)]) == 1
    captured = capsys.readouterr()
    assert sorted((captured.out + captured.err).strip().splitlines()) == sorted(bad.messages)
    assert any(label.name in m for m in bad.messages)

    missing = settings.check_dataset(tmp_path / "nothing_here")
    assert not missing.ok and "does not exist" in missing.messages[0]


def test_history_with_puts_the_model_first():
    assert settings.history_with("/a/best.pt", None) == ["/a/best.pt"]
    assert settings.history_with("/a/best.pt", "/b.pt") == ["/a/best.pt", "/b.pt"]
    assert settings.history_with("/a/best.pt", ["/b.pt", "/a/best.pt", "/c.pt"]) == ["/a/best.pt", "/b.pt", "/c.pt"]
    assert len(settings.history_with("/x", [f"/{i}" for i in range(9)])) == 5


def test_chart_nodes_follow_the_epoch_records():
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    history = [{"global_epoch": 1, "losses": {"total": 1.0, "sup": 1.0}, "val_dice": 0.2},
               {"global_epoch": 2, "losses": {"total": 0.8, "sup": 0.6, "con": 0.1}, "val_dice": None}]
    table, plot = chart.update_chart(scene, history)
    assert table.GetNumberOfRows() == 2
    assert list(chart.series_columns(plot)) == ["loss total", "loss sup", "loss con", "val dice"]
    t = table.GetTable()
    assert t.GetValueByName(0, "val dice").ToDouble() == pytest.approx(0.2)
    assert str(t.GetValueByName(1, "val dice").ToDouble()) == "nan" and str(t.GetValueByName(0, "loss con").ToDouble()) == "nan"
    table2, plot2 = chart.update_chart(scene, history[:1], table, plot)  # same nodes, a series less
    assert table2 is table and plot2 is plot and list(chart.series_columns(plot)) == ["loss total", "loss sup", "val dice"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 3
    chart.remove_chart(scene, table, plot)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 0 and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


# ------------------------------------------------------------------------------------------
# 5. static: every parameter-node binding has a widget that can show its type
# ------------------------------------------------------------------------------------------


def test_parameter_node_widgets_match_the_field_types():
    tree = ast.parse((MODULE / "SemiSAMTrain.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SemiSAMTrainParameterNode")
    types = {}
    for stmt in wrapper.body:
        if isinstance(stmt, ast.AnnAssign):
            ann = stmt.annotation
            base = ann.slice.elts[0] if isinstance(ann, ast.Subscript) and isinstance(ann.slice, ast.Tuple) else ann
            types[stmt.target.id] = (ast.unparse(base), ast.unparse(ann))
    root = ET.parse(MODULE / "Resources" / "UI" / "SemiSAMTrain.ui").getroot()
    widget_for = {"int": {"QSpinBox"}, "float": {"QDoubleSpinBox"}, "bool": {"QCheckBox"}, "str": {"QComboBox", "QLineEdit"}}
    bound = {}
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert set(bound) == set(settings.GUI_SETTINGS), "every GUI setting is bound to exactly one widget"
    for name, cls in bound.items():
        base, full = types[name]
        assert cls in widget_for[base], f"{name}: {base} shown in a {cls}"
        if cls == "QComboBox":
            assert "Choice" in full, f"{name}: a QComboBox binding needs a Choice annotation"


@pytest.mark.skipif(os.name != "posix", reason="POSIX signal inheritance")
def test_the_trainer_honours_sigint_inherited_as_ignored():
    """A child started with SIGINT ignored (as `nohup` or `cmd &` leave it) still turns SIGINT
    into KeyboardInterrupt once `semisam train` calls honour_sigint; without it, it would not."""
    def ignored() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    code = ("import os, signal, time\n"
            "from semisam.cli import honour_sigint\n"
            "{call}os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.5)\n"
            "print('survived')\n")
    plain = subprocess.run([sys.executable, "-c", code.format(call="")], preexec_fn=ignored, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "survived" in plain.stdout  # the inherited SIG_IGN holds
    fixed = subprocess.run([sys.executable, "-c", code.format(call="honour_sigint()\n")], preexec_fn=ignored, capture_output=True, text=True, timeout=120)
    assert fixed.returncode != 0 and "survived" not in fixed.stdout and "KeyboardInterrupt" in fixed.stderr
