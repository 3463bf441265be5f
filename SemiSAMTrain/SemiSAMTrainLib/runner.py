"""Training as a child process, watched from Slicer without Qt (tested with pytest).

:class:`TrainingRun` starts ``python -m semisam.cli train --config CFG --progress json``
(``--resume`` to continue), reads the child's stdout on a thread, turns every line into a
typed event and keeps the run's state and progress. The GUI polls it from a ``QTimer``:
nothing here touches Qt, and nothing blocks the caller.

State machine (only these transitions happen; anything else raises :class:`IllegalTransition`)::

    idle ──start──> running ──stop()──> stopping ──> stopped | finished | failed
      │                 └──────────────────────────> finished | failed | stopped
      └─(cannot spawn)─> failed
    finished | failed | stopped ──start(resume=...)──> running

The outcome comes from the child's ``final`` line *and* its exit status:

* ``final`` "finished" and exit status 0 → ``finished``;
* Stop was requested → ``stopped`` (``finished`` if the child got to the end first);
* ``final`` "stopped" (someone else interrupted it) → ``stopped``;
* anything else → ``failed``, with the ``final`` line's error as the reason, else the tail of
  stderr (a crash without a final line), else the exit status.

Stop sends SIGINT to the child's process group (the child runs in a session of its own). The
trainer turns it into ``KeyboardInterrupt``: it writes a ``final`` "stopped" line and exits;
``last.pt`` holds the last finished epoch (written atomically after every epoch), so a later
``start(resume=True)`` continues after it and ``metrics.jsonl`` drops the unfinished epoch's
record. A child that has not exited ``stop_timeout`` seconds after SIGINT gets SIGTERM, and
``kill_timeout`` seconds later SIGKILL; either way the resume point is the same. On Windows
the child gets CTRL_BREAK_EVENT (Python's default for it is to exit at once), then a kill.

Lines that are not JSON objects (a library printing to stdout) become :class:`LogEvent` s;
JSON objects of unknown types become :class:`OtherEvent` s; neither disturbs the progress.
stderr lines become log events too, and the last of them explain a crash.
"""

from __future__ import annotations

import enum
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Environment variables of a torchrun parent that must not leak into a single-process child.
_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
#: stderr lines kept for the failure reason and the log.
STDERR_TAIL = 60


# ------------------------------------------------------------------------------------------
# States
# ------------------------------------------------------------------------------------------


class RunState(str, enum.Enum):
    """Where a :class:`TrainingRun` is. ``str`` so that ``state == "running"`` works."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        """The child is gone (finished, failed or stopped)."""
        return self in (RunState.FINISHED, RunState.FAILED, RunState.STOPPED)

    @property
    def active(self) -> bool:
        """A child process is (still) running."""
        return self in (RunState.RUNNING, RunState.STOPPING)


TRANSITIONS: Dict[RunState, Tuple[RunState, ...]] = {
    RunState.IDLE: (RunState.RUNNING, RunState.FAILED),
    RunState.RUNNING: (RunState.STOPPING, RunState.FINISHED, RunState.FAILED, RunState.STOPPED),
    RunState.STOPPING: (RunState.STOPPED, RunState.FINISHED, RunState.FAILED),
    RunState.FINISHED: (RunState.RUNNING,),
    RunState.FAILED: (RunState.RUNNING,),
    RunState.STOPPED: (RunState.RUNNING,),
}


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow (e.g. Stop when nothing runs)."""


# ------------------------------------------------------------------------------------------
# Events (one per stdout line, plus log lines and state changes)
# ------------------------------------------------------------------------------------------


@dataclass
class Event:
    """Base of every event. ``raw`` is the JSON object as read (empty for non-JSON events)."""

    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    elapsed_s: Optional[float] = None
    type = "event"


@dataclass
class StartEvent(Event):
    """The run's plan: ``plan`` is a list of ``{"phase", "name", "epochs", "steps_per_epoch"}``."""

    plan: List[Dict[str, Any]] = field(default_factory=list)
    total_epochs: Optional[int] = None
    total_steps: Optional[int] = None
    output: Optional[str] = None
    resumed: bool = False
    device: Optional[str] = None
    type = "start"


@dataclass
class PhaseStartEvent(Event):
    phase: Optional[int] = None
    phase_name: str = ""
    epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    start_epoch: int = 0
    type = "phase_start"


@dataclass
class StepEvent(Event):
    """One optimisation step (``epoch`` 0-based in the phase, ``step`` 0-based in the epoch)."""

    phase: Optional[int] = None
    phase_name: str = ""
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    step: Optional[int] = None
    steps: Optional[int] = None
    losses: Dict[str, Optional[float]] = field(default_factory=dict)
    lam: Optional[float] = None
    beta: Optional[float] = None
    lr: Optional[float] = None
    progress: Optional[float] = None
    eta_s: Optional[float] = None
    type = "step"


@dataclass
class EpochEvent(Event):
    """A finished (and possibly validated) epoch: the record that also goes to ``metrics.jsonl``."""

    phase: Optional[int] = None
    phase_name: str = ""
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    global_epoch: Optional[int] = None
    losses: Dict[str, Optional[float]] = field(default_factory=dict)
    lam: Optional[float] = None
    beta: Optional[float] = None
    lr: Optional[float] = None
    val_dice: Optional[float] = None
    val_hd95: Optional[float] = None
    eta_s: Optional[float] = None
    type = "epoch"


@dataclass
class PhaseEndEvent(Event):
    phase: Optional[int] = None
    phase_name: str = ""
    type = "phase_end"


@dataclass
class MessageEvent(Event):
    level: str = "info"
    text: str = ""
    type = "message"


@dataclass
class FinalEvent(Event):
    """The child's own account of the outcome (the exit status decides together with it)."""

    status: str = ""
    error: Optional[str] = None
    error_type: Optional[str] = None
    best_checkpoint: Optional[str] = None
    best_val_dice: Optional[float] = None
    output: Optional[str] = None
    type = "final"


@dataclass
class LogEvent(Event):
    """A line for the log pane: stdout that is not a JSON object, stderr, or the runner's own."""

    stream: str = "stdout"  # stdout | stderr | runner
    text: str = ""
    level: str = "info"
    type = "log"


@dataclass
class OtherEvent(Event):
    """A JSON object of a type this reader does not know (readers must ignore those)."""

    type = "other"


@dataclass
class StateEvent(Event):
    """The run changed state; ``reason`` says why (for failed and stopped runs)."""

    state: RunState = RunState.IDLE
    previous: RunState = RunState.IDLE
    reason: str = ""
    returncode: Optional[int] = None
    type = "state"


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _float(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _losses(value: Any) -> Dict[str, Optional[float]]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): _float(v) for k, v in value.items()}


def _parse_constant(name: str) -> None:
    return None  # NaN / Infinity from a non-strict writer read as null


def parse_line(line: str) -> Event:
    """One stdout line as an event; never raises.

    JSON objects with a known ``type`` become typed events (fields of the wrong type become
    ``None``); other JSON objects :class:`OtherEvent`; anything else a :class:`LogEvent`.
    """
    text = line.rstrip("\r\n")
    try:
        obj = json.loads(text, parse_constant=_parse_constant)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return LogEvent(stream="stdout", text=text)
    try:
        return _typed(obj)
    except Exception as exc:  # noqa: BLE001 - a reader must survive any line
        return LogEvent(stream="stdout", text=text, level="warning", raw={"parse_error": str(exc)})


def _typed(o: Dict[str, Any]) -> Event:
    kind = o["type"]
    common = {"raw": o, "elapsed_s": _float(o.get("elapsed_s"))}
    if kind == "start":
        plan = [p for p in o.get("plan") or [] if isinstance(p, Mapping)] if isinstance(o.get("plan"), list) else []
        return StartEvent(plan=[dict(p) for p in plan], total_epochs=_int(o.get("total_epochs")), total_steps=_int(o.get("total_steps")),
                          output=o.get("output") if isinstance(o.get("output"), str) else None, resumed=o.get("resumed") is True,
                          device=o.get("device") if isinstance(o.get("device"), str) else None, **common)
    if kind == "phase_start":
        return PhaseStartEvent(phase=_int(o.get("phase")), phase_name=_str(o.get("phase_name")), epochs=_int(o.get("epochs")),
                               steps_per_epoch=_int(o.get("steps_per_epoch")), start_epoch=_int(o.get("start_epoch")) or 0, **common)
    if kind == "step":
        return StepEvent(phase=_int(o.get("phase")), phase_name=_str(o.get("phase_name")), epoch=_int(o.get("epoch")), epochs=_int(o.get("epochs")),
                         step=_int(o.get("step")), steps=_int(o.get("steps")), losses=_losses(o.get("losses")), lam=_float(o.get("lambda")),
                         beta=_float(o.get("beta")), lr=_float(o.get("lr")), progress=_float(o.get("progress")), eta_s=_float(o.get("eta_s")), **common)
    if kind == "epoch":
        return EpochEvent(phase=_int(o.get("phase")), phase_name=_str(o.get("phase_name")), epoch=_int(o.get("epoch")), epochs=_int(o.get("epochs")),
                          global_epoch=_int(o.get("global_epoch")), losses=_losses(o.get("losses")), lam=_float(o.get("lambda")),
                          beta=_float(o.get("beta")), lr=_float(o.get("lr")), val_dice=_float(o.get("val_dice")),
                          val_hd95=_float(o.get("val_hd95")), eta_s=_float(o.get("eta_s")), **common)
    if kind == "phase_end":
        return PhaseEndEvent(phase=_int(o.get("phase")), phase_name=_str(o.get("phase_name")), **common)
    if kind == "message":
        return MessageEvent(level=_str(o.get("level"), "info"), text=_str(o.get("text"), str(o.get("text", ""))), **common)
    if kind == "final":
        def opt(key: str) -> Optional[str]:
            return o[key] if isinstance(o.get(key), str) else None

        return FinalEvent(status=_str(o.get("status")), error=opt("error"), error_type=opt("error_type"),
                          best_checkpoint=opt("best_checkpoint"), best_val_dice=_float(o.get("best_val_dice")), output=opt("output"), **common)
    return OtherEvent(**common)


# ------------------------------------------------------------------------------------------
# Progress (what the GUI shows)
# ------------------------------------------------------------------------------------------


@dataclass
class PhaseProgress:
    """One phase of the plan and how far it got."""

    phase: int
    name: str
    epochs: int
    steps_per_epoch: int
    epochs_done: int = 0  # finished epochs of this phase
    step: int = 0  # steps done in the epoch after them
    state: str = "pending"  # pending | running | done | skipped (0 epochs)

    @property
    def fraction(self) -> float:
        """0..1 of this phase's steps (1 once it is done or skipped)."""
        if self.state in ("done", "skipped"):
            return 1.0
        if self.epochs <= 0 or self.steps_per_epoch <= 0:
            return 0.0
        done = self.epochs_done * self.steps_per_epoch + (self.step if self.state == "running" else 0)
        return min(max(done / (self.epochs * self.steps_per_epoch), 0.0), 1.0)

    @property
    def epoch_text(self) -> str:
        """"epoch 3/50" (the epoch running now, 1-based), "done" or "pending"."""
        if self.state != "running":
            return self.state
        current = min(self.epochs_done + (1 if self.step > 0 else 0), self.epochs) or 1
        return f"epoch {current}/{self.epochs}"


@dataclass
class Metrics:
    """The latest numbers (from the last step line, validation from the last epoch line)."""

    phase: Optional[int] = None
    epoch: Optional[int] = None
    global_epoch: Optional[int] = None
    losses: Dict[str, Optional[float]] = field(default_factory=dict)
    lam: Optional[float] = None
    beta: Optional[float] = None
    lr: Optional[float] = None
    val_dice: Optional[float] = None
    val_hd95: Optional[float] = None


class RunProgress:
    """Progress per phase, latest metrics, the epoch history (for the chart) and the ETA.

    Fed by :meth:`apply` with every event of one child; a resumed child's ``start`` line
    replaces the plan, and its history is read back from the run folder's ``metrics.jsonl``
    (already cut back to the last finished epoch by the child), so the chart continues.
    """

    def __init__(self) -> None:
        self.phases: Dict[int, PhaseProgress] = {}
        self.current_phase: Optional[int] = None
        self.fraction: Optional[float] = None
        self.eta_s: Optional[float] = None
        self.elapsed_s: Optional[float] = None
        self.latest = Metrics()
        self.history: List[Dict[str, Any]] = []  # epoch records, in order, one per global epoch
        self.best_val_dice: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.output: Optional[str] = None
        self.resumed = False
        self.total_epochs: Optional[int] = None

    @property
    def last_phase(self) -> Optional[int]:
        """The last phase of the plan that has epochs (``None`` before the plan is known)."""
        phases = [p.phase for p in self.phases.values() if p.epochs > 0]
        return phases[-1] if phases else None

    @property
    def global_epoch(self) -> int:
        """Epochs finished over all phases."""
        return sum(p.epochs_done for p in self.phases.values())

    def apply(self, event: Event) -> None:
        """Update from one event (events of other types are ignored)."""
        if event.elapsed_s is not None:
            self.elapsed_s = event.elapsed_s
        if isinstance(event, StartEvent):
            self._start(event)
        elif isinstance(event, PhaseStartEvent) and event.phase is not None:
            self._phase_start(event)
        elif isinstance(event, StepEvent) and event.phase is not None:
            self._step(event)
        elif isinstance(event, EpochEvent) and event.phase is not None:
            self._epoch(event)
        elif isinstance(event, PhaseEndEvent) and event.phase is not None:
            p = self.phases.get(event.phase)
            if p is not None:
                p.state, p.epochs_done, p.step = "done", p.epochs, 0
        elif isinstance(event, FinalEvent):
            if event.status == "finished":
                self.fraction, self.eta_s = 1.0, 0.0
            else:
                self.eta_s = None

    def _start(self, e: StartEvent) -> None:
        self.phases = {}
        for entry in e.plan:
            phase = _int(entry.get("phase"))
            if phase is None:
                continue
            epochs = _int(entry.get("epochs")) or 0
            self.phases[phase] = PhaseProgress(phase, _str(entry.get("name"), f"phase{phase}"), epochs, _int(entry.get("steps_per_epoch")) or 0,
                                               state="pending" if epochs > 0 else "skipped")
        self.total_epochs = e.total_epochs
        self.output = e.output or self.output
        self.resumed = e.resumed
        self.current_phase, self.fraction, self.eta_s = None, 0.0, None
        self.history = []
        self.best_val_dice = self.best_epoch = None
        if e.resumed and e.output:
            from semisam.progress import read_metrics

            for record in read_metrics(Path(e.output) / "metrics.jsonl"):
                self._remember(record)

    def _phase_start(self, e: PhaseStartEvent) -> None:
        p = self.phases.get(e.phase)
        if p is None:
            p = self.phases[e.phase] = PhaseProgress(e.phase, e.phase_name or f"phase{e.phase}", e.epochs or 0, e.steps_per_epoch or 0)
        for other in self.phases.values():  # phases before it are done (skipped on resume, or finished)
            if other.phase == e.phase:
                break
            if other.state != "skipped":
                other.state, other.epochs_done = "done", other.epochs
        p.state, p.epochs_done, p.step = "running", min(e.start_epoch, p.epochs), 0
        self.current_phase = e.phase
        self._update_fraction()

    def _step(self, e: StepEvent) -> None:
        p = self.phases.get(e.phase)
        if p is None or p.state == "pending":
            self._phase_start(PhaseStartEvent(phase=e.phase, phase_name=e.phase_name, epochs=e.epochs, steps_per_epoch=e.steps,
                                              start_epoch=e.epoch or 0))
            p = self.phases[e.phase]
        if e.epoch is not None:
            p.epochs_done = min(e.epoch, p.epochs)
        if e.step is not None:
            p.step = e.step + 1
        self.latest.phase, self.latest.epoch = e.phase, e.epoch
        self.latest.losses, self.latest.lam, self.latest.beta, self.latest.lr = dict(e.losses), e.lam, e.beta, e.lr
        self.eta_s = e.eta_s
        if e.progress is not None:
            self.fraction = e.progress
        else:
            self._update_fraction()

    def _epoch(self, e: EpochEvent) -> None:
        p = self.phases.get(e.phase)
        if p is not None and e.epoch is not None:
            p.epochs_done, p.step = min(e.epoch + 1, p.epochs), 0
        self.latest.phase, self.latest.epoch, self.latest.global_epoch = e.phase, e.epoch, e.global_epoch
        self.latest.losses, self.latest.lam, self.latest.beta, self.latest.lr = dict(e.losses), e.lam, e.beta, e.lr
        if "val_dice" in e.raw:
            self.latest.val_dice, self.latest.val_hd95 = e.val_dice, e.val_hd95
        self.eta_s = e.eta_s
        self._remember(e.raw)
        self._update_fraction()

    def _remember(self, record: Mapping[str, Any]) -> None:
        ge = _int(record.get("global_epoch"))
        if ge is None:
            return
        self.history = [r for r in self.history if _int(r.get("global_epoch")) != ge]  # a replayed epoch replaces the old record
        self.history.append(dict(record))
        self.history.sort(key=lambda r: _int(r.get("global_epoch")) or 0)
        dice = _float(record.get("val_dice"))
        if dice is not None and (self.best_val_dice is None or dice > self.best_val_dice):
            self.best_val_dice, self.best_epoch = dice, ge

    def _update_fraction(self) -> None:
        total = sum(p.epochs * p.steps_per_epoch for p in self.phases.values())
        if total <= 0:
            return
        done = 0.0
        for p in self.phases.values():
            done += p.fraction * p.epochs * p.steps_per_epoch
        self.fraction = min(max(done / total, 0.0), 1.0)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def default_python() -> str:
    """The Python to run training with: this interpreter, or Slicer's ``PythonSlicer``.

    Inside Slicer ``sys.executable`` is the Slicer application itself, not a Python that can
    run ``-m``; Slicer puts ``PythonSlicer`` (its Python, with Slicer's environment) on PATH.
    """
    exe = sys.executable or ""
    if Path(exe).name.lower().startswith("python"):
        return exe
    for candidate in (Path(exe).with_name("PythonSlicer"), Path(exe).with_name("PythonSlicer.exe")):
        if exe and candidate.is_file():
            return str(candidate)
    found = shutil.which("PythonSlicer")
    if found:
        return found
    return exe or "python"


def semisam_path() -> Optional[str]:
    """The folder that holds the ``semisam`` package this process imports (None if it cannot)."""
    try:
        import semisam
    except ImportError:
        return None
    return str(Path(semisam.__file__).resolve().parents[1])


def has_checkpoint(output: PathLike) -> bool:
    """Whether ``output`` holds a run that can be resumed (``last.pt``)."""
    return (Path(output) / "last.pt").is_file()


@dataclass
class _Exited:
    returncode: int


def _describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class TrainingRun:
    """One training, run as a child process and watched without blocking.

    Args:
        config: the training YAML (``semisam init-config`` / :func:`SemiSAMTrainLib.settings.write_training_config`).
        python: the interpreter (default :func:`default_python`).
        command: the full command to run instead of ``python -m semisam.cli train ...`` (tests
            use fake children; ``--resume`` is appended when resuming).
        cwd: the child's working folder (default: the config's folder).
        env: extra environment variables for the child.
        stop_timeout: seconds between SIGINT and SIGTERM on :meth:`stop`.
        kill_timeout: seconds between SIGTERM and SIGKILL.

    Use: ``start()``; then ``poll()`` regularly (returns the new events and updates
    :attr:`state`, :attr:`progress`); ``stop()``; ``start(resume=True)`` to continue;
    :meth:`wait` blocks until the child is gone (scripts and tests).
    """

    def __init__(self, config: PathLike, python: Optional[str] = None, command: Optional[Sequence[str]] = None,
                 cwd: Optional[PathLike] = None, env: Optional[Mapping[str, str]] = None,
                 stop_timeout: float = 30.0, kill_timeout: float = 10.0):
        self.config = Path(config)
        self.python = python or default_python()
        self._command = list(command) if command is not None else None
        self.cwd = Path(cwd) if cwd is not None else self.config.resolve().parent
        self.extra_env = dict(env or {})
        self.stop_timeout = float(stop_timeout)
        self.kill_timeout = float(kill_timeout)
        self._state = RunState.IDLE
        self._lock = threading.RLock()
        self._queue: "queue.Queue[Union[Event, _Exited]]" = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._stderr_tail: Deque[str] = deque(maxlen=STDERR_TAIL)
        self._tail_lock = threading.Lock()
        self._stop_requested = False
        self._pending_state: List[StateEvent] = []
        self.progress = RunProgress()
        self.final: Optional[FinalEvent] = None
        self.returncode: Optional[int] = None
        self.reason = ""
        self.resumed = False
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None

    # -------------------------------------------------------------- state

    @property
    def state(self) -> RunState:
        return self._state

    def _transition(self, new: RunState, reason: str = "", returncode: Optional[int] = None) -> StateEvent:
        with self._lock:
            old = self._state
            if new not in TRANSITIONS[old]:
                raise IllegalTransition(f"a training run cannot go from {old.value} to {new.value}")
            self._state = new
            return StateEvent(state=new, previous=old, reason=reason, returncode=returncode)

    # -------------------------------------------------------------- command

    def command(self, resume: bool = False) -> List[str]:
        """The child's command line."""
        if self._command is not None:
            cmd = list(self._command)
        else:
            cmd = [self.python, "-m", "semisam.cli", "train", "--config", str(self.config), "--progress", "json"]
        if resume:
            cmd.append("--resume")
        return cmd

    def environment(self) -> Dict[str, str]:
        """The child's environment: ours, unbuffered, with ``semisam`` importable, no torchrun variables."""
        env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"  # the reader decodes UTF-8 whatever the locale
        root = semisam_path()
        if root:
            parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            if root not in parts:
                env["PYTHONPATH"] = os.pathsep.join([root] + parts)
        env.update(self.extra_env)
        return env

    # -------------------------------------------------------------- start / stop

    def start(self, resume: bool = False) -> List[str]:
        """Start the child (``resume``: continue the run in the config's output folder).

        Returns the command. A child that cannot be started leaves the run ``failed`` (the
        reason says why) instead of raising; a run that is already active raises
        :class:`IllegalTransition`.
        """
        with self._lock:
            if self._state.active:
                raise IllegalTransition(f"a training run cannot start while it is {self._state.value}")
            cmd = self.command(resume)
            self._queue = queue.Queue()
            self._stderr_tail = deque(maxlen=STDERR_TAIL)
            self._stop_requested = False
            self.progress = RunProgress()
            self.final, self.returncode, self.reason, self.resumed = None, None, "", resume
            self.started_at, self.ended_at = time.monotonic(), None
            kwargs: Dict[str, Any] = {}
            if os.name == "posix":
                kwargs["start_new_session"] = True  # its own process group: Stop reaches it and its children only
            else:
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
            try:
                proc = subprocess.Popen(cmd, cwd=str(self.cwd), env=self.environment(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                        errors="replace", bufsize=1, **kwargs)
            except OSError as exc:
                self.reason = f"could not start {cmd[0]}: {exc}"
                self.ended_at = time.monotonic()
                self._pending_state.append(self._transition(RunState.FAILED, self.reason))
                return cmd
            self._proc = proc
            self._pending_state.append(self._transition(RunState.RUNNING, "resumed" if resume else "started"))
            self._queue.put(LogEvent(stream="runner", text="$ " + " ".join(cmd)))
            err = threading.Thread(target=self._read_stderr, args=(proc, self._queue, self._stderr_tail, self._tail_lock), name="SemiSAM train stderr", daemon=True)
            out = threading.Thread(target=self._read_stdout, args=(proc, self._queue, err), name="SemiSAM train stdout", daemon=True)
            err.start()
            out.start()
            return cmd

    @staticmethod
    def _read_stderr(proc: subprocess.Popen, q: "queue.Queue", tail: Deque[str], lock: threading.Lock) -> None:
        for line in proc.stderr:
            text = line.rstrip("\r\n")
            with lock:
                tail.append(text)
            q.put(LogEvent(stream="stderr", text=text))
        proc.stderr.close()

    @staticmethod
    def _read_stdout(proc: subprocess.Popen, q: "queue.Queue", err: threading.Thread) -> None:
        for line in proc.stdout:
            q.put(parse_line(line))
        proc.stdout.close()
        err.join()
        q.put(_Exited(proc.wait()))

    def stop(self) -> None:
        """Ask the child to stop (SIGINT, then SIGTERM, then SIGKILL after the timeouts).

        Returns at once; :meth:`poll` reports ``stopped`` when the child is gone. Raises
        :class:`IllegalTransition` unless the run is running (a second Stop while stopping is
        ignored).
        """
        with self._lock:
            if self._state == RunState.STOPPING:
                return
            self._pending_state.append(self._transition(RunState.STOPPING, "stop requested"))
            self._stop_requested = True
            proc = self._proc
        if proc is None:
            return
        self._queue.put(LogEvent(stream="runner", text="stop requested: interrupting the training (it resumes after the last finished epoch)"))
        self._send(proc, "interrupt")
        threading.Thread(target=self._escalate, args=(proc, self._queue), name="SemiSAM train stop", daemon=True).start()

    def kill(self) -> None:
        """Kill the child at once (no stop dialogue); :meth:`poll` then reports the outcome."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with self._lock:
                if self._state == RunState.RUNNING:
                    self._pending_state.append(self._transition(RunState.STOPPING, "killed"))
                    self._stop_requested = True
            self._send(proc, "kill")

    def _escalate(self, proc: subprocess.Popen, q: "queue.Queue") -> None:
        for how, wait in (("terminate", self.stop_timeout), ("kill", self.kill_timeout)):
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                q.put(LogEvent(stream="runner", level="warning", text=f"the training did not stop within {wait:.0f} s: {how}"))
                self._send(proc, how)

    @staticmethod
    def _send(proc: subprocess.Popen, how: str) -> None:
        """interrupt | terminate | kill the child's process group (the child alone on Windows)."""
        if proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                sig = {"interrupt": signal.SIGINT, "terminate": signal.SIGTERM, "kill": signal.SIGKILL}[how]
                os.killpg(proc.pid, sig)
            elif how == "interrupt":
                proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass

    # -------------------------------------------------------------- polling

    def poll(self) -> List[Event]:
        """The events since the last call (log lines, progress, state changes), in order.

        Call it from one thread (the GUI timer); it never blocks.
        """
        events: List[Event] = []
        with self._lock:
            events.extend(self._pending_state)
            self._pending_state = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Exited):
                events.append(self._finish(item.returncode))
                continue
            self.progress.apply(item)
            if isinstance(item, FinalEvent):
                self.final = item
            events.append(item)
        return events

    def _finish(self, rc: int) -> StateEvent:
        self.returncode = rc
        self.ended_at = time.monotonic()
        self._proc = None
        final = self.final
        said = final.status if final is not None else None
        if said == "finished" and (rc == 0 or self._stop_requested):
            state, reason = RunState.FINISHED, "finished"
        elif self._stop_requested:
            state, reason = RunState.STOPPED, f"stopped on request ({_describe_returncode(rc)}); resume continues after the last finished epoch"
        elif said == "stopped":
            state, reason = RunState.STOPPED, f"interrupted from outside ({_describe_returncode(rc)})"
        else:
            state, reason = RunState.FAILED, self._failure_reason(rc, final)
        self.reason = reason
        return self._transition(state, reason, rc)

    def _failure_reason(self, rc: int, final: Optional[FinalEvent]) -> str:
        how = _describe_returncode(rc)
        if final is not None and final.error:
            return f"{final.error} ({how})"
        if final is not None and final.status == "finished":
            return f"training reported 'finished' but the process ended with {how}"
        tail = [line for line in self.stderr_tail if line.strip()]
        if tail:
            return f"the training process ended with {how} without a result; last error output:\n" + "\n".join(tail[-15:])
        return f"the training process ended with {how} without a result"

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> List[Event]:
        """Poll until the child is gone; returns the events seen meanwhile.

        Raises ``TimeoutError`` (leaving the child running) after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        events: List[Event] = []
        while True:
            events.extend(self.poll())
            if not self._state.active:
                return events
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training still {self._state.value} after {timeout:.0f} s")
            time.sleep(interval)

    # -------------------------------------------------------------- results

    @property
    def stderr_tail(self) -> List[str]:
        """The last lines the child wrote to stderr."""
        with self._tail_lock:
            return list(self._stderr_tail)

    @property
    def best_checkpoint(self) -> Optional[Path]:
        """The student of a finished run (the ``final`` line's, else ``<output>/best.pt``), if it exists."""
        candidates = []
        if self.final is not None and self.final.best_checkpoint:
            candidates.append(Path(self.final.best_checkpoint))
        if self.progress.output:
            candidates.append(Path(self.progress.output) / "best.pt")
        for path in candidates:
            if path.is_file():
                return path
        return None

    def elapsed(self) -> Optional[float]:
        """Seconds since :meth:`start` (to the end, once the child is gone)."""
        if self.started_at is None:
            return None
        return (self.ended_at or time.monotonic()) - self.started_at
