"""Progress reporting, a crash-safe metrics log and training curves for semi-supervised training.

Training runs in up to three phases, named by number: ``0`` "warmup" (supervised only),
``1`` "semi" (teacher-guided consistency on unlabeled data) and ``2`` "finetune". The training
loop describes them up front as a *plan* and then reports each step and each epoch to a
:class:`Progress`, which shows them as tqdm bars (a terminal), as one short line per epoch
(a log file) or as JSON lines (a program such as the Slicer module reads them).

Conventions
-----------
* ``phase`` is the phase number; ``epoch`` is the 0-based epoch *within its phase*; ``step``
  is the 0-based step *within its epoch* (``0 .. steps_per_epoch - 1``).
* ``global_epoch`` counts epochs over all phases of the plan, 1-based: the last epoch of a
  plan ``[(0, "warmup", 5, S), (1, "semi", 10, S)]`` has ``global_epoch == 15``.
* Times are seconds. ``elapsed_s`` runs from :meth:`Progress.start` (monotonic clock).
  ``eta_s`` is the estimated time to the end of the whole plan, ``null`` until a step has run
  in this process. The speed behind it is measured only from steps run in this process (in
  the current phase once it has run a step), so a resumed run does not count the skipped
  epochs as done in no time.

JSON lines (``mode="json"``)
----------------------------
One compact JSON object per line, flushed at once, strict JSON (no ``NaN``/``Infinity``:
non-finite numbers are written as ``null``; numpy and torch scalars become plain numbers).
Every line has ``"type"``; a reader must ignore types and keys it does not know, and lines
that are not JSON objects (other code may print to the same stream)::

    {"type":"start", "plan":[{"phase":0,"name":"warmup","epochs":E,"steps_per_epoch":S}, ...],
     "total_epochs":int, "total_steps":int, ...info passed to start()}
    {"type":"phase_start", "phase":int, "phase_name":str, "epochs":int, "steps_per_epoch":int,
     "start_epoch":int, "elapsed_s":float}
    {"type":"step", "phase":int, "phase_name":str, "epoch":int, "epochs":int, "step":int,
     "steps":int, "losses":{"total":float|null, "sup":..., ...}, "lambda":float|null,
     "beta":float|null, "lr":float|null, "progress":float|null (0..1 of the plan's steps),
     "eta_s":float|null, "elapsed_s":float}
    {"type":"epoch", "phase":int, "phase_name":str, "epoch":int, "epochs":int,
     "global_epoch":int, ...the record given to epoch() (typically "losses", "lambda",
     "beta", "lr", "val_dice", "val_hd95"), "eta_s":float|null, "elapsed_s":float}
    {"type":"phase_end", "phase":int, "phase_name":str, "elapsed_s":float}
    {"type":"message", "level":"info"|"warning"|"error", "text":str, "elapsed_s":float}
    {"type":"final", "status":"finished"|"failed"|"stopped", "elapsed_s":float,
     ...info passed to final() (on an escaped exception: "error":str, "error_type":str)}

Step lines are thinned to at most one every ``step_every`` steps, but the first step run and
the last step of every epoch are always written. Exactly one ``final`` line ends a run that
used the :class:`Progress` as a context manager and left it by an exception.

The :class:`MetricsLog` (``metrics.jsonl``) holds the epoch records, one JSON line each,
fsync'ed, so it survives ``kill -9``; :func:`plot_curves` draws them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO, Union

PHASE_NAMES = {0: "warmup", 1: "semi", 2: "finetune"}
MODES = ("auto", "tqdm", "json", "text", "none")
STATUSES = ("finished", "failed", "stopped")

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- JSON helpers


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: NaN/inf -> ``None``, numpy/torch scalars -> numbers.

    Dicts (keys become strings), lists, tuples and sets are converted recursively; arrays and
    tensors via ``tolist()``; paths become strings; anything else unknown becomes ``str()``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    for method in ("tolist", "item"):  # numpy scalars/arrays, torch tensors (any device)
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                converted = fn()
            except Exception:  # noqa: BLE001 - e.g. item() of a tensor with several elements
                continue
            if converted is not value:
                return to_jsonable(converted)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return to_jsonable(float(value))
    return str(value)


def dumps(obj: Any) -> str:
    """One compact line of strict JSON (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), separators=(",", ":"), allow_nan=False)


def _float_or_none(value: Any) -> Optional[float]:
    value = to_jsonable(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- text helpers


def format_duration(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1h02m"``, ``185`` -> ``"3m05s"``, ``None`` -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt(value: Any) -> str:
    v = to_jsonable(value)
    if v is None:
        return "-" if value is None else "nan"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}"


def _can_encode(stream: Any, text: str) -> bool:
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True  # StringIO and friends hold str
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed or odd streams
        return False


# --------------------------------------------------------------------------- Progress


@dataclass(frozen=True)
class PhasePlan:
    """One phase of the plan: its number, name, epochs and steps per epoch."""

    phase: int
    name: str
    epochs: int
    steps_per_epoch: int

    def as_dict(self) -> Dict[str, Any]:
        return {"phase": self.phase, "name": self.name, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch}


def _parse_plan(plan: Iterable[Any]) -> List[PhasePlan]:
    parsed: List[PhasePlan] = []
    for entry in plan:
        if isinstance(entry, PhasePlan):
            item = entry
        elif isinstance(entry, Mapping):
            item = PhasePlan(int(entry["phase"]), str(entry["name"]), int(entry["epochs"]), int(entry["steps_per_epoch"]))
        else:
            phase, name, epochs, steps = entry
            item = PhasePlan(int(phase), str(name), int(epochs), int(steps))
        if item.epochs < 0 or item.steps_per_epoch < 0:
            raise ValueError(f"plan entry {entry!r}: epochs and steps_per_epoch must be >= 0")
        if any(p.phase == item.phase for p in parsed):
            raise ValueError(f"plan lists phase {item.phase} twice")
        parsed.append(item)
    return parsed


class _PhaseClock:
    """Steps run in this process in one phase, and when the phase started here."""

    def __init__(self, t0: float, steps: int = 0):
        self.t0 = t0
        self.steps = steps


class Progress:
    """Reports training progress as tqdm bars, plain text lines or JSON lines.

    Args:
        mode: ``"tqdm"`` (one bar per phase), ``"json"`` (JSON lines, see the module
            docstring), ``"text"`` (one short line per epoch), ``"none"`` (silent; ETA and
            epoch records still work) or ``"auto"``: tqdm when ``stream`` (default
            ``sys.stderr``) is a terminal, else text.
        plan: the phases, in the order they run, as ``(phase, name, epochs, steps_per_epoch)``
            tuples (or dicts with those keys).
        stream: where to write; default ``sys.stdout`` for json, ``sys.stderr`` otherwise.
        step_every: in json mode, write a step line at most every this many steps (the first
            step run and the last step of each epoch are always written).
        clock: a monotonic clock in seconds (tests pass a fake one).

    Use it as a context manager: an exception escaping the block emits
    ``final("failed", error=..., error_type=...)`` (``"stopped"`` for ``KeyboardInterrupt``)
    unless :meth:`final` was already called, closes the bars and is re-raised. Methods are
    thread-safe. A stream that breaks (reader gone) silences the output instead of failing
    training.
    """

    def __init__(
        self,
        mode: str = "auto",
        plan: Sequence[Any] = (),
        stream: Optional[TextIO] = None,
        step_every: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if int(step_every) < 1:
            raise ValueError(f"step_every must be >= 1, not {step_every!r}")
        if mode == "auto":
            mode = "tqdm" if _isatty(stream if stream is not None else sys.stderr) else "text"
        self.mode = mode
        self.plan: List[PhasePlan] = _parse_plan(plan)
        self.stream: TextIO = stream if stream is not None else (sys.stdout if mode == "json" else sys.stderr)
        self.step_every = int(step_every)
        self._clock = clock
        self._lock = threading.RLock()
        self._t0 = clock()
        self._started = False
        self._finalised = False
        self._broken = False
        self._phase: Optional[int] = None
        self._clocks: Dict[int, _PhaseClock] = {}
        self._run_steps = 0  # steps run in this process, all phases
        self._since_emit: Optional[int] = None  # steps since the last json step line
        self._done = 0  # steps of the plan done (run here or skipped by a resume)
        self._bars: Dict[int, Any] = {}
        self._greek = _can_encode(self.stream, "\u03bb\u03b2")
        self.total_steps = sum(p.epochs * p.steps_per_epoch for p in self.plan)
        self.total_epochs = sum(p.epochs for p in self.plan)

    def set_plan(self, plan: Sequence[Any]) -> None:
        """Set the plan once it is known (before :meth:`start`; the training loop knows the
        steps per epoch only after loading the data, and messages may come before)."""
        with self._lock:
            if self._started:
                raise RuntimeError("set_plan() must come before start()")
            self.plan = _parse_plan(plan)
            self.total_steps = sum(p.epochs * p.steps_per_epoch for p in self.plan)
            self.total_epochs = sum(p.epochs for p in self.plan)

    # ----------------------------------------------------------------- plan arithmetic

    def _entry(self, phase: int) -> Optional[PhasePlan]:
        for p in self.plan:
            if p.phase == phase:
                return p
        return None

    def phase_name(self, phase: int) -> str:
        """The plan's name of ``phase`` (else the standard name, else ``"phase<N>"``)."""
        entry = self._entry(phase)
        return entry.name if entry else PHASE_NAMES.get(int(phase), f"phase{int(phase)}")

    def _offsets(self, phase: int) -> Optional[tuple]:
        """(steps, epochs) of the plan's phases before ``phase``; None if it is not planned."""
        steps = epochs = 0
        for p in self.plan:
            if p.phase == phase:
                return steps, epochs
            steps += p.epochs * p.steps_per_epoch
            epochs += p.epochs
        return None

    def global_epoch(self, phase: int, epoch: int) -> Optional[int]:
        """1-based epoch count over all phases for 0-based ``epoch`` of ``phase``."""
        offsets = self._offsets(phase)
        return None if offsets is None else offsets[1] + int(epoch) + 1

    # ----------------------------------------------------------------- timing

    def elapsed_s(self) -> float:
        """Seconds since :meth:`start` (or since construction if it was not called)."""
        return max(self._clock() - self._t0, 0.0)

    def rate(self) -> Optional[float]:
        """Measured steps per second in this process: of the current phase once it ran a
        step, else over all phases run here; ``None`` before the first step."""
        with self._lock:
            now = self._clock()
            clock = self._clocks.get(self._phase) if self._phase is not None else None
            if clock is not None and clock.steps > 0 and now > clock.t0:
                return clock.steps / (now - clock.t0)
            if self._run_steps > 0 and now > self._t0:
                return self._run_steps / (now - self._t0)
            return None

    def eta_s(self) -> Optional[float]:
        """Estimated seconds to the end of the plan; ``None`` before the first step."""
        with self._lock:
            rate = self.rate()
            if rate is None or rate <= 0 or not self.plan:
                return None
            return max(self.total_steps - self._done, 0) / rate

    def fraction_done(self) -> Optional[float]:
        """Share of the plan's steps done (including steps skipped by a resume), 0..1."""
        if self.total_steps <= 0:
            return None
        return min(max(self._done / self.total_steps, 0.0), 1.0)

    def _times(self) -> Dict[str, Any]:
        eta = self.eta_s()
        return {"eta_s": None if eta is None else round(eta, 1), "elapsed_s": round(self.elapsed_s(), 3)}

    # ----------------------------------------------------------------- output

    def _emit(self, obj: Dict[str, Any]) -> None:
        if self.mode != "json" or self._broken:
            return
        line = dumps(obj)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self._broken = True

    def _print(self, text: str) -> None:
        if self.mode in ("none", "json") or self._broken:
            return
        if not self._greek:
            text = text.replace("\u03bb", "lam").replace("\u03b2", "beta")
        try:
            if self.mode == "tqdm":
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self._broken = True

    def _close_bar(self, phase: int) -> None:
        bar = self._bars.pop(phase, None)
        if bar is not None:
            try:
                bar.close()
            except (OSError, ValueError):
                self._broken = True

    def close(self) -> None:
        """Close all bars (no final line)."""
        with self._lock:
            for phase in list(self._bars):
                self._close_bar(phase)

    # ----------------------------------------------------------------- events

    def start(self, **info: Any) -> None:
        """Start the run (and the elapsed clock); json: the ``start`` line with the plan.

        ``info`` (e.g. ``output_dir``, ``resumed_from``) is added to the line. A second call
        does nothing.
        """
        with self._lock:
            if self._started:
                return
            self._started = True
            if self._run_steps == 0:
                self._t0 = self._clock()
            line: Dict[str, Any] = {"type": "start"}
            line.update(info)
            line.update(
                type="start",
                plan=[p.as_dict() for p in self.plan],
                total_epochs=self.total_epochs,
                total_steps=self.total_steps,
            )
            self._emit(line)
            if self.mode == "text":
                phases = ", ".join(f"{p.name} {p.epochs}x{p.steps_per_epoch}" for p in self.plan)
                self._print(f"training: {phases} (epochs x steps)")

    def phase_start(self, phase: int, start_epoch: int = 0) -> None:
        """A phase begins (at ``start_epoch`` when a run resumes mid-phase).

        Steps of earlier phases and of the epochs before ``start_epoch`` count as done for
        the ETA but not for the measured speed.
        """
        with self._lock:
            phase, start_epoch = int(phase), int(start_epoch)
            if not self._started:
                self.start()
            if self._phase is not None and self._phase != phase:
                self._close_bar(self._phase)
            self._phase = phase
            self._clocks[phase] = _PhaseClock(self._clock())
            entry = self._entry(phase)
            offsets = self._offsets(phase)
            if entry is not None and offsets is not None:
                self._done = offsets[0] + min(start_epoch, entry.epochs) * entry.steps_per_epoch
            name = self.phase_name(phase)
            epochs = entry.epochs if entry else None
            steps = entry.steps_per_epoch if entry else None
            self._emit(
                {
                    "type": "phase_start",
                    "phase": phase,
                    "phase_name": name,
                    "epochs": epochs,
                    "steps_per_epoch": steps,
                    "start_epoch": start_epoch,
                    "elapsed_s": round(self.elapsed_s(), 3),
                }
            )
            if self.mode == "tqdm" and not self._broken:
                from tqdm import tqdm

                total = epochs * steps if entry else None
                initial = min(start_epoch * steps, total) if entry else 0
                self._close_bar(phase)
                self._bars[phase] = tqdm(
                    total=total,
                    initial=initial,
                    desc=f"{phase} {name}",
                    file=self.stream,
                    unit="step",
                    dynamic_ncols=True,
                    leave=True,
                )
            elif self.mode == "text":
                resumed = f", resuming at epoch {start_epoch + 1}" if start_epoch else ""
                plan = f": {epochs} epochs x {steps} steps" if entry else ""
                self._print(f"phase {phase} {name}{plan}{resumed}")

    def phase_end(self, phase: int) -> None:
        """A phase is over: its bar is closed; json: a ``phase_end`` line."""
        with self._lock:
            phase = int(phase)
            self._close_bar(phase)
            self._emit({"type": "phase_end", "phase": phase, "phase_name": self.phase_name(phase), "elapsed_s": round(self.elapsed_s(), 3)})
            if self.mode == "text":
                self._print(f"phase {phase} {self.phase_name(phase)} done after {format_duration(self.elapsed_s())}")

    def step(
        self,
        phase: int,
        epoch: int,
        step: int,
        losses: Mapping[str, Any],
        lam: Any = None,
        beta: Any = None,
        lr: Any = None,
    ) -> None:
        """One optimisation step done (0-based ``epoch`` in the phase, ``step`` in the epoch).

        Call it for every step; json thins the lines (``step_every``), tqdm advances the
        phase's bar and shows the losses, λ and β, text prints nothing.
        """
        with self._lock:
            phase, epoch, step = int(phase), int(epoch), int(step)
            if phase != self._phase or phase not in self._clocks:
                self.phase_start(phase, start_epoch=epoch)  # the training loop skipped it
            else:
                self._clocks[phase].steps += 1
            self._run_steps += 1
            entry = self._entry(phase)
            offsets = self._offsets(phase)
            steps = entry.steps_per_epoch if entry else None
            if entry is not None and offsets is not None:
                self._done = offsets[0] + epoch * steps + min(step + 1, steps)
            last_of_epoch = steps is not None and step >= steps - 1
            self._since_emit = 1 if self._since_emit is None else self._since_emit + 1
            first = self._run_steps == 1
            if self.mode == "json" and (first or last_of_epoch or self._since_emit >= self.step_every):
                self._since_emit = 0
                line = {
                    "type": "step",
                    "phase": phase,
                    "phase_name": self.phase_name(phase),
                    "epoch": epoch,
                    "epochs": entry.epochs if entry else None,
                    "step": step,
                    "steps": steps,
                    "losses": dict(losses),
                    "lambda": lam,
                    "beta": beta,
                    "lr": lr,
                    "progress": self.fraction_done(),
                }
                line.update(self._times())
                self._emit(line)
            bar = self._bars.get(phase)
            if bar is not None:
                target = epoch * steps + step + 1 if steps is not None else bar.n + 1
                postfix = " ".join(f"{k} {_fmt(v)}" for k, v in losses.items())
                postfix += f" \u03bb {_fmt(lam)} \u03b2 {_fmt(beta)}"
                if not self._greek:
                    postfix = postfix.replace("\u03bb", "lam").replace("\u03b2", "beta")
                try:
                    bar.set_postfix_str(postfix, refresh=False)
                    bar.update(max(target - bar.n, 0))
                except (OSError, ValueError):
                    self._broken = True

    def epoch(self, record: Mapping[str, Any]) -> Dict[str, Any]:
        """An epoch is done (and validated). Returns the record as emitted.

        ``record`` holds at least ``phase`` and ``epoch`` (0-based in the phase), typically
        ``losses`` (dict), ``lambda``, ``beta``, ``lr``, ``val_dice``, ``val_hd95`` (mm).
        ``phase_name``, ``epochs`` and ``global_epoch`` are added unless given, then
        ``eta_s`` and ``elapsed_s``. The returned dict (``type == "epoch"``, strict-JSON
        values) is what :meth:`MetricsLog.append` and :func:`plot_curves` expect.
        """
        with self._lock:
            if not self._started:
                self.start()
            line: Dict[str, Any] = {"type": "epoch"}
            phase = record.get("phase")
            epoch = record.get("epoch")
            if phase is not None:
                line["phase_name"] = self.phase_name(int(phase))
                entry = self._entry(int(phase))
                if entry is not None:
                    line["epochs"] = entry.epochs
                if epoch is not None:
                    line["global_epoch"] = self.global_epoch(int(phase), int(epoch))
            line.update(record)
            line.update(type="epoch", **self._times())
            line = to_jsonable(line)
            self._emit(line)
            if self.mode in ("text", "tqdm"):
                self._print(self._epoch_line(line))
            return line

    def _epoch_line(self, r: Mapping[str, Any]) -> str:
        parts = [str(r.get("phase_name", r.get("phase", "?")))]
        if r.get("epoch") is not None:
            of = f"/{r['epochs']}" if r.get("epochs") is not None else ""
            parts.append(f"epoch {int(r['epoch']) + 1}{of}")
        if r.get("global_epoch") is not None:
            parts.append(f"(all {r['global_epoch']}/{self.total_epochs})" if self.total_epochs else f"(all {r['global_epoch']})")
        losses = r.get("losses")
        if isinstance(losses, Mapping) and losses:
            parts.append("loss " + " ".join(f"{k} {_fmt(v)}" for k, v in losses.items()))
        for key, label in (("lambda", "\u03bb"), ("beta", "\u03b2"), ("lr", "lr")):
            if key in r:
                parts.append(f"{label} {_fmt(r[key])}")
        if r.get("val_dice") is not None:
            parts.append(f"dice {_fmt(r['val_dice'])}")
        if r.get("val_hd95") is not None:
            parts.append(f"hd95 {_fmt(r['val_hd95'])} mm")
        parts.append(f"eta {format_duration(r.get('eta_s'))}")
        return "  ".join(parts)

    def message(self, text: str, level: str = "info") -> None:
        """A note for the user; json: a ``message`` line; otherwise one line to the stream."""
        with self._lock:
            self._emit({"type": "message", "level": level, "text": str(text), "elapsed_s": round(self.elapsed_s(), 3)})
            self._print(str(text) if level == "info" else f"{level}: {text}")

    def final(self, status: str, **info: Any) -> None:
        """The run is over (``"finished"``, ``"failed"`` or ``"stopped"``); closes the bars.

        json: the ``final`` line with ``elapsed_s`` and ``info`` (e.g. ``best_dice``,
        ``checkpoint``, ``error``). Only the first call has an effect.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        with self._lock:
            if self._finalised:
                return
            self._finalised = True
            self.close()
            line: Dict[str, Any] = {"type": "final", "status": status, "elapsed_s": round(self.elapsed_s(), 3)}
            line.update(info)
            line.update(type="final", status=status)
            self._emit(line)
            if self.mode in ("text", "tqdm"):
                error = f": {info['error']}" if info.get("error") else ""
                self._print(f"training {status} after {format_duration(self.elapsed_s())}{error}")

    @property
    def finalised(self) -> bool:
        """Whether :meth:`final` was called."""
        return self._finalised

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not self._finalised:
            status = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.final(status, error=str(exc) or exc_type.__name__, error_type=exc_type.__name__)
        self.close()
        return False


# --------------------------------------------------------------------------- MetricsLog


def _parse_constant(name: str) -> None:
    return None  # NaN/Infinity written by other tools read as null


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The JSON-object lines of ``path``; malformed or partial lines are skipped.

    A missing file reads as an empty list.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records: List[Dict[str, Any]] = []
    for raw in data.split(b"\n"):
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_parse_constant)
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MetricsLog:
    """An append-only JSON-lines file of records (one per epoch) that survives ``kill -9``.

    Each :meth:`append` writes one strict-JSON line, flushes and fsyncs. A partial last line
    left by a killed process is skipped by :meth:`read` and cut off (a newline is added first)
    before the next append, so later records stay readable.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> Dict[str, Any]:
        """Append ``record`` (NaN -> null, numpy/torch scalars -> numbers); returns it as written."""
        clean = to_jsonable(dict(record))
        line = dumps(clean).encode("utf-8") + b"\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                if fh.tell() > 0 and not self._ends_with_newline():
                    line = b"\n" + line
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        return clean

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def read(self) -> List[Dict[str, Any]]:
        """All records (see :func:`read_metrics`)."""
        return read_metrics(self.path)

    def truncate(self, keep: Callable[[Dict[str, Any]], bool]) -> int:
        """Atomically rewrite the file with only the records for which ``keep`` is true.

        Used on resume to drop the lines of an unfinished epoch. Malformed lines are dropped
        too. The new file is written next to the old one, fsync'ed and moved over it, so a
        crash leaves either the old or the new file. Returns the number of records dropped.
        """
        with self._lock:
            if not self.path.exists():
                return 0
            records = self.read()
            kept = [r for r in records if keep(r)]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    for r in kept:
                        fh.write(dumps(r).encode("utf-8") + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.path.parent)
            return len(records) - len(kept)


# --------------------------------------------------------------------------- plot_curves

_LOSS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _epoch_records(records: Iterable[Mapping[str, Any]]) -> List[tuple]:
    """(x, record) sorted by x; the last record of a repeated global epoch wins."""
    rows: Dict[float, Mapping[str, Any]] = {}
    order = 0
    for r in records:
        if not isinstance(r, Mapping):
            continue
        if r.get("type") != "epoch" and "global_epoch" not in r:
            continue
        order += 1
        x = _float_or_none(r.get("global_epoch"))
        rows[x if x is not None else float(order)] = r
    return sorted(rows.items(), key=lambda item: item[0])


def _series(rows: Sequence[tuple], get: Callable[[Mapping[str, Any]], Any]) -> List[float]:
    out = []
    for _, r in rows:
        v = _float_or_none(get(r))
        out.append(math.nan if v is None else v)
    return out


def _finite_points(xs: Sequence[float], ys: Sequence[float]) -> tuple:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_curves(records_or_path: Union[PathLike, Iterable[Mapping[str, Any]]], out_png: PathLike, title: Optional[str] = None) -> Path:
    """Draw training curves from epoch records (or a metrics JSON-lines file) to a PNG.

    Records used: ``type == "epoch"`` or having ``global_epoch`` (the x axis; epochs over all
    phases). Panels: (a) the loss terms of ``losses`` (log y when all are positive), (b) λ
    and β, (c) validation Dice (left axis, 0..1) and HD95 in mm (right axis) where present.
    Dashed vertical lines mark phase changes, labelled with the phase names. Missing keys,
    ``None`` and NaN are gaps. With no epoch records the figure says so. The PNG is written
    atomically (temporary file in the same folder, then ``os.replace``). Returns its path.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    if isinstance(records_or_path, (str, os.PathLike)):
        records: Iterable[Mapping[str, Any]] = read_metrics(records_or_path)
    else:
        records = records_or_path
    rows = _epoch_records(records)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(9.0, 9.5), dpi=100)
    axes = fig.subplots(3, 1, sharex=True)
    if title:
        fig.suptitle(title)
    xs = [x for x, _ in rows]
    style = {"marker": "o", "markersize": 3 if len(xs) > 1 else 5, "linewidth": 1.4}

    if not rows:
        for ax in axes:
            ax.text(0.5, 0.5, "no epoch records yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    else:
        # (a) losses
        ax = axes[0]
        keys: List[str] = []
        for _, r in rows:
            losses = r.get("losses")
            if isinstance(losses, Mapping):
                keys.extend(k for k in losses if k not in keys)
        finite: List[float] = []
        for i, key in enumerate(keys):
            ys = _series(rows, lambda r, k=key: (r.get("losses") or {}).get(k) if isinstance(r.get("losses"), Mapping) else None)
            finite.extend(y for y in ys if math.isfinite(y))
            ax.plot(xs, ys, label=key, color=_LOSS_COLOURS[i % len(_LOSS_COLOURS)], **style)
        if finite and all(y > 0 for y in finite):
            ax.set_yscale("log")
        if not finite:
            ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_ylabel("loss")
        if keys:
            ax.legend(loc="upper right", fontsize=8, ncol=min(len(keys), 4))

        # (b) lambda and beta
        ax = axes[1]
        lam = _series(rows, lambda r: r.get("lambda", r.get("lam")))
        beta = _series(rows, lambda r: r.get("beta"))
        ax.plot(xs, lam, label="\u03bb (consistency weight)", color="#9467bd", **style)
        ax.plot(xs, beta, label="\u03b2 (teacher weight)", color="#17becf", **style)
        ax.set_ylabel("weight")
        if any(math.isfinite(v) for v in lam + beta):
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no \u03bb/\u03b2 values", ha="center", va="center", transform=ax.transAxes, color="0.4")

        # (c) validation
        ax = axes[2]
        dice = _series(rows, lambda r: r.get("val_dice"))
        hd95 = _series(rows, lambda r: r.get("val_hd95"))
        handles = []
        # validation may run every few epochs: connect the epochs that have a value
        dice_x, dice_y = _finite_points(xs, dice)
        hd_x, hd_y = _finite_points(xs, hd95)
        if dice_x:
            handles += ax.plot(dice_x, dice_y, label="Dice", color="#2ca02c", **style)
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("validation Dice")
        if hd_x:
            ax2 = ax.twinx()
            handles += ax2.plot(hd_x, hd_y, label="HD95 (mm)", color="#d62728", linestyle="--", **style)
            ax2.set_ylabel("HD95 (mm)")
            ax2.set_ylim(bottom=0.0)
        if handles:
            ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="center right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes, color="0.4")

        # phase boundaries and names
        segments: List[list] = []  # [phase, name, x_first, x_last]
        for x, r in rows:
            phase = r.get("phase")
            if not segments or segments[-1][0] != phase:
                name = r.get("phase_name") or (PHASE_NAMES.get(int(phase), f"phase {phase}") if isinstance(phase, int) else "")
                segments.append([phase, str(name), x, x])
            segments[-1][3] = x
        lo, hi = xs[0] - 0.5, xs[-1] + 0.5
        for prev, nxt in zip(segments, segments[1:]):
            boundary = (prev[3] + nxt[2]) / 2.0
            for a in axes:
                a.axvline(boundary, color="0.35", linestyle="--", linewidth=1.0)
        for k, (_, name, first, last) in enumerate(segments):
            left = lo if k == 0 else (segments[k - 1][3] + first) / 2.0
            right = hi if k == len(segments) - 1 else (last + segments[k + 1][2]) / 2.0
            if name:
                trans = blended_transform_factory(axes[0].transData, axes[0].transAxes)
                axes[0].text((left + right) / 2.0, 1.01, name, transform=trans, ha="center", va="bottom", fontsize=9, color="0.25")
        axes[-1].set_xlim(lo, hi)
        if len(xs) <= 12 and all(float(x).is_integer() for x in xs):
            axes[-1].xaxis.set_major_locator(FixedLocator(xs))
        else:
            axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("epoch (all phases)")
    for a in axes:
        a.grid(True, alpha=0.3)
    fig.tight_layout()

    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_png
