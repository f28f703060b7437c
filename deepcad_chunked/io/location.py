"""Where stores and files live: a local path, or an fsspec URL (``s3://``, ``gs://``, …).

Local paths stay :class:`pathlib.Path`. A URL becomes a :class:`RemotePath`, which offers the
few ``pathlib`` operations the store's life needs (``/``, ``exists``, ``iterdir``, ``glob``,
reading and writing whole objects, removal) on its fsspec filesystem, so the same code checks,
locks, resumes and finalises a store wherever it lives. ``file://`` URLs are local paths.

Credentials and endpoints come the usual way for each filesystem: for S3 the ``AWS_*``
variables (``AWS_ENDPOINT_URL`` included), ``~/.aws`` and fsspec's configuration. Object
stores have no folders and no rename, but a whole-object write is atomic: a marker or a
chunk is either there entirely or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from deepcad_chunked.errors import StoreError

#: Extras that bring each object store's fsspec filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(target: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://``."""
    text = str(target)
    return "://" in text and not text.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str) -> Any:
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(protocol)
        hint = (f"pip install 'deepcad-chunked[{extra}]'" if extra
                else f"install the fsspec filesystem for {protocol}://")
        raise StoreError(f"{protocol}:// needs a package that is not installed ({hint}): "
                         f"{str(exc).splitlines()[0][:120]}") from None
    # listings are never cached: other processes write the same store
    kwargs = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    return cls(**kwargs)


class RemotePath:
    """A file or folder on an fsspec filesystem, addressed like a :class:`pathlib.Path`.

    Parameters
    ----------
    url : str
        ``protocol://bucket/key…``.
    """

    def __init__(self, url: str) -> None:
        protocol, _, rest = url.partition("://")
        self.protocol = protocol
        self.key = rest.rstrip("/")
        if not self.key:
            raise StoreError(f"{url} names no bucket")

    # ----------------------------------------------------------------- naming
    @property
    def fs(self) -> Any:
        """The fsspec filesystem."""
        return _filesystem(self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self}/{name}")

    @property
    def name(self) -> str:
        """The last part of the key."""
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        """The name without its last suffix."""
        stem, _ = posixpath.splitext(self.name)
        return stem

    @property
    def parent(self) -> RemotePath:
        """The folder (key prefix) holding this one."""
        return RemotePath(f"{self.protocol}://{posixpath.dirname(self.key) or self.key}")

    @property
    def parents(self) -> list[RemotePath]:
        """Every enclosing prefix, nearest first."""
        out, key = [], self.key
        while "/" in key:
            key = posixpath.dirname(key)
            out.append(RemotePath(f"{self.protocol}://{key}"))
        return out

    def with_name(self, name: str) -> RemotePath:
        """A sibling called ``name``."""
        return self.parent / name

    def absolute(self) -> RemotePath:
        """Itself: a URL is absolute."""
        return self

    expanduser = absolute
    resolve = absolute

    # ----------------------------------------------------------------- queries
    def exists(self) -> bool:
        """An object, or a prefix with objects under it."""
        return bool(self.fs.exists(self.key))

    def is_dir(self) -> bool:
        """A prefix with objects under it."""
        return bool(self.fs.isdir(self.key))

    def is_file(self) -> bool:
        """An object."""
        return bool(self.fs.isfile(self.key))

    def is_symlink(self) -> bool:
        """Object stores have no links."""
        return False

    def iterdir(self) -> Iterator[RemotePath]:
        """The objects and prefixes directly under this prefix."""
        try:
            names = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter([RemotePath(f"{self.protocol}://{n.rstrip('/')}") for n in names
                     if n.rstrip("/") != self.key])

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Objects directly under this prefix whose names match ``pattern``."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def info(self) -> dict[str, Any]:
        """The object's size and version tags (ETag, modification time)."""
        return dict(self.fs.info(self.key))

    # ----------------------------------------------------------------- reading, writing
    def read_bytes(self) -> bytes:
        """The whole object."""
        return bytes(self.fs.cat_file(self.key))

    def read_text(self) -> str:
        """The whole object, as UTF-8."""
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        """Write the whole object (atomically: readers see the old or the new one)."""
        self.fs.pipe_file(self.key, data)
        return len(data)

    def write_text(self, text: str) -> int:
        """Write the whole object from UTF-8 text."""
        return self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        """Remove the object."""
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: prefixes exist when objects are written under them."""


StorePath = Union[Path, RemotePath]  # noqa: UP007 (a runtime alias)


def resolve(target: str | os.PathLike[str] | RemotePath) -> StorePath:
    """A local path (absolute, ``~`` expanded, ``file://`` removed) or a :class:`RemotePath`."""
    if isinstance(target, RemotePath):
        return target
    text = os.fspath(target)
    if is_url(text):
        return RemotePath(text)
    text = text.removeprefix("file://")
    return Path(text).expanduser().absolute()


#: Packages whose exceptions say that an object store could not be reached or used.
_SERVICE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec",
                    "urllib3", "requests")


def service_error(exc: BaseException) -> str | None:
    """One line for an exception of an object store's client (no endpoint, no credentials,
    access denied, …), or None for any other exception."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in _SERVICE_MODULES:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else cls.__name__
            return f"the object store could not be used ({text[:200]})"
    return None


def rmtree(path: StorePath) -> None:
    """Remove a folder (or prefix) and everything in it."""
    if isinstance(path, RemotePath):
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm(path.key, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def list_files(path: StorePath) -> list[tuple[str, int, str]]:
    """Every file (or object) under ``path``, sorted: its path relative to ``path``, its size,
    and a tag that changes when it is rewritten (its modification time, an object's ETag)."""
    if isinstance(path, RemotePath):
        try:
            found = path.fs.find(path.key, detail=True)
        except FileNotFoundError:
            return []
        prefix = f"{path.key}/"
        return sorted((key.removeprefix(prefix), int(entry.get("size") or 0),
                       str(entry.get("ETag") or entry.get("LastModified") or entry.get("mtime")))
                      for key, entry in found.items())
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # removed while listed
            files.append((os.path.relpath(full, path), st.st_size, str(st.st_mtime_ns)))
    return sorted(files)


def write_atomic(path: StorePath, data: bytes) -> None:
    """Write a whole file so that readers never see part of it: locally a temporary file
    renamed into place, on an object store one PUT."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def file_state(path: str | os.PathLike[str] | RemotePath) -> dict[str, Any]:
    """What changes when a file is rewritten: device, inode, size, modification and
    status-change times locally (the status-change time moves on every write, so a file
    rewritten and given back its old ``mtime`` still shows); size and version tags of an
    object."""
    path = resolve(path)
    if isinstance(path, RemotePath):
        try:
            info = path.info()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(path)) from None
        keep = ("size", "ETag", "LastModified", "VersionId", "generation", "mtime")
        return {k: str(info[k]) for k in keep if info.get(k) is not None}
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
