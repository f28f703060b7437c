"""Progress bars of the jobs, on the terminal or reported to a caller (a GUI's progress bars).

Every job makes its bars with :func:`progress_bar`. Inside :func:`reporting`, in the same
thread, they print nothing and call the caller's function instead, with the stage's name, its
count and its total after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

#: What a reported bar calls: (stage, done, total).
Sink = Callable[[str, int, int], None]

_sink: ContextVar[Sink | None] = ContextVar("deepcad_chunked_progress", default=None)


class _Silent:
    """A file that keeps nothing (what a reported bar draws on)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class _Reported(tqdm):  # type: ignore[misc]
    """A bar that tells a :data:`Sink` where it stands instead of drawing itself."""

    def __init__(self, *args: Any, sink: Sink, **kwargs: Any) -> None:
        self._sink = sink
        super().__init__(*args, **kwargs)
        sink(str(self.desc), int(self.n), int(self.total or 0))

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._sink(str(self.desc), int(self.n), int(self.total or 0))
        return shown


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0,
                 progress: bool | None = None) -> tqdm:
    """A job's progress bar.

    Parameters
    ----------
    total : int
    desc : str
        The stage ("convert", "train", "denoise", …).
    unit : str
    initial : int
        Steps done before (a resumed job).
    progress : bool, optional
        Drawn on standard error: None when it is a terminal. Ignored inside
        :func:`reporting`.

    Returns
    -------
    tqdm
    """
    sink = _sink.get()
    if sink is not None:
        return _Reported(total=total, initial=initial, unit=unit, desc=desc, sink=sink,
                         file=_Silent(), mininterval=0, disable=False)
    return tqdm(total=total, initial=initial, unit=unit, desc=desc,
                disable=None if progress is None else not progress, dynamic_ncols=True)


@contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Within the block (in this thread), the jobs' bars call ``sink`` instead of drawing."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
