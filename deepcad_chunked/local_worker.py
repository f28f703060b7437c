"""Set-up of the worker processes of a local cluster (a dask preload module).

A Ctrl-C in a terminal reaches every process of the command's process group, and a batch
system's SIGTERM (``scancel``, the end of the walltime) every process of the job: the command
itself, which stops the job and says how to resume, and its local workers, which would each
die with a traceback of their own, or be killed mid-write and leave the multiprocessing
semaphores they hold behind. The workers ignore both; the command closes them.

A worker that has to be killed all the same (one waiting on an object store that stopped
answering) must not leave a semaphore behind either: Blosc's codec creates a
``multiprocessing.Lock`` for its in-process mutex, which the resource tracker the command
shares with its workers then reports as leaked. The workers give it a thread lock instead,
which serves the same purpose within one process and needs no tracking.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by distributed in each worker process as it starts."""
    # (ValueError: not the main thread of its process, i.e. a worker inside the command)
    with contextlib.suppress(ValueError):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    thread_lock_for_blosc()


def thread_lock_for_blosc() -> None:
    """Give Blosc's codec a thread lock for its in-process mutex instead of the
    ``multiprocessing.Lock`` it would create (see the module's text)."""
    with contextlib.suppress(ImportError, AttributeError):
        import numcodecs.blosc

        if not numcodecs.blosc._MUTEX_IS_INIT:
            numcodecs.blosc._MUTEX = threading.Lock()
            numcodecs.blosc._MUTEX_IS_INIT = True
