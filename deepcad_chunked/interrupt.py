"""A Ctrl-C (or a SIGTERM) that is not lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside a
finaliser or a callback (dask futures release themselves in ``__del__``, distributed watches
the garbage collector), the exception is printed as "ignored", with a traceback, and the
command runs on. The command's handler also records the request, the long loops
(:func:`check` between results, between training steps) stop on it, and such a swallowed
KeyboardInterrupt is not printed.

SIGTERM — what ``kill`` sends by default, and what batch systems send at ``scancel`` or at the
end of a job's walltime — is the same request: the command stops as after a Ctrl-C, leaves
its outputs resumable and says how to resume.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

#: Set once the user (or the batch system) asked to stop.
REQUESTED = threading.Event()
#: The signals handled, and the one received.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    REQUESTED.set()
    raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return  # recorded in REQUESTED: the next check() stops the command
    sys.__unraisablehook__(unraisable)


class CancelRace(logging.Filter):
    """Drops tornado's report of distributed's failed cancel of an interrupted call.

    A Ctrl-C that lands in ``distributed.utils.sync`` before the call it waits for has started
    makes its cancel callback read a variable not yet set; tornado then logs the NameError,
    with a traceback, to the terminal. Nothing is left running (the call never started) and
    the command reports the interrupt itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (REQUESTED.is_set() and isinstance(error, NameError)
                    and "'future'" in str(error))


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (call from the main thread)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    sys.unraisablehook = _unraisable
    target = logging.getLogger("tornado.application")
    if not any(isinstance(f, CancelRace) for f in target.filters):
        target.addFilter(CancelRace())


def received() -> int:
    """The first stop signal received (SIGINT when none was: a KeyboardInterrupt raised
    some other way)."""
    return _received[0] if _received else int(signal.SIGINT)


def request() -> None:
    """Ask the job running in this process to stop, as a Ctrl-C would (a GUI's Cancel): its
    next :func:`check` raises KeyboardInterrupt in the thread that runs it."""
    REQUESTED.set()


def reset() -> None:
    """Forget an earlier stop request (before the next job of a long-lived process)."""
    REQUESTED.clear()
    _received.clear()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for and it was swallowed somewhere."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
