"""The site of server.py, written for asyncio: the same protocol, an ``objdl.aio.Cell``.

It interoperates with the threaded server (and threaded sites) through the same
broker. Each round: await the server's ref, download the global model with
``await objdl.aio.download_dict(...)``, make the local update, offer it from this cell
(producers run on the cell's handler threads, never on the loop) and tell the server.

    python examples/federation/aio_site.py --broker tcp://127.0.0.1:8002 --name site-2

Exit status: 0 after the last round, 1 if a round failed or timed out, 2 bad input
or no broker, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from objdl import aio
from objdl.errors import ObjdlError
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import new_transaction, offer_dict


def _threaded_site() -> Any:
    """site.py beside this file (by path: ``site`` is also a standard module's name)."""
    path = Path(__file__).with_name("site.py")
    spec = importlib.util.spec_from_file_location("objdl_example_site", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The protocol, the options and the 'training' step are the threaded site's.
_site = _threaded_site()
CHANNEL, SiteError, local_update, parse_args = (
    _site.CHANNEL,
    _site.SiteError,
    _site.local_update,
    _site.parse_args,
)

RC = MessageHeaderKey.RETURN_CODE


async def join(cell: aio.Cell, server: str, deadline: float) -> int:
    """Tell the server we are here (it may start after us); return its number of rounds."""
    while True:
        reply = await cell.send_request(CHANNEL, server, "join", Message(), 5.0, optional=True)
        rc = reply.get_header(RC)
        if rc == ReturnCode.OK and isinstance(reply.payload, dict):
            return int(reply.payload["rounds"])
        if rc not in (ReturnCode.TARGET_UNREACHABLE, ReturnCode.TIMEOUT, ReturnCode.COMM_ERROR):
            raise SiteError(f"the server refused the join: {rc}")
        if time.monotonic() > deadline:
            raise SiteError(f"no server {server!r} answered in time ({rc})")
        await asyncio.sleep(0.2)


async def run(args: Any) -> int:
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def on_round(req: Message) -> None:  # async handlers run on the loop
        await inbox.put(req.payload)

    async def on_done(req: Message) -> None:
        await inbox.put(None)

    async def next_message() -> Any:
        try:
            return await asyncio.wait_for(inbox.get(), args.timeout)
        except asyncio.TimeoutError:
            raise SiteError("no word from the server in time") from None

    try:
        cell = aio.Cell(args.name, args.broker)
    except ValueError as exc:
        print(f"site: error: {exc}", file=sys.stderr)
        return 2
    cell.register_request_cb(CHANNEL, "round", on_round)
    cell.register_request_cb(CHANNEL, "done", on_done)
    try:
        await cell.start()
    except ObjdlError as exc:
        print(f"site: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(zlib.crc32(args.name.encode()))
    try:
        rounds = await join(cell, args.server, time.monotonic() + args.timeout)
        print(f"{args.name}: joined {args.server} for {rounds} rounds (asyncio)", flush=True)
        for _ in range(rounds):
            job = await next_message()
            if job is None:
                return 0  # the server stopped early
            t0 = time.monotonic()
            try:
                model = await aio.download_dict(
                    cell, args.server, job["ref"], overall_timeout=args.timeout
                )
            except aio.DownloadError as exc:
                raise SiteError(f"round {job['round']}: {exc}") from None
            t1 = time.monotonic()
            update = await asyncio.to_thread(local_update, model, rng, args.lr)
            t2 = time.monotonic()
            tx = new_transaction(
                cell, timeout=args.timeout, sites=[args.server], allowed_sites=[args.server]
            )
            ref = offer_dict(cell, update, transaction_id=tx)
            note = Message(payload={"round": job["round"], "ref": ref})
            reply = await cell.send_request(CHANNEL, args.server, "update", note, 10.0)
            if reply.get_header(RC) != ReturnCode.OK:
                raise SiteError(f"round {job['round']}: the server did not take the update")
            print(
                f"{args.name}: round {job['round']}: model in {t1 - t0:.2f}s, "
                f"local step {t2 - t1:.2f}s",
                flush=True,
            )
        if await next_message() is not None:
            raise SiteError("expected 'done' from the server after the last round")
        return 0
    except SiteError as exc:
        print(f"{args.name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        await cell.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await run(args)
        except asyncio.CancelledError:
            return 130

    return asyncio.run(guarded())


if __name__ == "__main__":
    raise SystemExit(main())
