"""How Slicer's GUI thread waits for the model worker, and how its slots report errors (Qt-free).

**The GIL.** Slicer's main thread holds Python's GIL whenever it is not running Python code:
while Qt sits in its event loop the GIL is never released. A Python worker thread (our
:class:`~SemiSAMSegmentLib.worker.ModelWorker`) only gets the GIL when the main thread runs
Python code that releases it, e.g. a timer slot. Torch releases the GIL inside its kernels, so
a worker polled by a 50-100 ms ``QTimer`` advanced about one torch call per tick: an embedding
of a second took minutes.

Two ways out: run inference in a child process (as SemiSAM Train does for training), or yield
the GIL from the GUI thread while a job runs. We yield (:class:`GilYieldingPoller`), because:

* the Segment Editor effect's value is a persistent model with a per-slice embedding cache
  and ~10 ms clicks; a child process would have to ship every source volume and every mask
  across a pipe and keep a second Python with torch and the weights alive for each effect;
* it is what Slicer extensions do for the same problem (SlicerSimpleFilters'
  ``main_queue_process``: a 0 ms single-shot timer that calls ``time.sleep`` a few ms while
  work is pending), and it costs nothing when no job runs: the timer stops;
* the GUI stays responsive: each tick returns to Qt's event loop, so input and repaints wait
  at most one yield (``YIELD_SECONDS``) plus the tick's own work.

While a job is pending each tick runs the GUI-side ``poll`` (progress, result), sleeps
``YIELD_SECONDS`` with the GIL released (the worker runs) and schedules the next tick at once
(a 0 ms single-shot timer); once ``poll`` reports nothing pending the ticks stop.
``Testing/test_slicer_app_rules.py`` runs this poller from a simulated event loop that holds
the GIL between ticks and checks that a real LiteMedSAM embedding finishes within 2x its solo
time (and that a 50 ms timer without yielding does not).

**Errors.** An exception that escapes a Qt slot or a Segment Editor callback only reaches the
Python console; the user sees nothing. :func:`reportErrors` wraps every such entry point so
that any exception is logged with its traceback and shown (``slicer.util.errorDisplay``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import traceback
from concurrent.futures import Future
from typing import Callable, Optional, Tuple

#: Seconds the GUI thread sleeps (GIL released) per tick while a worker job is pending.
YIELD_SECONDS = 0.008

#: Marker set on functions wrapped by :func:`reportErrors` (checked by the rule tests).
REPORTS_ERRORS = "__semisam_reports_errors__"


class GilYieldingPoller:
    """Poll a worker job from the GUI thread and yield the GIL between polls.

    Args:
        poll: the GUI-side work of one tick (update progress, take a finished result);
            returns True while a job is still pending.
        schedule: ``schedule(ms)`` arranges one call of :meth:`tick` after ``ms`` ms; in
            Slicer the ``start`` of a single-shot ``qt.QTimer`` connected to ``tick``.
        yield_seconds: sleep per tick while pending (the GIL is released meanwhile).
        busy_interval_ms: delay of the next tick while pending (0: at once, after Qt has
            processed the events that arrived).
        sleep: the sleep function (tests count calls).
    """

    def __init__(self, poll: Callable[[], bool], schedule: Callable[[int], None], yield_seconds: float = YIELD_SECONDS,
                 busy_interval_ms: int = 0, sleep: Callable[[float], None] = time.sleep):
        if yield_seconds < 0 or busy_interval_ms < 0:
            raise ValueError("yield_seconds and busy_interval_ms must be >= 0")
        self._poll = poll
        self._schedule = schedule
        self.yield_seconds = float(yield_seconds)
        self.busy_interval_ms = int(busy_interval_ms)
        self._sleep = sleep
        self._active = False

    @property
    def active(self) -> bool:
        """True between :meth:`start` and the tick that finds nothing pending (or :meth:`stop`)."""
        return self._active

    def start(self) -> None:
        """Begin ticking (call after submitting a job); a no-op while already ticking."""
        if not self._active:
            self._active = True
            self._schedule(0)

    def stop(self) -> None:
        """Stop ticking (the next scheduled tick does nothing)."""
        self._active = False

    def tick(self) -> None:
        """One timer tick: poll; while pending, yield the GIL and schedule the next tick."""
        if not self._active:
            return
        try:
            pending = bool(self._poll())
        except BaseException:
            self._active = False
            raise
        if not pending or not self._active:
            self._active = False
            return
        if self.yield_seconds:
            self._sleep(self.yield_seconds)  # time.sleep releases the GIL: the worker runs now
        self._schedule(self.busy_interval_ms)


def is_cancellation(exc: Optional[BaseException]) -> bool:
    """True for the "cancelled" exceptions of the worker and of semisam (any class named
    ``Cancelled``), without importing semisam (which may be what failed to import)."""
    return exc is not None and any(c.__name__ == "Cancelled" for c in type(exc).__mro__)


def outcome(future: Future, cancel_requested: bool = False) -> Tuple[str, Optional[BaseException]]:
    """``("cancelled" | "failed" | "done", exception or None)`` of a finished job.

    A job the user stopped counts as cancelled whether it raised a ``Cancelled`` exception,
    was dropped before it started, or returned early (``cancel_requested``). Importing
    nothing, it cannot fail itself.
    """
    if not future.done():
        raise ValueError("the job has not finished yet")
    if future.cancelled():
        return "cancelled", None
    exc = future.exception()
    if exc is not None:
        return ("cancelled", exc) if is_cancellation(exc) else ("failed", exc)
    return ("cancelled", None) if cancel_requested else ("done", None)


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def show_error(message: str, exc: BaseException) -> None:
    """Log ``exc`` with its traceback and show it to the user (``slicer.util.errorDisplay``,
    which only logs in testing mode or without a main window)."""
    details = format_exception(exc)
    logging.error(f"{message}\n{details}")
    try:
        import slicer.util

        slicer.util.errorDisplay(f"{message}\n\n{exc}", detailedText=details)
    except Exception as display_error:  # no GUI (tests, a broken Qt): the log has it
        logging.error(f"SemiSAM: could not show the error dialog ({display_error})")


def reportErrors(message: str, default=None):
    """Decorator for Qt slots and Segment Editor callbacks: an exception is logged and shown
    with ``message`` (:func:`show_error`), and the call returns ``default``.

    Signals pass their arguments (``clicked(bool)`` passes the checked state): the wrapper
    drops positional arguments the function does not take, so ``def onApply(self)`` can be
    connected to ``clicked(bool)``.
    """

    def decorate(fn):
        params = list(inspect.signature(fn).parameters.values())
        variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
        npos = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*(args if variadic else args[:npos]), **kwargs)
            except Exception as exc:
                show_error(message, exc)
                return default

        setattr(wrapper, REPORTS_ERRORS, True)
        return wrapper

    return decorate
