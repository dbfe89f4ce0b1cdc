"""What every stage entry point shares: logging set up once, user errors as one line, clean stops.

Exit status: 0 done, 1 an error the user can act on (``error: <one line>``, details in :func:`error_log`),
128 + the signal's number when stopped by SIGINT, SIGTERM or SIGHUP: a signal becomes an exception,
so the ``finally`` clauses of :mod:`fmnist.fileio` remove whatever was being written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from .errors import PipelineError, Terminated
from .fileio import os_reason

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT already raises KeyboardInterrupt
NONDETERMINISTIC = "does not have a deterministic implementation"  # PyTorch's words, under deterministic mode


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _describe(e: OSError) -> str:
    """``<file>: <what the system said>`` on one line, e.g. ``models/m.pt: Permission denied``."""
    reason = os_reason(e)
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    return reason if e.filename is None else f"{e.filename}: {reason}"


def error_log() -> Path:
    """Where the last error's full traceback is kept: the user's state folder (XDG), outside any checkout."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fmnist" / "last-error.log"


def _details(e: BaseException) -> str:
    """``e``'s traceback with every exception behind it, those a one-line error hides (``from None``) included."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return "".join("".join(traceback.format_exception(x, chain=False)) for x in reversed(chain))


def _stop(message: str, status: int, quiet: bool = False, error: BaseException | None = None) -> None:
    """Print the one line and exit; an error's full story goes to :func:`error_log`, and to stderr under
    ``FMNIST_VERBOSE=1``."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
    if error is not None:
        details = f"{' '.join(sys.argv)}\n{message}\n\n{_details(error)}"
        if os.environ.get("FMNIST_VERBOSE", "") not in ("", "0"):
            print(details, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # the line is printed; the log is a courtesy
            error_log().parent.mkdir(parents=True, exist_ok=True)
            error_log().write_text(details, encoding="utf-8")
    sys.exit(status)


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main``: errors become one line and exit status 1, signals a clean stop (see module doc)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    previous = {}  # the handlers replaced, put back at the end
    if threading.current_thread() is threading.main_thread():  # only it may set handlers (and only it runs them)
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:  # an ignored signal (nohup) stays ignored
                previous[sig] = signal.signal(sig, _raise_terminated)
    launched = "RANK" in os.environ  # one of a launcher's processes: the launcher reports the stop, once
    try:
        main()
    except PipelineError as e:
        _stop(f"error: {e}", 1, error=e)
    except OSError as e:  # a file-system error that no module turned into a PipelineError
        _stop(f"error: {_describe(e)}", 1, error=e)
    except RuntimeError as e:  # PyTorch refusing an operation that would break the same-bits promise
        if NONDETERMINISTIC not in str(e):
            raise
        op = str(e).split(NONDETERMINISTIC)[0].strip()
        _stop(f"error: {op} has no deterministic implementation in PyTorch on this device, so the run could "
              "not give the same bits twice: it is refused", 1, error=e)
    except KeyboardInterrupt:
        _stop("interrupted (SIGINT)", 128 + signal.SIGINT, quiet=launched)
    except Terminated as e:
        _stop(f"interrupted ({signal.Signals(e.signum).name})", 128 + e.signum, quiet=launched)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
