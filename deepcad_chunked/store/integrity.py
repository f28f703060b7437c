"""Reading a store so that damage is never read as data.

Zarr reads a chunk that is not there as the array's fill value, and Blosc decompresses a chunk
whose bytes were changed into other numbers without a word. Our stores guard against both:

- every chunk we write is complete on disk (``write_empty_chunks``), so in a *complete* store
  of ours a missing chunk (or shard) file is damage: :class:`CheckedStore` refuses it instead
  of handing zarr the fill value;
- the chunks of Zarr v3 stores carry a CRC-32C checksum (the ``crc32c`` codec after the
  compressor; a shard's index has its own), so changed or cut bytes fail to decode;
- :class:`CheckedArray` turns either failure into one :class:`~deepcad_chunked.errors.
  DamagedStoreError` line naming the store, the array and the frames, on whatever process
  reads it (a dask worker included: the error travels back to the command as it is).

:func:`verify` reads a whole store chunk row by chunk row (``info --verify``). Stores written
by other tools are read with checksum and decoding errors reported the same way, but a chunk
they left out is their fill value, as the Zarr specification allows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from deepcad_chunked.config import RemoteConfig
from deepcad_chunked.errors import DamagedStoreError
from deepcad_chunked.store.location import RemotePath, StorePath, is_url, resolve

log = logging.getLogger(__name__)

#: Keys of Zarr metadata (everything else under an array is a chunk or a shard).
_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
#: Words of the exceptions zarr's codecs raise for bytes that do not decode.
_DECODE_FAILURES = re.compile(r"checksum|blosc|decompress|zstd|lz4|zlib|gzip|cannot reshape|"
                              r"buffer (is )?too small|corrupt", re.IGNORECASE)


def _chunk_index(key: str) -> int | None:
    """The first (time) coordinate of a chunk key: ``c/3/0/0`` (v3), ``3/0/0`` or ``3.0.0``
    (v2); None for metadata keys."""
    name = key.rsplit("/", 1)[-1]
    if name in _METADATA:
        return None
    parts = re.split(r"[/.]", key.removeprefix("c/"))
    try:
        return int(parts[0])
    except (ValueError, IndexError):
        return None


def frames_of(index: int, unit: int, frames: int) -> str:
    """``a–b``: the frames of chunk (or shard) row ``index``."""
    start = index * unit
    return f"{start}–{min(frames, start + unit) - 1}"


class CheckedStore(WrapperStore[Any]):
    """A read-only store that refuses a missing chunk of a complete store of ours.

    Parameters
    ----------
    store : zarr Store
        The array's store (rooted at the array).
    label : str
        The store's path or URL, for messages.
    unit : int
        Frames per chunk key (a shard's, in a sharded array).
    frames : int
        The array's length along time.
    strict : bool
        Refuse missing chunks (a complete store of ours); otherwise only pass reads through.
    """

    def __init__(self, store: Any, *, label: str = "", unit: int = 1, frames: int = 0,
                 strict: bool = False) -> None:
        super().__init__(store)
        self.label, self.unit, self.frames, self.strict = label, unit, frames, strict

    def _with_store(self, store: Any) -> CheckedStore:
        return CheckedStore(store, label=self.label, unit=self.unit, frames=self.frames,
                            strict=self.strict)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None and self.strict:
            index = _chunk_index(key)
            if index is not None:
                raise DamagedStoreError(
                    missing_message(self.label, key, index, self.unit, self.frames),
                    detail=f"missing (no {key})")
        return value


def missing_message(label: str, key: str, index: int, unit: int, frames: int) -> str:
    """The one line for a chunk file of a complete store that is not there."""
    return (f"{label} is damaged: frames {frames_of(index, unit, frames)} of its array are "
            f"missing (no {key}); it cannot be trusted — write it again (convert or denoise "
            f"with --overwrite) or restore it from a copy (deepcad-chunked info --verify "
            f"lists every damaged chunk)")


def damaged_message(label: str, frames: str, why: str) -> str:
    """The one line for chunk bytes that do not decode."""
    return (f"{label} is damaged: frames {frames} of its array do not decode ({why}); it "
            f"cannot be trusted — write it again (convert or denoise with --overwrite) or "
            f"restore it from a copy (deepcad-chunked info --verify lists every damaged "
            f"chunk)")


class CheckedArray(zarr.Array):
    """A zarr array whose reads fail in one line, naming the frames, when chunks are missing
    or damaged (see the module's text). Everything else is :class:`zarr.Array`'s."""

    def __getitem__(self, selection: Any) -> Any:
        try:
            return super().__getitem__(selection)
        except DamagedStoreError:
            raise
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            if not _DECODE_FAILURES.search(str(exc)):
                raise
            why = _first_line(exc)
            raise DamagedStoreError(damaged_message(self._label, self._frames_read(selection),
                                                    why), detail=f"do not decode ({why})"
                                    ) from None

    @property
    def _label(self) -> str:
        store = self.store
        return store.label if isinstance(store, CheckedStore) else str(store)

    def _frames_read(self, selection: Any) -> str:
        """The frames a failed read asked for, narrowed to the first chunk row that fails."""
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        if not isinstance(first, slice):
            return "(some)"
        start, stop, _ = first.indices(self.shape[0])
        unit = (self.shards or self.chunks)[0]
        rest = selection[1:] if isinstance(selection, tuple) else ()
        for row in range(start // unit, -(-stop // unit)):
            a, b = max(start, row * unit), min(stop, (row + 1) * unit)
            try:
                super().__getitem__((slice(a, b), *rest))
            except (ValueError, RuntimeError, TypeError, OSError):
                return f"{a}–{b - 1}"
        return f"{start}–{stop - 1}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if text and "checksum" in text[0].lower():
        return "checksum mismatch: the bytes on disk are not those that were written"
    return text[0][:160] if text else type(exc).__name__


class BoundedStore(WrapperStore[Any]):
    """A remote store each of whose operations ends within a deadline.

    The object-store clients bound every request by their connect and read timeouts
    (:func:`~deepcad_chunked.store.location.apply_remote_limits`), but a request caught at an
    unlucky moment by a server that stops answering (between a PUT's headers and its body)
    has been seen to wait for ever all the same. Every operation here is given
    :meth:`RemoteConfig.deadline_s`, and then fails with a :class:`TimeoutError` that names
    the store.

    Parameters
    ----------
    store : zarr Store
        The remote store.
    url : str
        Its URL, for messages.
    limits : RemoteConfig, optional
        Default: :meth:`RemoteConfig.from_environment`.
    """

    def __init__(self, store: Any, *, url: str = "", limits: RemoteConfig | None = None
                 ) -> None:
        super().__init__(store)
        self.url = url
        self.limits = limits or RemoteConfig.from_environment()

    def _with_store(self, store: Any) -> BoundedStore:
        return BoundedStore(store, url=self.url, limits=self.limits)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def _bounded(self, what: str, key: str, operation: Any, nbytes: int = 0) -> Any:
        seconds = self.limits.deadline_s(nbytes)
        task = asyncio.ensure_future(operation)
        # not asyncio.wait_for: it waits for the cancelled request to wind down, which a
        # client stuck on a silent socket may never do
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            task.cancel()
            raise TimeoutError(f"{self.url}/{key}: no answer to a {what} within {seconds:g} s "
                               "(timed out)")
        return task.result()

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return await self._bounded("read", key, self._store.get(key, prototype, byte_range))

    async def set(self, key: str, value: Buffer) -> None:
        await self._bounded("write", key, self._store.set(key, value), len(value))

    async def exists(self, key: str) -> bool:
        return bool(await self._bounded("look-up", key, self._store.exists(key)))

    async def delete(self, key: str) -> None:
        await self._bounded("deletion", key, self._store.delete(key))


def remote_store(url: str, *, read_only: bool) -> BoundedStore:
    """A zarr store over an fsspec URL whose operations are bounded (:class:`BoundedStore`)."""
    return BoundedStore(FsspecStore.from_url(url, read_only=read_only), url=url)


def zarr_target(path: str | StorePath, *, read_only: bool) -> Any:
    """What to give zarr for ``path``: the path itself when local, a bounded store for a URL
    (:class:`BoundedStore`)."""
    text = str(path)
    return remote_store(text, read_only=read_only) if is_url(text) else text


def _base_store(url: StorePath) -> Any:
    if isinstance(url, RemotePath):
        return remote_store(str(url), read_only=True)
    return LocalStore(str(url), read_only=True)


def open_array(url: str | StorePath, *, strict: bool, label: str | None = None
               ) -> CheckedArray:
    """Open an array (the folder or URL holding its metadata) for reading, checked.

    Parameters
    ----------
    url : str, Path or RemotePath
        The array.
    strict : bool
        Refuse missing chunks: true for a complete store of ours.
    label : str, optional
        What messages call it (default: the store holding an array at path ``0``, else
        the array).

    Returns
    -------
    CheckedArray
    """
    where = resolve(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = zarr.open_array(store=_base_store(where), mode="r")
    if label is None:
        label = str(where.parent) if where.name == "0" else str(where)
    unit = int((plain.shards or plain.chunks)[0]) if plain.ndim else 1
    store = CheckedStore(plain.store, label=label, unit=unit,
                         frames=int(plain.shape[0]) if plain.ndim else 0, strict=strict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CheckedArray(zarr.open_array(store=store, mode="r")._async_array)


@dataclass(frozen=True)
class ArrayRef:
    """Where an array is and how to check it: small and picklable, opened where it is read
    (a training loader's worker, say)."""

    url: str
    strict: bool

    def open(self) -> CheckedArray:
        """The array, checked (:func:`open_array`)."""
        return open_array(self.url, strict=self.strict)


def has_checksums(array: zarr.Array) -> bool:
    """Whether each chunk of ``array`` carries a CRC-32C checksum (inside its shards, for a
    sharded array)."""
    codecs = array.metadata.to_dict().get("codecs") or []
    if codecs and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
        codecs = codecs[0].get("configuration", {}).get("codecs") or []
    return any(isinstance(c, dict) and c.get("name") == "crc32c" for c in codecs)


@dataclass(frozen=True)
class Damage:
    """One chunk row of a store that failed to read."""

    frames: str
    why: str


def verify(array: CheckedArray, *, threads: int = 4,
           progress: Callable[[int], None] | None = None) -> list[Damage]:
    """Read every chunk of an array; the rows (along time) that are missing or damaged.

    Parameters
    ----------
    array : CheckedArray
        Opened strict for a store of ours.
    threads : int
        Rows read at once.
    progress : callable, optional
        Called with the number of frames of each row read.

    Returns
    -------
    list of Damage
        Empty when every chunk is there and decodes.
    """
    unit = int((array.shards or array.chunks)[0])
    frames = int(array.shape[0])

    def check(row: int) -> Damage | None:
        a, b = row * unit, min(frames, (row + 1) * unit)
        try:
            np.asarray(array[a:b])
        except DamagedStoreError as exc:
            return Damage(f"{a}–{b - 1}", exc.detail)
        finally:
            if progress is not None:
                progress(b - a)
        return None

    rows: Iterable[int] = range(-(-frames // unit))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(check, rows))
    return [d for d in found if d is not None]
