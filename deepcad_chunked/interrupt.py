"""A Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside a
finaliser or a callback (dask futures release themselves in ``__del__``, distributed watches
the garbage collector), the exception is printed as "ignored", with a traceback, and the
command runs on. The command's handler also records the request, the long loops
(:func:`check` between results, between training steps) stop on it, and such a swallowed
KeyboardInterrupt is not printed.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

#: Set once the user asked to stop.
REQUESTED = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    REQUESTED.set()
    raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return  # recorded in REQUESTED: the next check() stops the command
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Handle SIGINT in this process (call from the main thread)."""
    signal.signal(signal.SIGINT, _handler)
    sys.unraisablehook = _unraisable


def check() -> None:
    """Raise KeyboardInterrupt if the user asked to stop and it was swallowed somewhere."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
