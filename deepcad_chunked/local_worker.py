"""Set-up of the worker processes of a local cluster (a dask preload module).

A Ctrl-C in a terminal reaches every process of the command's process group: the command
itself, which stops the job and says how to resume, and its local workers, which would each
die with a traceback of their own. The workers ignore it; the command closes them.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by distributed in each worker process as it starts."""
    # (ValueError: not the main thread of its process, i.e. a worker inside the command)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
