"""What every stage entry point shares: logging set up once, and user errors as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import PipelineError


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main``; a :class:`PipelineError` becomes ``error: <one line>`` and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
