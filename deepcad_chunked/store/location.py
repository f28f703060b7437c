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
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

from deepcad_chunked.config import RemoteConfig
from deepcad_chunked.errors import ConfigError, StoreError

#: Extras that bring each object store's fsspec filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(target: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://``."""
    text = str(target)
    return "://" in text and not text.startswith("file://")


def apply_remote_limits(limits: RemoteConfig | None = None) -> RemoteConfig:
    """Bound every request of this process's fsspec filesystems (S3 and HTTP; also those
    zarr creates for a URL) by ``limits`` (default: :meth:`RemoteConfig.from_environment`).

    Values in the user's own fsspec configuration are kept. For S3, botocore makes one
    attempt per call and s3fs its ``attempts`` with backoff (its ``retries``, a class
    attribute, would otherwise try 5 times over botocore's own 5).

    Returns
    -------
    RemoteConfig
        The limits applied.
    """
    import fsspec.config

    limits = limits or RemoteConfig.from_environment()
    s3 = fsspec.config.conf.setdefault("s3", {})
    botocore = s3.setdefault("config_kwargs", {})
    botocore.setdefault("connect_timeout", limits.connect_timeout_s)
    botocore.setdefault("read_timeout", limits.read_timeout_s)
    botocore.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.retries = limits.attempts
    with contextlib.suppress(ImportError):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout_s,
                                        sock_read=limits.read_timeout_s)
        for protocol in ("http", "https"):
            web = fsspec.config.conf.setdefault(protocol, {})
            web.setdefault("client_kwargs", {}).setdefault("timeout", timeout)
    return limits


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
    fs = cls(**kwargs)
    return BoundedFileSystem(fs, protocol) if getattr(fs, "async_impl", False) else fs


#: Calls of an asynchronous fsspec filesystem that each make one request (retried within
#: the limits); listings of whole prefixes and recursive removals make any number.
_ONE_REQUEST = frozenset({"exists", "isdir", "isfile", "info", "cat_file", "pipe_file",
                          "rm_file", "call_s3", "ls"})


class BoundedFileSystem:
    """An asynchronous fsspec filesystem whose single-request calls end within
    :meth:`RemoteConfig.deadline_s` whatever the client does.

    The clients' own connect and read timeouts bound most requests, but a write caught by a
    server that stops answering at an unlucky moment has been seen to wait for ever; fsspec's
    ``timeout`` argument stops the wait (the request is left to its event loop). Every other
    attribute is the filesystem's own.

    Parameters
    ----------
    fs : fsspec.asyn.AsyncFileSystem
        The filesystem.
    protocol : str
        Its protocol, for messages.
    limits : RemoteConfig, optional
        Default: :meth:`RemoteConfig.from_environment` at each call.
    """

    def __init__(self, fs: Any, protocol: str, limits: RemoteConfig | None = None) -> None:
        self.fs = fs
        self.protocol = protocol
        self.limits = limits

    def __getattr__(self, name: str) -> Any:
        if name == "fs":  # not set yet (while copied)
            raise AttributeError(name)
        attr = getattr(self.fs, name)
        if name not in _ONE_REQUEST:
            return attr

        @functools.wraps(attr)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            from fsspec.exceptions import FSTimeoutError

            sent = sum(len(a) for a in (*args, *kwargs.values())
                       if isinstance(a, (bytes, bytearray, memoryview)))
            seconds = (self.limits or RemoteConfig.from_environment()).deadline_s(sent)
            try:
                return attr(*args, timeout=seconds, **kwargs)
            except FSTimeoutError:
                where = (f"{kwargs.get('Bucket')}/{kwargs['Key']}" if "Key" in kwargs
                         else next((a for a in args if isinstance(a, str)), ""))
                raise TimeoutError(f"{self.protocol}://{where}: no answer to {name} within "
                                   f"{seconds:g} s (timed out)") from None

        return bounded


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
        # "bucket//rec.zarr" is a typo for "bucket/rec.zarr", never a key with an empty part
        self.key = re.sub("/{2,}", "/", rest).strip("/")
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
_DENIED = ("forbidden", "accessdenied", "access denied", "invalidaccesskeyid",
           "signaturedoesnotmatch", "expiredtoken", "invalidtoken", "403")
_UNREACHABLE = ("could not connect", "cannot connect", "connection refused",
                "name or service not known", "endpointconnectionerror")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def service_error(exc: BaseException, urls: Sequence[str] = ()) -> str | None:
    """One line for a failure to use an object store or web server — it did not answer in
    time, refused the credentials, cannot be reached — naming ``urls`` (the command's
    stores and sources that are URLs), or None for any other exception.

    An exception of an object store's client package is always one; an ``OSError`` (s3fs
    translates the client's errors into them) only when the command uses URLs and the error
    names no local file.
    """
    chain = _chain(exc)
    ours = any(cls.__module__.split(".")[0] in _SERVICE_MODULES
               for e in chain for cls in type(e).__mro__)
    if not ours and not (urls and isinstance(exc, OSError) and not exc.filename):
        return None
    text = next((str(e).strip().splitlines()[0] for e in chain if str(e).strip()),
                type(exc).__name__)[:200]
    words = " ".join(f"{type(e).__name__} {e}" for e in chain).lower()
    where = ", ".join(dict.fromkeys(urls)) or "the object store"
    if "timeout" in words or "timed out" in words or any(
            isinstance(e, TimeoutError) for e in chain):
        limits = RemoteConfig.from_environment()
        return (f"{where}: the server stopped answering ({text}; {limits.attempts} attempt(s) "
                f"of {limits.read_timeout_s:g} s each); check the endpoint and the network, "
                "then rerun the command to resume (DEEPCAD_CHUNKED_READ_TIMEOUT and "
                "DEEPCAD_CHUNKED_ATTEMPTS set the limits)")
    if any(w in words for w in _DENIED) or any(isinstance(e, PermissionError) for e in chain):
        return (f"{where}: the object store refused access ({text}); check the credentials "
                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials) and that they may read and write there")
    if any(w in words for w in _UNREACHABLE):
        return (f"{where}: the object store cannot be reached ({text}); check the endpoint "
                "(AWS_ENDPOINT_URL) and the network")
    return f"{where}: the object store could not be used ({text})"


def local_folder(target: str | os.PathLike[str], what: str) -> Path:
    """``target`` as an absolute local path, or a one-line refusal of a URL where a command
    needs a local folder (a training run's checkpoints, a folder watched while written).

    Raises
    ------
    StoreError
    """
    if is_url(target):
        raise StoreError(f"{target}: {what} must be a local folder (the stores that convert "
                         "and denoise write may be URLs: convert SRC -o s3://bucket/rec.zarr)")
    return Path(os.fspath(target).removeprefix("file://")).expanduser().absolute()


def no_folder(folder: Path) -> str:
    """Why ``folder`` cannot hold an output, in words: it, or a folder above it, is a file,
    or it does not exist."""
    for part in (folder, *folder.parents):
        if part.exists():
            return (f"{part} is a file, not a folder" if not part.is_dir()
                    else f"folder {folder} does not exist")
    return f"folder {folder} does not exist"


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


with contextlib.suppress(ConfigError):  # a bad variable is reported by the command itself
    apply_remote_limits()
