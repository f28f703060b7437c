"""Running a job's pieces on the cluster: a bounded number at a time, as they finish, with a
progress bar, and nothing left running when the job stops.

Every job has the same skeleton. It opens its output through
:mod:`deepcad_chunked.store.lifecycle` (the writer lock, the pins of its inputs, a new store or
the markers of the pieces an earlier run finished), plans its pieces and leaves out those
already done, runs the rest here, and finalises the store (completion flag last). A piece is a
pure function of its own arguments that writes its part of the output and leaves its marker
(``convert``'s slabs, the checks of a resumed conversion), or a dask collection that does the
same (``denoise``'s blocks of a ``map_overlap`` graph). Either way:

- at most ``in_flight`` pieces are on the cluster at a time, so the scheduler holds a bounded
  part of an arbitrarily long job while the workers never run dry;
- results come back as they finish (:func:`run_pieces`, :func:`compute_in_batches`);
- Ctrl-C, SIGTERM or an error cancels what is still running; finished pieces keep their
  markers, so the rerun resumes.

``follow`` schedules by latency instead (a task as soon as a block's frames exist) and
training is one task (:mod:`deepcad_chunked.jobs.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from distributed import Client, Future, as_completed

from deepcad_chunked.interrupt import check as check_interrupt


def default_in_flight(client: Client) -> int:
    """Pieces kept on the cluster: two per worker thread, so none waits for the driver."""
    return 2 * max(1, sum(client.nthreads().values()))


def run_pieces(client: Client, fn: Callable[..., Any], pieces: Iterable[Any], *,
               shared: Any, in_flight: int | None = None) -> Iterator[Any]:
    """Run ``fn(piece, job=shared)`` for every piece on the cluster, at most ``in_flight``
    at a time; yield the results as they finish.

    ``shared`` (the job's plan: sources, store, options) is sent to every worker once. On an
    error, an interrupt or an abandoned loop the pieces still running are cancelled.

    Parameters
    ----------
    client : distributed.Client
    fn : callable
        The per-piece function; pure except for what it writes (its part and its marker).
    pieces : iterable
        Consumed lazily.
    shared : object
        Picklable; given to every call as ``job``.
    in_flight : int, optional
        Default :func:`default_in_flight`.
    """
    limit = in_flight or default_in_flight(client)
    [job] = client.scatter([shared], broadcast=True, hash=False)
    source = iter(pieces)

    def submit() -> list[Future] | None:
        piece = next(source, None)
        return None if piece is None else [client.submit(fn, piece, job=job, pure=False)]

    return _as_they_finish(client, submit, limit)


def _as_they_finish(client: Client, submit: Callable[[], list[Future] | None],
                    in_flight: int) -> Iterator[Any]:
    """Results of what ``submit`` puts on the cluster, as they finish, calling it again
    whenever fewer than ``in_flight`` futures are unfinished (until it returns None)."""
    pending: as_completed = as_completed()
    live: set[Future] = set()

    def top_up() -> None:
        while len(live) < in_flight:
            futures = submit()
            if futures is None:
                return
            live.update(futures)
            pending.update(futures)

    try:
        top_up()
        for future in pending:
            check_interrupt()
            result = future.result()
            live.discard(future)
            future.release()
            top_up()
            yield result
    except BaseException:
        client.cancel(list(live))
        raise


def compute_in_batches(client: Client, batches: Iterable[Sequence[Any]], *,
                       in_flight: int) -> Iterator[Any]:
    """Compute batches of dask collections a few at a time; yield results as they finish.

    The next batch is built and submitted whenever fewer than ``in_flight`` of the submitted
    results are unfinished, so the scheduler (and the driver, if ``batches`` builds its graphs
    lazily) holds a bounded part of an arbitrarily long job while the workers never run dry.
    On an error, an interrupt or an abandoned loop the unfinished work is cancelled.

    Parameters
    ----------
    client : distributed.Client
    batches : iterable of sequences of dask collections
        Consumed lazily.
    in_flight : int
        Unfinished results below which another batch is submitted.
    """
    source = iter(batches)

    def submit() -> list[Future] | None:
        batch = next(source, None)
        return None if batch is None else client.compute(list(batch))

    return _as_they_finish(client, submit, in_flight)
