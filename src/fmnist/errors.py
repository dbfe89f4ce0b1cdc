"""Errors a user can act on: each carries one line that names the file or key and what is wrong."""

from __future__ import annotations

import os


class PipelineError(Exception):
    """A problem with the user's parameters, data or environment, reported as one line, no traceback."""


class ParamsError(PipelineError):
    """A value in params.yaml that is unknown, of the wrong type or out of range."""


class DataError(PipelineError):
    """A data file that is missing, corrupt or not what the stage expects."""


class SourceError(PipelineError):
    """A download source (mirror or official location) that cannot provide a file."""


class OutputError(PipelineError):
    """An output that cannot be written: disk full, permission denied, read-only folder, file too large."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: cannot write ({reason})")


class Terminated(BaseException):
    """Stopped by a signal (SIGTERM, SIGHUP): a ``BaseException``, like ``KeyboardInterrupt``, so that
    ``except Exception`` lets it through and only ``finally`` clauses (removing staged outputs) run."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


def first_line(e: BaseException) -> str:
    """``e``'s message reduced to what one line of an error can hold: its first line, else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
