"""A static file server on 127.0.0.1 that answers ``Range: bytes=a-b`` requests (206).

Usage: python range_server.py FOLDER RANGES_LOG [--no-ranges]

Prints its port on the first line of standard output, then serves FOLDER until terminated,
appending each range it serves (``start-stop``) to RANGES_LOG. ``--no-ranges`` serves whole
files only, as servers that ignore ``Range`` do.
"""

from __future__ import annotations

import http.server
import re
import sys
from functools import partial
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder's files, a byte range of them when asked."""

    log_path: Path
    ranges = True
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not self.ranges or not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(match[1])
        stop = min(size - 1, int(match[2])) if match[2] else size - 1
        if start > stop:
            self.send_error(416, "range not satisfiable")
            return None
        fh = open(path, "rb")  # noqa: SIM115 (closed by do_GET once copied)
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop}/{size}")
        self.send_header("Content-Length", str(stop - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with open(self.log_path, "a") as log:
            log.write(f"{start}-{stop}\n")
        return _Limited(fh, stop - start + 1)


class _Limited:
    """A file read up to ``left`` bytes (what ``copyfile`` sends of a range)."""

    def __init__(self, fh, left: int) -> None:  # type: ignore[no-untyped-def]
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # several workers open connections at once


def main() -> None:
    folder, log = sys.argv[1], Path(sys.argv[2])
    handler = type("Handler", (RangeHandler,), {"log_path": log,
                                                "ranges": "--no-ranges" not in sys.argv})
    server = Server(("127.0.0.1", 0), partial(handler, directory=folder))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
