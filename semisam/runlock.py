"""One training run per output folder: an OS file lock that dies with its process.

Two ``semisam train`` runs (CLI, headless script or the Slicer module) started into the same
folder would interleave their ``metrics.jsonl`` records and overwrite each other's
checkpoints. The first run holds an exclusive lock on ``<output>/.semisam-run.lock`` (``fcntl``
on POSIX, ``msvcrt`` on Windows) for as long as it runs; a second one is refused with the
first one's pid. The operating system releases the lock when its process ends in any way
(kill -9 included), so a lock file left behind by a killed run is simply taken over and
``--resume`` works.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import IO, Optional

from .errors import SemiSAMError

LOCK_NAME = ".semisam-run.lock"
_WIN_OFFSET = 1 << 20  # Windows locks a byte range: lock one byte far past the text we write


class RunLocked(SemiSAMError):
    """Another live run holds the output folder."""


def _try_lock(fh: IO[str]) -> bool:
    try:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            fh.seek(_WIN_OFFSET)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class RunLock:
    """``with RunLock(folder):`` holds the folder for this process; raises :class:`RunLocked`
    naming the other run's pid when a live run holds it. ``previous`` is what a dead run left
    in the lock file (None when there was nothing)."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fh: Optional[IO[str]] = None
        self.previous: Optional[str] = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        if not _try_lock(fh):
            fh.seek(0)
            other = fh.read().strip() or "a process that has not written its pid yet"
            fh.close()
            raise RunLocked(
                f"{self.folder} is being written by another training run ({other}); "
                "wait for it to finish or stop it, or choose another output folder"
            )
        fh.seek(0)
        self.previous = fh.read().strip() or None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.seek(0)
            fh.truncate()  # an empty file: nobody holds it (the lock goes with the close)
            fh.flush()
        finally:
            fh.close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
