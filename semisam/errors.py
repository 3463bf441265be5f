"""Errors a user can act on.

Every error raised for bad input names the file (when there is one), says what is wrong and,
where it helps, what to do. The command line prints these messages without a traceback.
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class SemiSAMError(Exception):
    """A problem the user can fix (bad input, missing file, impossible request)."""


class InputError(SemiSAMError):
    """A file or folder that cannot be used as given.

    Args:
        path: the offending file or folder (``None`` for in-memory data).
        problem: what is wrong, in plain words.
        hint: what to do about it (optional).
    """

    def __init__(self, path: Optional[PathLike], problem: str, hint: Optional[str] = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.hint = hint
        where = f"{self.path}: " if self.path is not None else ""
        message = f"{where}{problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class OutputError(SemiSAMError):
    """An output location that cannot be written. Nothing was written when this is raised."""

    def __init__(self, path: PathLike, problem: str, hint: Optional[str] = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class Cancelled(SemiSAMError):
    """The caller's ``cancel()`` returned True; nothing was produced."""
