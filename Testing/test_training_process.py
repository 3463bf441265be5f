"""Training as a process: the real ``semisam train`` CLI in child processes.

* kill -9 in the middle of an epoch, then ``--resume`` to the end: the checkpoint, the metrics
  log and the JSON stream stay consistent, and the result equals an uninterrupted run;
* torchrun with two CPU processes (gloo): ranks see different data, end with identical weights;
* the ``--progress json`` contract (strict JSON, known types, monotone steps and epochs);
* configuration errors: exit status 2, one line on stderr naming the key, nothing written;
* ``semisam init-config`` output read back by ``load_config`` with ``--set`` overrides.

Every run shares one tiny phantom cohort (64^3 volumes trained on an 8 x 32 x 32 grid) and one
embedding cache filled once per session, so each training costs seconds, not minutes.
Children run with ``OMP_NUM_THREADS=1`` and timeouts (overall and "no output for this long"),
so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

N_CASES, N_LABELED, N_VALIDATION = 5, 3, 1  # 3 labeled + 2 unlabeled, + 1 validation case
GRID = [8, 32, 32]  # training grid (z, y, x): 8 slices per training volume to embed (crop fov)
SPACING = [1.5, 1.5, 4.0]
TINY_PHASES = (2, 3, 1)  # warmup, semi, finetune epochs
LONG_PHASES = (3, 6, 2)  # the kill/resume runs: 11 epochs
KILL_AFTER = 4  # kill during the epoch after the first finished epoch >= this one

RUN_TIMEOUT = 300.0  # seconds for one training run
IDLE_TIMEOUT = 120.0  # seconds without a stdout line before a run counts as hung
PREFILL_TIMEOUT = 900.0  # the first run embeds every slice (~1 s per slice on 2 shared cores)
KNOWN_TYPES = {"start", "phase_start", "step", "epoch", "phase_end", "message", "final"}


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _no_constants(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def strict_json(line: str) -> Dict[str, Any]:
    """One stdout line as strict JSON (NaN/Infinity refused); it must be an object with a type."""
    obj = json.loads(line, parse_constant=_no_constants)
    assert isinstance(obj, dict), f"not a JSON object: {line!r}"
    assert obj.get("type") in KNOWN_TYPES, f"unknown line type: {line!r}"
    return obj


def child_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SEMISAM_DEBUG_DUMP")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def train_cmd(config: Path, *args: str) -> List[str]:
    return [sys.executable, "-m", "semisam.cli", "train", "--config", str(config), *args]


def torchrun_cmd(config: Path, *args: str, nproc: int = 2) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "semisam.cli", "train", "--config", str(config), *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_train_config(folder: Path, cohort: Path, cache: Path, phases: Sequence[int] = TINY_PHASES, output: str = "run", **sections: Any) -> Path:
    """The tiny config (``output`` relative to the YAML, as users write it)."""
    warmup, semi, finetune = phases
    cfg: Dict[str, Any] = {
        "dataset": str(cohort),
        "output": output,
        "preprocess": {"target_spacing": SPACING, "target_shape": GRID, "crop": "fov"},
        "student": {"channels": [16, 8], "block_depth": 4},
        "data": {"cache_dir": str(cache)},
        "pseudo": {"refresh_every": 2},
        "phases": {"warmup": {"epochs": warmup, "lr": 0.005}, "semi": {"epochs": semi, "lr": 0.003},
                   "finetune": {"epochs": finetune, "lr": 0.001}},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


class Child:
    """A child process whose stdout lines a thread reads, so that waiting can time out."""

    def __init__(self, cmd: List[str], cwd: Path, stderr_path: Path, env: Optional[Dict[str, str]] = None, group: bool = False):
        self.cmd, self.group, self.stderr_path = cmd, group, stderr_path
        self._err = open(stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, start_new_session=group)
        self.lines: List[str] = []
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._eof = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def _fail(self, why: str) -> None:
        self.kill()
        tail = "\n".join(self.stderr().splitlines()[-30:])
        pytest.fail(f"{why}: {' '.join(self.cmd)}\nlast stdout lines: {self.lines[-5:]}\nstderr tail:\n{tail}")

    def next_line(self, idle: float = IDLE_TIMEOUT) -> Optional[str]:
        """The next stdout line; None at the end of the output; fails after ``idle`` seconds of silence."""
        if self._eof:
            return None
        try:
            line = self._queue.get(timeout=idle)
        except queue.Empty:
            self._fail(f"no output for {idle:.0f} s (hung?)")
        if line is None:
            self._eof = True
            return None
        self.lines.append(line)
        return line

    def finish(self, timeout: float = RUN_TIMEOUT, idle: float = IDLE_TIMEOUT) -> int:
        """Read the rest of stdout and wait for the exit status."""
        deadline = time.monotonic() + timeout
        while self.next_line(max(1.0, min(idle, deadline - time.monotonic()))) is not None:
            if time.monotonic() > deadline:
                self._fail(f"still running after {timeout:.0f} s")
        try:
            rc = self.proc.wait(timeout=max(deadline - time.monotonic(), 5.0))
        except subprocess.TimeoutExpired:
            self._fail(f"stdout closed but the process did not exit within {timeout:.0f} s")
        self._err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            if self.group:
                # torchrun starts its workers in sessions of their own: note them before they are
                # orphaned, let torchrun stop them (SIGTERM), then SIGKILL whatever is left
                family = descendants(self.proc.pid)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
                for pid in [self.proc.pid] + family:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            else:
                self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        if not self._err.closed:
            self._err.close()

    def records(self) -> List[Dict[str, Any]]:
        return [strict_json(line) for line in self.lines]


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_to_end(cmd: List[str], cwd: Path, name: str, env: Optional[Dict[str, str]] = None, group: bool = False,
               timeout: float = RUN_TIMEOUT, idle: float = IDLE_TIMEOUT) -> "Finished":
    child = Child(cmd, cwd, cwd / f"{name}.stderr", env, group)
    try:
        rc = child.finish(timeout, idle)
    finally:
        child.kill()
    return Finished(rc, child.lines, child.stderr())


@dataclass
class Finished:
    rc: int
    lines: List[str]
    stderr: str

    def records(self) -> List[Dict[str, Any]]:
        return [strict_json(line) for line in self.lines]

    def check_ok(self) -> List[Dict[str, Any]]:
        assert self.rc == 0, f"exit status {self.rc}\nstderr tail:\n" + "\n".join(self.stderr.splitlines()[-30:])
        return self.records()


def messages(records: List[Dict[str, Any]]) -> List[str]:
    return [r["text"] for r in records if r["type"] == "message"]


def plan_offsets(start: Dict[str, Any]) -> Dict[int, int]:
    """phase -> epochs of the plan's phases before it."""
    out, n = {}, 0
    for p in start["plan"]:
        out[int(p["phase"])] = n
        n += int(p["epochs"])
    return out


def read_state(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_records(path: Path) -> List[Dict[str, Any]]:
    from semisam.progress import read_metrics

    return read_metrics(path)


# ------------------------------------------------------------------------------------------
# Fixtures: one cohort, one embedding cache, one uninterrupted long run
# ------------------------------------------------------------------------------------------


@dataclass
class Tiny:
    root: Path
    cohort: Path
    cache: Path
    labeled: List[str]
    unlabeled: List[str]
    validation: List[str]
    prefill_seconds: float = 0.0

    @property
    def n_slices(self) -> int:
        """Slices the training embeds: the training grid's of each labeled and unlabeled case, and
        every slice-tile of each validation case's whole field of view (validation segments it whole)."""
        from semisam.data import load_dataset
        from semisam.preprocess import PreprocessConfig, preprocess
        from semisam.tiling import tiles
        from semisam.volume import read_volume

        pre = PreprocessConfig(target_spacing=tuple(SPACING), target_shape=tuple(GRID), crop="whole")
        whole = 0
        for case in load_dataset(self.cohort).validation:
            image, _ = preprocess(read_volume(case.image), pre)
            whole += image.shape[0] * len(tiles(image.shape[1:], GRID[1:], pre.tile_overlap))
        return GRID[0] * (len(self.labeled) + len(self.unlabeled)) + whole


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """The tiny phantom cohort (a dataset folder with dataset.json)."""
    from semisam.phantom import write_cohort

    root = tmp_path_factory.mktemp("training_process")
    return Path(write_cohort(root / "cohort", N_CASES, N_LABELED, validation=N_VALIDATION, overwrite=True))


@pytest.fixture(scope="session")
def tiny(cohort: Path) -> Tiny:
    """The cohort and an embedding cache filled by a 1-epoch warm-up-only training."""
    root = cohort.parent
    doc = json.loads((cohort / "dataset.json").read_text(encoding="utf-8"))
    ids = {key: [c["id"] for c in doc.get(key, [])] for key in ("training", "unlabeled", "validation")}
    tiny = Tiny(root, cohort, root / "cache", ids["training"], ids["unlabeled"], ids["validation"])
    assert (len(tiny.labeled), len(tiny.unlabeled), len(tiny.validation)) == (N_LABELED, N_CASES - N_LABELED, N_VALIDATION)

    folder = root / "prefill"
    config = write_train_config(folder, cohort, tiny.cache, phases=(1, 0, 0))
    t0 = time.monotonic()
    done = run_to_end(train_cmd(config, "--progress", "json"), folder, "prefill", timeout=PREFILL_TIMEOUT, idle=PREFILL_TIMEOUT)
    tiny.prefill_seconds = time.monotonic() - t0
    records = done.check_ok()
    assert any(re.search(rf"embedded {tiny.n_slices} slices", t) for t in messages(records)), messages(records)
    assert len(list(tiny.cache.glob("*.pt"))) >= N_CASES + N_VALIDATION
    return tiny


def assert_cache_hit(records: List[Dict[str, Any]], tiny: Tiny) -> None:
    wanted = f"all {tiny.n_slices} slice embeddings found in the cache"
    assert any(wanted in t for t in messages(records)), f"expected {wanted!r} in {messages(records)}"


class Background:
    """A training started once, possibly while another runs (2 cores), awaited on demand."""

    def __init__(self, cmd: List[str], cwd: Path, name: str, env: Optional[Dict[str, str]] = None):
        self.cmd, self.cwd, self.name, self.env = cmd, cwd, name, env
        self.child: Optional[Child] = None
        self.result: Optional[Finished] = None

    def start(self) -> "Background":
        if self.child is None:
            self.child = Child(self.cmd, self.cwd, self.cwd / f"{self.name}.stderr", self.env)
        return self

    def wait(self) -> Finished:
        if self.result is None:
            self.start()
            try:
                rc = self.child.finish()
            finally:
                self.child.kill()
            self.result = Finished(rc, self.child.lines, self.child.stderr())
        return self.result

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()


@dataclass
class Reference:
    config: Path
    output: Path
    run: Background

    def wait(self) -> List[Dict[str, Any]]:
        return self.run.wait().check_ok()


@pytest.fixture(scope="session")
def reference(tiny: Tiny):
    """An uninterrupted run of the long schedule with ``--progress json`` (started lazily, so
    the kill/resume test can run it alongside its own run)."""
    folder = tiny.root / "reference"
    config = write_train_config(folder, tiny.cohort, tiny.cache, phases=LONG_PHASES)
    ref = Reference(config, folder / "run", Background(train_cmd(config, "--progress", "json"), folder, "reference"))
    yield ref
    ref.run.stop()


# ------------------------------------------------------------------------------------------
# 1. kill -9, then --resume
# ------------------------------------------------------------------------------------------


def test_kill9_then_resume_matches_an_uninterrupted_run(tiny: Tiny, reference: Reference, tmp_path: Path):
    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=LONG_PHASES)
    out = tmp_path / "run"
    total = sum(LONG_PHASES)
    reference.run.start()  # the same schedule, uninterrupted, on the other core

    child = Child(train_cmd(config, "--progress", "json"), tmp_path, tmp_path / "killed.stderr")
    try:
        start = None
        seen_epoch = None
        killed_in = None
        deadline = time.monotonic() + RUN_TIMEOUT
        while killed_in is None:
            line = child.next_line()
            if line is None:
                pytest.fail(f"the run ended before it could be killed (exit {child.proc.wait()}):\n{child.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                child._fail("no epoch to kill in time")
            rec = strict_json(line)
            if rec["type"] == "start":
                start = rec
            elif rec["type"] == "epoch" and rec["global_epoch"] >= KILL_AFTER and seen_epoch is None:
                seen_epoch = rec["global_epoch"]
            elif rec["type"] == "step" and seen_epoch is not None:
                os.kill(child.pid, signal.SIGKILL)
                killed_in = plan_offsets(start)[rec["phase"]] + rec["epoch"] + 1
        before_kill = [strict_json(ln) for ln in child.lines]
        rc = child.finish()
    finally:
        child.kill()
    assert rc == -signal.SIGKILL
    assert killed_in == seen_epoch + 1
    assert_cache_hit(before_kill, tiny)

    # what the killed run left: a loadable last.pt at the last finished epoch
    state = read_state(out / "last.pt")
    done = int(state["global_epoch"])
    assert done in (seen_epoch, seen_epoch + 1)  # +1 only if the epoch ended before the signal landed
    assert done < total
    assert plan_offsets(start)[int(state["phase"])] + int(state["epochs_done"]) == done
    before = metric_records(out / "metrics.jsonl")  # a partial last line is skipped
    assert [r["global_epoch"] for r in before] in (list(range(1, done + 1)), list(range(1, done + 2)))
    raw = (out / "metrics.jsonl").read_bytes().split(b"\n")
    for text in raw[:-1]:  # every complete line is strict JSON; only the last may be partial
        json.loads(text, parse_constant=_no_constants)

    # a new run on the same output folder is refused without touching it
    last_bytes, metrics_bytes = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()
    refused = subprocess.run(train_cmd(config, "--progress", "json"), cwd=tmp_path, env=child_env(), capture_output=True,
                             text=True, timeout=RUN_TIMEOUT)
    assert refused.returncode == 2, refused.stderr
    error_lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("semisam train: error:")]
    assert error_lines and "--resume" in error_lines[-1], refused.stderr
    assert (out / "last.pt").read_bytes() == last_bytes and (out / "metrics.jsonl").read_bytes() == metrics_bytes

    # --resume to the end
    resumed = run_to_end(train_cmd(config, "--resume", "--progress", "json"), tmp_path, "resumed")
    records = resumed.check_ok()
    assert_cache_hit(records, tiny)
    starts = [r for r in records if r["type"] == "start"]
    assert len(starts) == 1 and starts[0]["resumed"] is True
    assert any(t.startswith(f"resumed after epoch {done} ") for t in messages(records)), messages(records)
    epochs = [r["global_epoch"] for r in records if r["type"] == "epoch"]
    assert epochs == list(range(done + 1, total + 1))
    steps = [r for r in records if r["type"] == "step"]
    assert plan_offsets(starts[0])[steps[0]["phase"]] + steps[0]["epoch"] + 1 == done + 1
    assert records[-1]["type"] == "final" and records[-1]["status"] == "finished"

    after = metric_records(out / "metrics.jsonl")
    assert [r["global_epoch"] for r in after] == list(range(1, total + 1))  # one record per epoch, no duplicates
    for text in (out / "metrics.jsonl").read_bytes().splitlines():
        json.loads(text, parse_constant=_no_constants)  # the partial line is gone
    final_state = read_state(out / "last.pt")
    assert final_state["global_epoch"] == total

    from semisam.models.student import load_student

    student, extra = load_student(out / "best.pt")
    assert student.config.num_labels == 1
    assert 1 <= extra["global_epoch"] <= total
    assert extra["global_epoch"] == final_state["best"]["global_epoch"]

    # the same numbers as without the interruption (RNGs are seeded from (seed, global epoch, rank))
    ref_records = reference.wait()
    ref_state = read_state(reference.output / "last.pt")
    for part in ("student", "ema"):
        ref_part = ref_state[part] if part == "student" else ref_state[part].get("model", ref_state[part])
        got_part = final_state[part] if part == "student" else final_state[part].get("model", final_state[part])
        for key, value in ref_part.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.allclose(got_part[key], value, rtol=1e-6, atol=1e-8), f"{part}.{key} differs after kill + resume"
    ref_epochs = {r["global_epoch"]: r for r in ref_records if r["type"] == "epoch"}
    for r in (r for r in records if r["type"] == "epoch"):
        for key in ("losses", "lambda", "beta", "lr", "val_dice"):
            assert r.get(key) == ref_epochs[r["global_epoch"]].get(key), (r["global_epoch"], key)


def test_resume_trains_on_the_same_pseudo_labels_as_an_uninterrupted_run(tmp_path: Path):
    """What Trainer._load_stored_pseudo() gives a resumed run equals what _refresh_pseudo() kept."""
    import numpy as np

    from semisam.pseudo_labels import PseudoLabel, PseudoLabelStore

    rng = np.random.default_rng(0)
    mean = rng.random((8, 32, 32))  # the labeler's float64 statistics of the teachers' predictions
    variance = rng.random((8, 32, 32)) * 0.2
    # Trainer._refresh_pseudo keeps the labeler's result in its stored form (as_stored)
    in_memory = PseudoLabel.from_statistics(mean, variance, 0.1, 4, int((mean > 0.5).sum())).as_stored()
    PseudoLabelStore(tmp_path).put("case_003:1", in_memory, 0)  # what rank 0 writes while training
    after_resume, epoch = PseudoLabelStore(tmp_path).get("case_003:1")  # a new process reads it back
    assert epoch == 0
    assert np.array_equal(after_resume.confidence, in_memory.confidence)
    assert np.array_equal(after_resume.probability, in_memory.probability)
    assert np.array_equal(after_resume.variance, in_memory.variance)


# ------------------------------------------------------------------------------------------
# 2. the --progress json contract
# ------------------------------------------------------------------------------------------


def test_json_progress_contract(tiny: Tiny, reference: Reference):
    records = reference.wait()  # strict JSON, known types (checked line by line)
    assert_cache_hit(records, tiny)
    types = [r["type"] for r in records]
    assert types.count("start") == 1 and types.count("final") == 1 and types[-1] == "final"
    start = records[types.index("start")]
    assert start["resumed"] is False
    total = sum(LONG_PHASES)
    assert start["total_epochs"] == total
    assert [(p["name"], p["epochs"]) for p in start["plan"]] == list(zip(("warmup", "semi", "finetune"), LONG_PHASES))
    offsets = plan_offsets(start)
    steps_per = {int(p["phase"]): int(p["steps_per_epoch"]) for p in start["plan"]}
    assert all(types.index("start") < i for i, t in enumerate(types) if t in ("step", "epoch", "phase_start", "phase_end"))

    position = (0, -1, -1)  # (global epoch, 0 step | 1 epoch line, step)
    progress = 0.0
    epochs_seen: List[int] = []
    steps_in: Dict[int, List[int]] = {}
    open_phase = None
    for r in records[types.index("start"):]:
        assert r.get("elapsed_s") is None or r["elapsed_s"] >= 0
        if r["type"] == "phase_start":
            assert open_phase is None
            open_phase = r["phase"]
        elif r["type"] == "phase_end":
            assert r["phase"] == open_phase
            open_phase = None
        elif r["type"] == "step":
            assert r["phase"] == open_phase
            ge = offsets[r["phase"]] + r["epoch"] + 1
            here = (ge, 0, r["step"])
            assert here > position, f"step line out of order: {r}"
            position = here
            assert 0 <= r["step"] < r["steps"] == steps_per[r["phase"]]
            assert isinstance(r["losses"], dict) and isinstance(r["losses"].get("total"), float)
            assert r["progress"] is not None and progress <= r["progress"] <= 1.0
            progress = r["progress"]
            steps_in.setdefault(ge, []).append(r["step"])
        elif r["type"] == "epoch":
            assert r["phase"] == open_phase
            ge = r["global_epoch"]
            assert ge == offsets[r["phase"]] + r["epoch"] + 1
            assert (ge, 1, 0) > position
            position = (ge, 1, 0)
            epochs_seen.append(ge)
            assert "val_dice" in r, r
            assert isinstance(r["val_dice"], float) and 0.0 <= r["val_dice"] <= 1.0
            assert isinstance(r["losses"], dict) and isinstance(r["losses"]["total"], float)
            assert steps_in.get(ge) and steps_in[ge][0] == 0 and steps_in[ge][-1] == steps_per[r["phase"]] - 1
    assert open_phase is None
    assert epochs_seen == list(range(1, total + 1))
    assert progress == pytest.approx(1.0)
    final = records[-1]
    assert final["status"] == "finished"
    assert Path(final["best_checkpoint"]) == reference.output / "best.pt" and Path(final["best_checkpoint"]).is_file()
    assert final["epochs"] == total
    # the metrics log holds the same epoch records
    logged = metric_records(reference.output / "metrics.jsonl")
    assert [r["global_epoch"] for r in logged] == epochs_seen


# ------------------------------------------------------------------------------------------
# 3. bad configurations
# ------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    # name: (change to the tiny config, the key the error line must name)
    "unknown_key": ({"phases": {"warmup": {"epochz": 1}}}, "phases.warmup.epochz"),
    "wrong_type": ({"phases": {"warmup": {"epochs": "three"}}}, "phases.warmup.epochs"),
    "missing_dataset": ({"dataset": "no_such_dataset"}, "no_such_dataset"),
}


# config errors are refused before any progress output, so json mode matters only after set-up began
BAD_RUNS = [(name, "default") for name in BAD_CONFIGS] + [("missing_dataset", "json")]


@pytest.fixture(scope="module")
def bad_runs(cohort: Path, tmp_path_factory):
    """Each bad config run through the CLI, all at once."""
    root = tmp_path_factory.mktemp("bad_configs")
    children = {}
    for name, mode in BAD_RUNS:
        folder = root / f"{name}-{mode}"
        config = write_train_config(folder, cohort, cohort.parent / "cache", output="out")
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        for key, value in BAD_CONFIGS[name][0].items():
            if isinstance(value, dict):
                for sub, val in value.items():
                    data[key][sub].update(val)
            else:
                data[key] = value
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        args = () if mode == "default" else ("--progress", "json")
        children[name, mode] = (folder, Child(train_cmd(config, *args), folder, folder / "stderr.txt"))
    results = {}
    for key, (folder, child) in children.items():
        try:
            rc = child.finish(timeout=120, idle=120)
        finally:
            child.kill()
        results[key] = (folder, Finished(rc, child.lines, child.stderr()))
    return results


@pytest.mark.parametrize("name, mode", BAD_RUNS)
def test_bad_config_exits_2_with_one_error_line(bad_runs, name: str, mode: str):
    folder, done = bad_runs[name, mode]
    key = BAD_CONFIGS[name][1]
    assert done.rc == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines and lines[-1].startswith("semisam train: error:"), done.stderr
    assert key in lines[-1], lines[-1]
    assert "Traceback" not in done.stderr
    if mode == "json":  # stdout stays strict JSON; a failure after set-up began ends with a final line
        records = done.records()
        assert [(r["type"], r["status"]) for r in records] == [("final", "failed")], records
    if name != "missing_dataset":
        assert len(lines) == 1, done.stderr
        assert not (folder / "out").exists()


def test_missing_dataset_names_the_key_and_writes_nothing(bad_runs):
    folder, done = bad_runs["missing_dataset", "default"]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("semisam train: error:") and "dataset: " in lines[0], done.stderr
    assert not (folder / "out").exists()


# ------------------------------------------------------------------------------------------
# 4. init-config -> load_config with --set
# ------------------------------------------------------------------------------------------


def test_init_config_is_accepted_by_load_config_with_overrides(cohort: Path, tmp_path: Path, capsys):
    from semisam.cli import _overrides, main
    from semisam.config import ConfigError, TrainConfig, load_config

    path = tmp_path / "X.yaml"
    assert main(["init-config", str(path)]) == 0
    assert main(["init-config", str(path)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err

    with pytest.raises(ConfigError, match=r"dataset: is required"):
        load_config(path)
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^dataset: ''", text, re.M), text[:500]
    path.write_text(re.sub(r"^dataset: ''", f"dataset: {cohort}", text, count=1, flags=re.M), encoding="utf-8")

    cfg = load_config(path)
    defaults = TrainConfig().to_dict()
    got = cfg.to_dict()
    assert got["dataset"] == str(cohort)
    assert got["output"] == str(tmp_path / defaults["output"])  # relative to the YAML's folder
    for key in defaults:
        if key not in ("dataset", "output"):
            assert got[key] == defaults[key], key

    sets = ["phases.warmup.epochs=1", "phases.semi.lr=0.0002", "student.channels=[16, 8]", "data.cache_dir=cache"]
    cfg = load_config(path, _overrides(sets))
    assert cfg.phases.warmup.epochs == 1 and cfg.phases.semi.lr == 2e-4
    assert tuple(cfg.student.channels) == (16, 8)
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.phases.semi.epochs == defaults["phases"]["semi"]["epochs"]
    with pytest.raises(ConfigError, match=r"phases\.warmup\.epochz: unknown setting"):
        load_config(path, _overrides(["phases.warmup.epochz=1"]))
    with pytest.raises(ConfigError, match=r"phases\.warmup\.epochs: must be a whole number"):
        load_config(path, _overrides(["phases.warmup.epochs=one"]))
    with pytest.raises(ConfigError, match=r"augment\.inplane_crop: must be an integer >= 0"):
        load_config(path, _overrides(["augment.inplane_crop=-8"]))


def test_scientific_notation_is_a_number(cohort: Path, tmp_path: Path):
    from semisam.cli import _overrides
    from semisam.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(f"dataset: {cohort}\noptim: {{weight_decay: 1e-4}}\n", encoding="utf-8")
    cfg = load_config(path, _overrides(["phases.semi.lr=2e-4"]))
    assert cfg.optim.weight_decay == 1e-4 and cfg.phases.semi.lr == 2e-4


# ------------------------------------------------------------------------------------------
# 5. torchrun, 2 CPU processes (last: a hang here costs the idle timeout)
# ------------------------------------------------------------------------------------------


def test_torchrun_two_cpu_processes(tiny: Tiny, tmp_path: Path):
    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=TINY_PHASES)
    dump = tmp_path / "dump"
    done = run_to_end(torchrun_cmd(config, "--progress", "json"), tmp_path, "torchrun",
                      env=child_env(SEMISAM_DEBUG_DUMP=str(dump)), group=True, idle=60.0)
    records = done.check_ok()  # every stdout line is strict JSON: nothing but rank 0's stream
    assert_cache_hit(records, tiny)
    assert [r["type"] for r in records].count("start") == 1
    assert [r["type"] for r in records].count("final") == 1 and records[-1]["type"] == "final"
    assert records[-1]["status"] == "finished"
    start = next(r for r in records if r["type"] == "start")
    assert start["world_size"] == 2
    total = sum(TINY_PHASES)
    assert [r["global_epoch"] for r in records if r["type"] == "epoch"] == list(range(1, total + 1))

    paths = [dump / f"rank{r}.pt" for r in (0, 1)]
    if not all(p.exists() for p in paths):
        pytest.fail(f"SEMISAM_DEBUG_DUMP={dump}: training wrote no rank0.pt/rank1.pt (found {sorted(p.name for p in dump.glob('*'))})")
    ranks = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]

    # identical weights on both ranks, bitwise
    for part in ("student", "ema"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for key in ranks[0][part]:
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), f"{part}.{key} differs between ranks"
    last = read_state(tmp_path / "run" / "last.pt")
    for key, value in ranks[0]["student"].items():
        assert torch.equal(last["student"][key], value)

    # different data per rank; together every labeled case each epoch; never a validation case
    seen = [{} for _ in ranks]
    for r, dumpd in enumerate(ranks):
        for epoch, cases in dumpd["seen"]:
            seen[r].setdefault(int(epoch), []).append(list(cases))
    assert set(seen[0]) == set(seen[1]) == set(range(1, total + 1))
    assert any(seen[0][e] != seen[1][e] for e in seen[0]), "both ranks trained on the same batches"
    warmup = TINY_PHASES[0]
    for e in range(1, total + 1):
        together = {c for r in (0, 1) for batch in seen[r][e] for c in batch}
        assert set(tiny.labeled) <= together, (e, together)
        assert not together & set(tiny.validation)
        if e <= warmup:
            assert not together & set(tiny.unlabeled), f"unlabeled cases in warm-up epoch {e}"


def test_gradient_accumulation_counts_optimizer_steps(tiny: Tiny, tmp_path: Path):
    """optim.grad_accumulation=2: one optimizer step (and one EMA update) per two micro-batches."""
    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=(2, 0, 1), optim={"grad_accumulation": 2})
    done = run_to_end(train_cmd(config, "--progress", "json"), tmp_path, "accumulate")
    records = done.check_ok()
    start = next(r for r in records if r["type"] == "start")
    steps = {p["name"]: p["steps_per_epoch"] for p in start["plan"]}
    state = read_state(tmp_path / "run" / "last.pt")
    assert state["phase"] == 2 and state["opt_steps"] == 1 * -(-steps["finetune"] // 2)  # ceil: the last, odd micro-batch steps too
    assert state["ema"]["updates"] == 2 * -(-steps["warmup"] // 2) + state["opt_steps"]


def test_image_branch_student_trains_in_every_phase_and_segments(tiny: Tiny, tmp_path: Path):
    """student.image_channels > 0: every phase feeds the decoder the (flipped, cropped) image
    blocks with the embeddings; the checkpoint segments a volume (with TTA and uncertainty)."""
    from semisam.inference import Segmenter
    from semisam.volume import read_volume

    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=TINY_PHASES, student={"image_channels": 4})
    done = run_to_end(train_cmd(config, "--progress", "json"), tmp_path, "image_branch")
    records = done.check_ok()
    assert_cache_hit(records, tiny)
    final = [r for r in records if r["type"] == "final"][-1]
    assert final["status"] == "finished"
    epochs = [r for r in records if r["type"] == "epoch"]
    assert {r["phase"] for r in epochs} == {0, 1, 2} and all(math.isfinite(r["losses"]["total"]) for r in epochs)
    segmenter = Segmenter(tmp_path / "run" / "best.pt")
    assert segmenter.student.uses_image and segmenter.student.config.image_channels == 4
    volume = read_volume(next((tiny.cohort / "imagesVal").glob("*.nii.gz")), "image")
    seg = segmenter.segment(volume, uncertainty=True, tta=True)
    assert seg.label.shape == volume.shape and seg.uncertainty is not None
    assert np.isfinite(seg.probability.array).all() and float(seg.uncertainty.array.max()) >= 0.0


def test_inplane_crop_trains_on_crops_and_segments_whole_slices(tiny: Tiny, tmp_path: Path, monkeypatch):
    """augment.inplane_crop: every training step decodes a random in-plane crop of the
    embeddings (40 of 64 tokens -> 20 of 32 pixels on this grid) with targets cropped to
    match; validation and segmentation still decode whole slices."""
    from semisam.config import load_config
    from semisam.inference import Segmenter
    from semisam.models.student import SlicingSAM3D
    from semisam.training import Trainer
    from semisam.volume import read_volume

    calls: List[tuple] = []
    forward = SlicingSAM3D.forward

    def spy(self, embeddings, out_size=None, image=None):
        calls.append((torch.is_grad_enabled(), tuple(embeddings.shape[-2:]), tuple(out_size) if out_size is not None else None))
        return forward(self, embeddings, out_size, image)

    monkeypatch.setattr(SlicingSAM3D, "forward", spy)
    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=(1, 1, 1), augment={"inplane_crop": 40})
    summary = Trainer(load_config(config), progress="none").run()
    training = {(g, o) for grad, g, o in calls if grad}
    assert training == {((40, 40), (20, 20))}, training
    assert ((64, 64), (32, 32)) in {(g, o) for grad, g, o in calls if not grad}  # validation: whole slices
    segmenter = Segmenter(Path(summary["best_checkpoint"]))
    volume = read_volume(next((tiny.cohort / "imagesVal").glob("*.nii.gz")), "image")
    seg = segmenter.segment(volume)
    assert seg.label.shape == volume.shape and np.isfinite(seg.probability.array).all()


def test_calibrated_threshold_is_chosen_on_validation_and_used_to_segment(tiny: Tiny, tmp_path: Path):
    """validation.calibrate_threshold: best.pt records the threshold that scores best on the
    validation cases' probabilities of those very weights; the Segmenter cuts there."""
    from semisam.config import load_config
    from semisam.data import load_dataset
    from semisam.inference import Segmenter, keep_largest_component
    from semisam.models.encoders import EmbeddingCache
    from semisam.preprocess import apply_to_label, preprocess
    from semisam.training import THRESHOLDS, Trainer, calibrate_threshold
    from semisam.volume import read_volume

    config = write_train_config(tmp_path, tiny.cohort, tiny.cache, phases=(2, 0, 0),
                                validation={"calibrate_threshold": True, "largest_component": True})
    summary = Trainer(load_config(config), progress="none").run()
    segmenter = Segmenter(Path(summary["best_checkpoint"]), cache=EmbeddingCache(tiny.cache), backend="torch")  # the run's (torch) embeddings
    post = segmenter.extra["postprocess"]
    assert post["threshold"] in THRESHOLDS and segmenter.threshold == post["threshold"]
    # recompute the choice from the saved weights on the validation cases
    cases = []
    validation = load_dataset(tiny.cohort).validation
    assert validation, "the tiny cohort has validation cases"
    for case in validation:
        image = read_volume(case.image, "image")
        pre, record = preprocess(image, segmenter.preprocess_config)
        emb = segmenter.cache.embed(pre.array, segmenter.encoder).float().permute(1, 0, 2, 3)
        prob = segmenter.student.infer(emb, pre.shape[1:])[0].numpy()
        cases.append((prob, apply_to_label(record, read_volume(case.label, "label")).array))
    th, dice = calibrate_threshold(cases, largest_component=True)
    assert th == post["threshold"] and dice == pytest.approx(post["val_dice_at_threshold"], abs=1e-4)
    seg = segmenter.segment(image)
    expected = keep_largest_component((seg.probability.array > th).astype(np.uint8))
    assert np.array_equal(seg.label.array, expected)
