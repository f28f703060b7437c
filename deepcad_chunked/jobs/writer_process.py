"""Running an export's writer in a process of its own.

HDF5 (behind the HDF5 and NWB exports) cannot recover from a write that fails: once its
metadata cache could not be flushed — a disk that filled between two checks, a quota, a
network filesystem that went away — closing the file fails too, and the objects it leaves
half-closed crash the interpreter (a segmentation fault) when they are freed, whatever the
caller does. The writer therefore runs in a child process that reads the store itself and
reports its progress; a crash ends only the child, and the command still says in one line what
happened, removes its temporary file and releases its lock.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepcad_chunked import interrupt
from deepcad_chunked.errors import DeepCADError, StoreError
from deepcad_chunked.store.recording import Recording

#: Seconds between two looks at the child while it runs.
POLL_S = 0.2


def write_in_child(format_name: str, rec: Recording,
                   slabs: Callable[[Recording, Callable[[int], None]], Iterator[np.ndarray]],
                   partials: list[Path], member: str | None, report: Callable[[int], None],
                   died: Callable[[int | None], str]) -> None:
    """Write ``rec`` with the format ``format_name`` in a child process.

    Parameters
    ----------
    format_name : str
        The export format (its writer is looked up in the child).
    rec : Recording
        The store, opened (and read again) in the child.
    slabs : callable
        ``slabs(rec, report)``: the recording's slabs as the writer takes them, reporting
        the frames of each (a module-level function: it is sent to the child).
    partials : list of Path
        The temporary files the writer writes.
    member : str, optional
        The dataset or series named in the output.
    report : callable
        Called here with the frames the child has written.
    died : callable
        Called with the child's exit code when it ended without a word; returns why, in
        words, for the error.

    Raises
    ------
    DeepCADError, OSError
        What the writer raised in the child; :class:`StoreError` when it died.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_child, args=(format_name, rec, slabs, partials, member,
                                                 messages), daemon=True,
                            name="deepcad-chunked-writer")
    child.start()
    try:
        while True:
            try:
                kind, value = messages.get(timeout=POLL_S)
            except queue.Empty:
                interrupt.check()
                if not child.is_alive():
                    raise StoreError(died(child.exitcode)) from None
                continue
            if kind == "frames":
                report(value)
            elif kind == "error":
                raise value
            else:
                break
        child.join()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        messages.close()
        messages.join_thread()


def _child(format_name: str, rec: Recording,
           slabs: Callable[[Recording, Callable[[int], None]], Iterator[np.ndarray]],
           partials: list[Path], member: str | None, messages: Any) -> None:
    """The child: write, reporting frames, then ``done`` or the error."""
    from deepcad_chunked.local_worker import thread_lock_for_blosc
    from deepcad_chunked.sources.registry import format_named

    for sig in (signal.SIGINT, signal.SIGTERM):  # the command stops the child itself
        signal.signal(sig, signal.SIG_IGN)
    thread_lock_for_blosc()
    fmt = format_named(format_name)
    assert fmt.write is not None
    try:
        fmt.write(rec, slabs(rec, lambda n: messages.put(("frames", n))), partials, member)
    except (DeepCADError, OSError) as exc:
        messages.put(("error", _portable(exc)))
        return
    except BaseException as exc:  # a bug: its type and text, as the command reports bugs
        messages.put(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    messages.put(("done", None))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a StoreError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return StoreError(str(exc))
    return exc
