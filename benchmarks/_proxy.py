"""A TCP proxy that delays every byte by a fixed time in each direction: a long link on loopback.

How it works: for each connection accepted, the proxy connects upstream and runs one
pump per direction. A pump's reader stamps each piece it reads with ``now + delay``
and queues it; its writer sends the pieces in order, each once its time has come, and
waits for the socket to drain. So every byte arrives `delay` seconds late (more only
if the receiver is slower than the sender), order is kept, and bandwidth is not
limited. The queue is bounded in bytes (the reader pauses while it is full), so a
slow receiver pushes back on the sender as over a real link, and memory stays
bounded. When either side closes, both connections of the pair close.

Run: ``python benchmarks/_proxy.py --upstream tcp://127.0.0.1:PORT --delay 0.025``.
It prints ``READY {"url": ..., "pid": ...}`` with the address to connect to instead
of the upstream, then runs until SIGTERM/SIGINT or until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections import deque

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import emit

__all__ = ["main"]

_READ = 256 * 1024  # bytes per read
_QUEUE_LIMIT = 64 * 1024 * 1024  # bytes held per direction before the reader pauses


class _Pump:
    """One direction of one connection: read, hold for `delay`, write in order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.has_room.wait()
            data = await self.reader.read(_READ)
            self.queue.append((loop.time() + self.delay, data))
            self.queued += len(data)
            if self.queued >= _QUEUE_LIMIT:
                self.has_room.clear()
            self.has_data.set()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.has_data.clear()
                await self.has_data.wait()
            due, data = self.queue.popleft()
            self.queued -= len(data)
            if self.queued < _QUEUE_LIMIT:
                self.has_room.set()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                return
            self.writer.write(data)
            await self.writer.drain()


async def _pair(
    down_r: asyncio.StreamReader,
    down_w: asyncio.StreamWriter,
    host: str,
    port: int,
    delay: float,
) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
    except (OSError, asyncio.TimeoutError):
        down_w.close()
        return
    pumps = [_Pump(down_r, up_w, delay), _Pump(up_r, down_w, delay)]
    tasks = [asyncio.ensure_future(c) for p in pumps for c in (p.read(), p.write())]
    try:
        # The first task to end (EOF or a reset) ends the pair.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (up_w, down_w):
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)


async def _stdin_closed() -> None:
    """Returns when the parent closes our stdin (or it was never open)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def _serve(upstream: str, delay: float) -> None:
    host, _, port = upstream.removeprefix("tcp://").rpartition(":")
    conns: set[asyncio.Task[None]] = set()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conns.add(task)
        try:
            await _pair(r, w, host, int(port), delay)
        finally:
            conns.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    eof = asyncio.ensure_future(_stdin_closed())
    eof.add_done_callback(lambda _: stop.set())
    sockname = server.sockets[0].getsockname()
    emit("READY", {"url": f"tcp://{sockname[0]}:{sockname[1]}", "pid": os.getpid()})
    try:
        await stop.wait()
    finally:
        server.close()
        for t in list(conns):
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--upstream", required=True, help="tcp://HOST:PORT to forward to")
    p.add_argument("--delay", type=float, required=True, help="one-way delay, seconds")
    args = p.parse_args(argv)
    if args.delay < 0:
        p.error("--delay must be >= 0")
    # The stdin reader runs in the default executor; do not wait for it at exit.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_serve(args.upstream, args.delay))
    finally:
        loop.close()
    os._exit(0)  # the executor thread may still block on stdin: skip joining it


if __name__ == "__main__":
    raise SystemExit(main())
