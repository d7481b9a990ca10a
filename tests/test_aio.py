"""The asyncio cell against a real broker, alone and mixed with threaded cells."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker import Broker
from objdl import aio
from objdl.cell import Cell
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError
from objdl.message import Message, MessageHeaderKey, ReturnCode

pytestmark = pytest.mark.timeout(30)

RC = MessageHeaderKey.RETURN_CODE


def echo(req: Message) -> Message:
    return Message({"echoed": True}, req.payload)


def objdl_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("objdl-")}


def test_an_asyncio_client_asks_a_threaded_server(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    server = make_cell("server")
    server.register_request_cb("ch", "echo", echo)
    blob = bytes(range(256)) * 4096

    async def main() -> list[Message]:
        async with aio.Cell("site-1", broker.url) as cell:
            small = await cell.send_request("ch", "server", "echo", Message(payload=1), 5.0)
            big = await cell.send_request("ch", "server", "echo", Message(payload=blob), 5.0)
            return [small, big]

    small, big = asyncio.run(main())
    assert small.get_header(RC) == ReturnCode.OK and small.payload == 1
    assert small.get_header("echoed") is True
    assert small.get_header(MessageHeaderKey.ORIGIN) == "server"
    assert bytes(big.payload) == blob


def test_a_threaded_client_asks_an_asyncio_server_of_every_kind(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    site = make_cell("site-1")
    ran: dict[str, str] = {}
    served = threading.Event()
    stop = threading.Event()

    async def slow_echo(req: Message, tag: str) -> Message:
        await asyncio.sleep(0.01)
        ran["async"] = threading.current_thread().name
        return Message(payload=(tag, req.payload))

    def plain(req: Message) -> Message:
        ran["plain"] = threading.current_thread().name
        return Message(payload=req.payload)

    def quick(req: Message) -> Message:
        ran["inline"] = threading.current_thread().name
        return Message(payload=req.payload)

    async def serve() -> None:
        async with aio.Cell("server", broker.url) as cell:
            cell.register_request_cb("ch", "async", slow_echo, "t")
            cell.register_request_cb("ch", "plain", plain)
            cell.register_request_cb("ch", "inline", quick, inline=True)
            cell.register_request_cb("ch", "boom", lambda req: 1 / 0)
            served.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)

    t = threading.Thread(target=asyncio.run, args=(serve(),), name="loop")
    t.start()
    try:
        assert served.wait(10)
        r = site.send_request("ch", "server", "async", Message(payload=1), 5.0)
        assert r.get_header(RC) == ReturnCode.OK and r.payload == ["t", 1]
        assert site.send_request("ch", "server", "plain", Message(payload=2), 5.0).payload == 2
        assert site.send_request("ch", "server", "inline", Message(payload=3), 5.0).payload == 3
        r = site.send_request("ch", "server", "boom", Message(), 5.0)
        assert r.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
        r = site.send_request("ch", "server", "nothing", Message(), 5.0)
        assert r.get_header(RC) == ReturnCode.INVALID_REQUEST
    finally:
        stop.set()
        t.join(10)
    assert ran["async"] == "loop" and ran["inline"] == "loop"
    assert ran["plain"].startswith("objdl-server-handler-")


def test_return_codes_and_a_concurrent_broadcast(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    for name in ("a", "b", "c"):
        make_cell(name).register_request_cb("ch", "slow", lambda req: time.sleep(0.3))
    make_cell("mute").register_request_cb("ch", "slow", lambda req: time.sleep(3))

    async def main() -> tuple[Any, ...]:
        async with aio.Cell("site-1", broker.url) as cell:
            gone = await cell.send_request("ch", "nobody", "x", Message(), 5.0)
            t0 = time.monotonic()
            many = await cell.broadcast_request("ch", "slow", ["a", "b", "c"], Message(), 5.0)
            took = time.monotonic() - t0
            late = await cell.send_request("ch", "mute", "slow", Message(), 0.2)
            fired = await cell.fire_and_forget("ch", "slow", ["a", "b"], Message())
            names = await cell.list_cells()
            return gone, many, took, late, fired, names

    gone, many, took, late, fired, names = asyncio.run(main())
    assert gone.get_header(RC) == ReturnCode.TARGET_UNREACHABLE
    assert {t: r.get_header(RC) for t, r in many.items()} == dict.fromkeys("abc", ReturnCode.OK)
    assert took < 0.8  # three 0.3 s handlers at once, not one after the other
    assert late.get_header(RC) == ReturnCode.TIMEOUT
    assert fired == {"a": ReturnCode.OK, "b": ReturnCode.OK}
    assert {"a", "b", "c", "mute", "site-1"} <= set(names)


def test_cancelling_a_waiting_request_ends_it_at_once_and_leaves_nothing(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    make_cell("server").register_request_cb("ch", "slow", lambda req: time.sleep(1.0))

    async def main() -> tuple[float, int, int]:
        async with aio.Cell("site-1", broker.url) as cell:
            task = asyncio.create_task(cell.send_request("ch", "server", "slow", Message(), 10.0))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            took = time.monotonic() - t0
            waiting = len(cell._core.waiters._requests)
            end = time.monotonic() + 10.0  # the late reply comes (after ~1 s): dropped, counted
            while not cell.stats["dropped_late_reply"] and time.monotonic() < end:
                await asyncio.sleep(0.02)
            return took, waiting, cell.stats["dropped_late_reply"]

    took, waiting, late = asyncio.run(main())
    assert took < 0.1 and waiting == 0 and late == 1


def test_start_fails_clearly_and_stop_leaves_no_thread(
    broker: Broker, make_cell: Callable[..., Cell], dead_url: str
) -> None:
    make_cell("taken")
    before = objdl_threads()

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await aio.Cell("site-1", dead_url).start(timeout=0.5)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(NameTakenError):
            await aio.Cell("taken", broker.url).start()
        cell = aio.Cell("site-2", broker.url)
        await cell.start()
        with pytest.raises(CellError):
            await cell.start()
        await cell.stop()
        await cell.stop()  # idempotent
        with pytest.raises(CellError):
            await cell.send_request("ch", "taken", "x", Message(), 1.0)

    asyncio.run(main())
    assert objdl_threads() == before


def test_asyncio_cells_talk_to_each_other_on_one_loop(broker: Broker) -> None:
    async def main() -> list[Any]:
        async with aio.Cell("server", broker.url) as server, aio.Cell("site-1", broker.url) as site:

            async def double(req: Message) -> Message:
                return Message(payload=req.payload * 2)

            server.register_request_cb("ch", "double", double)
            replies = await asyncio.gather(
                *(
                    site.send_request("ch", "server", "double", Message(payload=i), 5.0)
                    for i in range(50)
                )
            )
            return [r.payload for r in replies]

    assert asyncio.run(main()) == [2 * i for i in range(50)]


def test_uvloop_when_installed(broker: Broker, make_cell: Callable[..., Cell]) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
    make_cell("server").register_request_cb("ch", "echo", echo)

    async def main() -> Message:
        async with aio.Cell("site-1", broker.url) as cell:
            return await cell.send_request("ch", "server", "echo", Message(payload=7), 5.0)

    assert uvloop.run(main()).payload == 7
