"""One persistent model thread (Qt-free): the GUI submits work and keeps processing events.

The model (an :class:`semisam.interactive.InteractiveSession`, a student...) is built *in* the
worker thread by a factory on first use and lives there for the worker's lifetime, so torch
state never crosses threads and the embedding cache survives between clicks. Jobs run one at
a time, in order. A job submitted with a ``key`` supersedes a queued, not yet started job with
the same key (the user clicked again before the previous proposal was computed: only the
latest counts). Each job gets a ``threading.Event`` that :meth:`ModelWorker.cancel` sets, for
long jobs (propagation, one-click segmentation) to poll.

The GUI side polls :class:`concurrent.futures.Future` objects from a ``QTimer`` (Qt objects
must only be touched from the GUI thread; done-callbacks would run in the worker thread).
"""

from __future__ import annotations

import itertools
import queue
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
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._latest: Dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._current: Optional[_Job] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ GUI side

    def submit(self, fn: Callable[[Any, threading.Event], Any], key: Optional[Hashable] = None) -> Future:
        """Queue ``fn(model, cancel_event)``; returns its Future. With ``key``, any queued job
        with the same key that has not started yet is dropped (its Future is cancelled)."""
        if self._closed:
            raise RuntimeError("the model worker was shut down; create a new one")
        job = _Job(next(self._numbers), fn, Future(), key)
        with self._lock:
            if key is not None:
                self._latest[key] = job.number
        self._queue.put(job)
        return job.future

    def cancel(self) -> None:
        """Ask the running job to stop (it polls its event) and drop every queued job."""
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
            else:  # keep a shutdown request
                self._queue.put(None)
                break

    @property
    def busy(self) -> bool:
        """True while a job runs or waits."""
        with self._lock:
            return self._current is not None or not self._queue.empty()

    @property
    def model(self) -> Any:
        """The model object once built (for inspection in tests; use it only from jobs)."""
        return self._model

    def shutdown(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Stop after the running job; queued jobs are cancelled."""
        if self._closed:
            return
        self.cancel()
        self._closed = True
        self._queue.put(None)
        if wait:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
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
