"""What every stage entry point shares: logging set up once, user errors as one line, clean stops.

Exit status: 0 done, 1 an error the user can act on (``error: <one line>``), 128 + the signal's
number when stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129). A signal becomes an exception,
so the ``finally`` clauses of :mod:`fmnist.fileio` remove whatever was being written.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from .errors import PipelineError, Terminated
from .fileio import os_reason

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT already raises KeyboardInterrupt


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _install_handlers() -> dict[int, object]:
    """Make each stop signal raise :class:`Terminated`; return the handlers it replaced."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # only the main thread may set handlers (and only it runs them)
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:  # an ignored signal (nohup) stays ignored
            previous[sig] = signal.signal(sig, _raise_terminated)
    return previous


def _describe(e: OSError) -> str:
    """``<file>: <what the system said>`` on one line, e.g. ``models/m.pt: Permission denied``."""
    reason = os_reason(e)
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    return reason if e.filename is None else f"{e.filename}: {reason}"


def _stop(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main``: errors become one line and exit status 1, signals a clean stop (see module doc)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    previous = _install_handlers()
    try:
        main()
    except PipelineError as e:
        _stop(f"error: {e}", 1)
    except OSError as e:  # a file-system error that no module turned into a PipelineError
        _stop(f"error: {_describe(e)}", 1)
    except KeyboardInterrupt:
        _stop("interrupted (SIGINT)", 128 + signal.SIGINT)
    except Terminated as e:
        _stop(f"interrupted ({signal.Signals(e.signum).name})", 128 + e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
