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


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (call from the main thread)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    sys.unraisablehook = _unraisable


def received() -> int:
    """The first stop signal received (SIGINT when none was: a KeyboardInterrupt raised
    some other way)."""
    return _received[0] if _received else int(signal.SIGINT)


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for and it was swallowed somewhere."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
