"""One persistent model thread (Qt-free): the GUI submits work and keeps processing events.

The model (an :class:`semisam.interactive.InteractiveSession`, a student...) is built *in* the
worker thread by a factory on first use and lives there for the worker's lifetime, so torch
state never crosses threads and the embedding cache survives between clicks. Jobs run one at
a time, in order. A job submitted with a ``key`` supersedes a queued, not yet started job with
the same key (the user clicked again before the previous proposal was computed: only the
latest counts). Each job gets a ``threading.Event`` that :meth:`ModelWorker.cancel` sets, for
long jobs (propagation, one-click segmentation) to poll.

Idle jobs (:meth:`ModelWorker.submit_idle`: prefetching the embeddings of slices the user is
likely to click next) run at the lowest priority: only when no other job waits, and any
:meth:`ModelWorker.submit` drops the queued ones and sets the running one's cancel event, so a
click never waits for a prefetch (the encoder stops within milliseconds, see
``semisam.models.backends``).

The GUI side polls :class:`concurrent.futures.Future` objects from a ``QTimer`` (Qt objects
must only be touched from the GUI thread; done-callbacks would run in the worker thread).
"""

from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional


class Cancelled(Exception):
    """Raised by a job that saw its cancel event set."""


@dataclass
class _Job:
    number: int
    fn: Callable[[Any, threading.Event], Any]
    future: Future
    key: Optional[Hashable]
    cancel: threading.Event = field(default_factory=threading.Event)
    idle: bool = False


class ModelWorker:
    """A single worker thread that owns ``factory()``'s result and runs submitted jobs on it.

    Args:
        factory: builds the model object; called once, in the worker thread, before the first
            job (a failure fails that job and is retried on the next one).
        name: the thread's name (shows in debuggers and tracebacks).
    """

    def __init__(self, factory: Callable[[], Any], name: str = "SemiSAM model worker"):
        self._factory = factory
        self._model: Any = None
        self._built = False
        self._jobs: "collections.deque[Optional[_Job]]" = collections.deque()  # None: shut down
        self._idle: "collections.deque[_Job]" = collections.deque()
        self._latest: Dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._numbers = itertools.count()
        self._current: Optional[_Job] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ GUI side

    def submit(self, fn: Callable[[Any, threading.Event], Any], key: Optional[Hashable] = None) -> Future:
        """Queue ``fn(model, cancel_event)``; returns its Future. With ``key``, any queued job
        with the same key that has not started yet is dropped (its Future is cancelled).
        Idle jobs are dropped and a running one is told to stop: this job comes first."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the model worker was shut down; create a new one")
            job = _Job(next(self._numbers), fn, Future(), key)
            if key is not None:
                self._latest[key] = job.number
            self._drop_idle()
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def submit_idle(self, fn: Callable[[Any, threading.Event], Any]) -> Future:
        """Queue ``fn(model, cancel_event)`` at the lowest priority: it starts only when no
        other job waits, and :meth:`submit` cancels it (queued: its Future is cancelled;
        running: its cancel event is set, which ``fn`` must honour promptly)."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the model worker was shut down; create a new one")
            job = _Job(next(self._numbers), fn, Future(), None, idle=True)
            self._idle.append(job)
            self._wake.notify()
        return job.future

    def _drop_idle(self) -> None:  # with the lock held
        while self._idle:
            self._idle.popleft().future.cancel()
        if self._current is not None and self._current.idle:
            self._current.cancel.set()

    def cancel(self) -> None:
        """Ask the running job to stop (it polls its event) and drop every queued job."""
        with self._wake:
            if self._current is not None:
                self._current.cancel.set()
            shutdown = None in self._jobs
            for job in self._jobs:
                if job is not None:
                    job.future.cancel()
            self._jobs.clear()
            if shutdown:  # keep a shutdown request
                self._jobs.append(None)
            while self._idle:
                self._idle.popleft().future.cancel()

    @property
    def busy(self) -> bool:
        """True while a job (not an idle one) runs or waits."""
        with self._lock:
            return (self._current is not None and not self._current.idle) or any(j is not None for j in self._jobs)

    @property
    def idle_busy(self) -> bool:
        """True while an idle job runs or waits."""
        with self._lock:
            return (self._current is not None and self._current.idle) or bool(self._idle)

    @property
    def model(self) -> Any:
        """The model object once built (for inspection in tests; use it only from jobs)."""
        return self._model

    def shutdown(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Stop after the running job; queued jobs are cancelled."""
        if self._closed:
            return
        self.cancel()
        with self._wake:
            self._closed = True
            self._jobs.append(None)
            self._wake.notify()
        if wait:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._idle:
                    self._wake.wait()
                job = self._jobs.popleft() if self._jobs else self._idle.popleft()
                if job is None:
                    return
                superseded = job.key is not None and self._latest.get(job.key) != job.number
                if not superseded:
                    self._current = job
            if superseded or not job.future.set_running_or_notify_cancel():
                if superseded:
                    job.future.cancel()
                continue
            try:
                if not self._built:
                    self._model = self._factory()
                    self._built = True
                result = job.fn(self._model, job.cancel)
            except BaseException as exc:  # the GUI shows it; the thread lives on
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._current = None
