"""HDF5 and NWB files read over HTTP(S) by range requests (DANDI assets, lab web servers).

Only the bytes the reader asks for are fetched (remfile, in chunks it caches), so a remote
recording is converted without downloading it first. The server must answer ``Range``
requests (DANDI's S3 buckets and any static file server do).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from deepcad_chunked.config import RemoteConfig
from deepcad_chunked.errors import SourceError
from deepcad_chunked.sources.reader import FileState, require

#: The URL schemes read by range requests.
SCHEMES = ("http://", "https://")
#: Bytes hashed at each end of a remote file for its identity.
SAMPLE_BYTES = 65536


def _limits() -> RemoteConfig:
    return RemoteConfig.from_environment()


def is_http(text: str) -> bool:
    """Whether a source is an ``http(s)://`` URL (read by range requests)."""
    return text[:8].lower().startswith(SCHEMES)


def _request(url: str, *, method: str = "GET", byte_range: tuple[int, int] | None = None
             ) -> tuple[dict[str, str], bytes]:
    """One request, retried with backoff on a network failure or a timeout (never on an
    HTTP error), within the limits of :class:`~deepcad_chunked.config.RemoteConfig`."""
    headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    limits = _limits()
    for attempt in range(limits.attempts):
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=limits.read_timeout_s) as response:
                if byte_range and response.status != 206:
                    raise SourceError(f"{url}: the server does not answer range requests (HTTP "
                                      f"{response.status}); download the file and read it "
                                      "locally")
                return dict(response.headers), response.read() if method == "GET" else b""
        except urllib.error.HTTPError as exc:
            raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt + 1 < limits.attempts:
                time.sleep(min(0.5 * 2**attempt, 5))
                continue
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"{url} cannot be reached ({reason}; {limits.attempts} "
                              f"attempt(s) of {limits.read_timeout_s:g} s each)") from None
    raise AssertionError("unreachable")


def url_state(url: str) -> FileState:
    """A remote file's size, modification time and a digest of its ends (``ino = -1``).

    Raises
    ------
    SourceError
        When the server cannot be reached, answers with an error, or ignores ``Range``.
    """
    headers, _ = _request(url, method="HEAD")
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        size = int(lowered["content-length"])
    except (KeyError, ValueError):
        raise SourceError(f"{url}: the server does not say the file's size") from None
    modified = lowered.get("last-modified")
    mtime_ns = 0
    if modified:
        try:
            mtime_ns = int(email.utils.parsedate_to_datetime(modified).timestamp() * 1e9)
        except (TypeError, ValueError):
            mtime_ns = 0
    digest = hashlib.sha256()
    if size:
        _, head = _request(url, byte_range=(0, min(size, SAMPLE_BYTES) - 1))
        _, tail = _request(url, byte_range=(max(0, size - SAMPLE_BYTES), size - 1))
        digest.update(head)
        digest.update(tail)
    return FileState(size=size, mtime_ns=mtime_ns, ino=-1, ctime_ns=0,
                     sample=digest.hexdigest())


#: The first bytes of an HDF5 file (its superblock signature).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def holds_hdf5(url: str) -> bool:
    """Whether the file at ``url`` starts as an HDF5 file does (one range request).

    Raises
    ------
    SourceError
        When the server cannot be reached or answers with an error.
    """
    _, head = _request(url, byte_range=(0, len(HDF5_SIGNATURE) - 1))
    return head == HDF5_SIGNATURE


def open_url(url: str, *, size: int | None = None) -> Any:
    """A file-like object over ``url`` that reads by range requests, for h5py (``size``:
    the file's, when known, saves the request that asks for it).

    Raises
    ------
    SourceError
        When remfile (the ``nwb`` extra) is not installed.
    """
    remfile = require("remfile", "nwb", "reading files over HTTP")
    # remfile retries a failed read 8 times with backoff: bounded like every other request
    # (its retry count is a module variable it reads at each read)
    with contextlib.suppress(KeyError, AttributeError):
        sys.modules["remfile.RemFile"]._num_request_retries = _limits().attempts - 1
    handle = remfile.File(url, _size=size) if size else remfile.File(url)
    if getattr(handle, "session", None) is not None:  # its reads go through this session
        handle.session = _session()
    return handle


def _session() -> Any:
    """A requests session whose requests give up after the connect and read timeouts
    (requests waits for ever by default: a stalled server would hang a worker; remfile
    retries a request that timed out, then fails the read)."""
    import requests

    limits = _limits()

    class _Session(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", (limits.connect_timeout_s, limits.read_timeout_s))
            return super().request(*args, **kwargs)

    return _Session()
