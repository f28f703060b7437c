"""Set-up of the worker processes of a local cluster (a dask preload module).

A Ctrl-C in a terminal reaches every process of the command's process group, and a batch
system's SIGTERM (``scancel``, the end of the walltime) every process of the job: the command
itself, which stops the job and says how to resume, and its local workers, which would each
die with a traceback of their own, or be killed mid-write and leave the multiprocessing
semaphores they hold behind. The workers ignore both; the command closes them.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by distributed in each worker process as it starts."""
    # (ValueError: not the main thread of its process, i.e. a worker inside the command)
    with contextlib.suppress(ValueError):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
