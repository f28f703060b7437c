"""A Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside a
finaliser or a callback (dask futures release themselves in ``__del__``), the exception is
printed as "ignored" and the command runs on. The command's handler also records the request,
and the long loops (:func:`check` between results, between training steps) stop on it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

#: Set once the user asked to stop.
REQUESTED = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    REQUESTED.set()
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT in this process (call from the main thread)."""
    signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if the user asked to stop and it was swallowed somewhere."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
