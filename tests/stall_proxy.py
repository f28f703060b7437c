"""A TCP proxy on loopback that forwards to a real server until told to stall.

Stalled, it keeps every connection open and accepts new ones, but passes no byte either way:
what a client sees when an object store stops answering mid-transfer (a hung gateway, a
dropped route). Resumed, it forwards again. It runs its own event loop on a thread of the
test process; the commands under test are separate processes that connect to it.
"""

from __future__ import annotations

import asyncio
import socket
import threading


class StallingProxy:
    """Forward ``127.0.0.1:port`` to ``target`` (host, port); :meth:`stall` and
    :meth:`resume` switch it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._open = threading.Event()
        self._open.set()
        self._loop = asyncio.new_event_loop()
        self._gate: asyncio.Event | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        """Stop passing bytes, on open connections and new ones."""
        self._loop.call_soon_threadsafe(self._gate.clear)  # type: ignore[union-attr]

    def resume(self) -> None:
        """Pass bytes again."""
        self._loop.call_soon_threadsafe(self._gate.set)  # type: ignore[union-attr]

    def close(self) -> None:
        """Stop the proxy and its thread, closing every connection."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._gate = asyncio.Event()
        self._gate.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._gate is not None
        await self._gate.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._gate is not None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._gate.wait()  # stalled: hold the bytes, answer nothing
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
