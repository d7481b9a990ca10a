"""Cells talking through a real broker on loopback."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker import Broker
from objdl.cell import Cell
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError
from objdl.message import Message, MessageHeaderKey, ReturnCode, Signal, make_reply
from tests import _procs
from tests.conftest import wait_for

RC = MessageHeaderKey.RETURN_CODE


def echo(req: Message) -> Message:
    return Message({"echoed": True}, req.payload)


def test_request_reply_with_bulk_payload(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)
    blob = bytes(range(256)) * 4096  # 1 MiB: travels as its own frame
    reply = site.send_request("ch", "server", "echo", Message(payload={"b": blob, "n": 3}), 5.0)
    assert reply.get_header(RC) == ReturnCode.OK
    assert reply.get_header("echoed") is True
    assert reply.get_header(MessageHeaderKey.ORIGIN) == "server"
    assert bytes(reply.payload["b"]) == blob and reply.payload["n"] == 3


def test_handler_sees_stamped_origin_and_args(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    seen: list[Any] = []

    def cb(req: Message, a: int, *, b: str) -> None:
        seen.append((req.get_header(MessageHeaderKey.ORIGIN), a, b))

    server.register_request_cb("ch", "t", cb, 1, b="x")
    req = Message({MessageHeaderKey.ORIGIN: "server"})  # a lie the broker must override
    reply = site.send_request("ch", "server", "t", req, 5.0)
    assert reply.get_header(RC) == ReturnCode.OK and reply.payload is None
    assert seen == [("site-1", 1, "x")]


def test_request_to_own_name(make_cell: Callable[..., Cell]) -> None:
    c = make_cell("server")
    c.register_request_cb("ch", "echo", echo)
    reply = c.send_request("ch", "server", "echo", Message(payload="me"), 5.0)
    assert reply.get_header(RC) == ReturnCode.OK and reply.payload == "me"


def test_sixteen_threads_send_at_once(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)
    errors: list[str] = []

    def run(i: int) -> None:
        for j in range(50):
            r = site.send_request("ch", "server", "echo", Message(payload=[i, j]), 10.0)
            if r.get_header(RC) != ReturnCode.OK or r.payload != [i, j]:
                errors.append(f"{i}/{j}: {r.headers} {r.payload}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_unreachable_target_returns_at_once(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-1")
    t0 = time.monotonic()
    reply = site.send_request("ch", "nobody", "t", Message(), 10.0)
    assert reply.get_header(RC) == ReturnCode.TARGET_UNREACHABLE
    assert "nobody" in reply.get_header(MessageHeaderKey.ERROR)
    assert time.monotonic() - t0 < 2.0


def test_timeout_and_late_reply_dropped(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    release = threading.Event()

    def slow(req: Message) -> Message:
        release.wait(5)
        return Message(payload="late")

    server.register_request_cb("ch", "slow", slow)
    server.register_request_cb("ch", "echo", echo)
    t0 = time.monotonic()
    reply = site.send_request("ch", "server", "slow", Message(), 0.3)
    elapsed = time.monotonic() - t0
    assert reply.get_header(RC) == ReturnCode.TIMEOUT
    assert 0.3 <= elapsed < 1.5
    release.set()
    wait_for(lambda: site.stats["dropped_late_reply"] == 1)
    # The late reply did not get mixed up with the next request's reply.
    reply = site.send_request("ch", "server", "echo", Message(payload="next"), 5.0)
    assert reply.payload == "next"


def test_handler_exception_is_process_exception(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")

    def bad(req: Message) -> Message:
        raise RuntimeError("disk on fire")

    server.register_request_cb("ch", "bad", bad)
    reply = site.send_request("ch", "server", "bad", Message(), 5.0)
    assert reply.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
    assert "disk on fire" in reply.get_header(MessageHeaderKey.ERROR)


def test_handler_returning_wrong_type(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "bad", lambda req: {"not": "a message"})
    reply = site.send_request("ch", "server", "bad", Message(), 5.0)
    assert reply.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
    assert "expected a Message" in reply.get_header(MessageHeaderKey.ERROR)


def test_handler_reply_codes_pass_through(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "t", lambda req: make_reply(ReturnCode.INVALID_REQUEST, "no"))
    reply = site.send_request("ch", "server", "t", Message(), 5.0)
    assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
    assert reply.get_header(MessageHeaderKey.ERROR) == "no"


def test_missing_handler_is_invalid_request(make_cell: Callable[..., Cell]) -> None:
    make_cell("server")
    site = make_cell("site-1")
    reply = site.send_request("ch", "server", "nothing-here", Message(), 5.0)
    assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
    assert "nothing-here" in reply.get_header(MessageHeaderKey.ERROR)


def test_abort_signal_ends_wait_quickly(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    release = threading.Event()
    server.register_request_cb("ch", "slow", lambda req: release.wait(5) and None)
    sig = Signal()
    timer = threading.Timer(0.2, sig.trigger)
    timer.start()
    t0 = time.monotonic()
    reply = site.send_request("ch", "server", "slow", Message(), 10.0, abort_signal=sig)
    elapsed = time.monotonic() - t0
    release.set()
    timer.join()
    assert reply.get_header(RC) == ReturnCode.ABORT_RUN
    assert elapsed < 0.2 + 0.1 + 0.05  # fires at 0.2 s; must return within 100 ms


def test_broadcast_to_ten_slow_cells_costs_one_timeout(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-0")
    release = threading.Event()
    names = [f"worker-{i}" for i in range(10)]
    for n in names[:8]:
        make_cell(n).register_request_cb("ch", "t", lambda req, n=n: Message(payload=n))
    for n in names[8:]:
        make_cell(n).register_request_cb("ch", "t", lambda req: release.wait(5) and None)
    t0 = time.monotonic()
    replies = site.broadcast_request("ch", "t", names, Message(), 1.0)
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 1.8
    assert set(replies) == set(names)
    for n in names[:8]:
        assert replies[n].get_header(RC) == ReturnCode.OK and replies[n].payload == n
    for n in names[8:]:
        assert replies[n].get_header(RC) == ReturnCode.TIMEOUT


def test_fire_and_forget_reaches_handlers(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-0")
    got: list[str] = []
    for n in ("a", "b"):
        make_cell(n).register_request_cb("ch", "note", lambda req, n=n: got.append(n))
    rcs = site.fire_and_forget("ch", "note", ["a", "b"], Message(payload=1))
    assert rcs == {"a": ReturnCode.OK, "b": ReturnCode.OK}
    wait_for(lambda: sorted(got) == ["a", "b"])


def test_list_cells(make_cell: Callable[..., Cell]) -> None:
    c = make_cell("site-1")
    make_cell("site-1.job-1")
    make_cell("site-2")
    assert c.list_cells() == ["site-1", "site-1.job-1", "site-2"]
    assert c.list_cells("site-1") == ["site-1", "site-1.job-1"]


def test_secure_refuses_rather_than_sending_plaintext(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-1")
    with pytest.raises(NotImplementedError, match="plaintext"):
        site.send_request("ch", "server", "t", Message(), 1.0, secure=True)
    with pytest.raises(NotImplementedError):
        site.fire_and_forget("ch", "t", ["server"], Message(), secure=True)


def test_bad_arguments_raise(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-1")
    with pytest.raises(ValueError, match="invalid cell name"):
        site.send_request("ch", "bad..name", "t", Message(), 1.0)
    with pytest.raises(ValueError, match="timeout"):
        site.send_request("ch", "server", "t", Message(), 0)
    with pytest.raises(TypeError, match="Message"):
        site.send_request("ch", "server", "t", {"payload": 1}, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid cell name"):
        Cell("no spaces", "tcp://127.0.0.1:1")


def test_unencodable_payload_raises(make_cell: Callable[..., Cell]) -> None:
    site = make_cell("site-1")
    with pytest.raises(TypeError):
        site.send_request("ch", "site-1", "t", Message(payload=object()), 1.0)


def test_no_broker_start_fails_within_timeout() -> None:
    with Broker("tcp://127.0.0.1:*") as b:
        url = b.url  # a port that was just free and is now closed again
    cell = Cell("site-1", url)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="no broker answered"):
        cell.start(timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    cell.stop()


def test_duplicate_live_name_refused(make_cell: Callable[..., Cell], broker: Broker) -> None:
    make_cell("site-1")
    dup = Cell("site-1", broker.url)
    with pytest.raises(NameTakenError, match="site-1"):
        dup.start(timeout=5.0)


def test_stop_leaves_no_threads(broker: Broker) -> None:
    before = set(threading.enumerate())
    c = Cell("site-1", broker.url, max_workers=4)
    c.start()
    c.stop()
    c.stop()  # idempotent
    wait_for(lambda: set(threading.enumerate()) <= before, timeout=3)
    with pytest.raises(CellError):
        c.send_request("ch", "site-1", "t", Message(), 1.0)


def test_requests_after_stop_of_peer_are_unreachable(make_cell: Callable[..., Cell]) -> None:
    site, server = make_cell("site-1"), make_cell("server")
    server.stop()  # says BYE: the broker forgets it at once
    reply = site.send_request("ch", "server", "t", Message(), 5.0)
    assert reply.get_header(RC) == ReturnCode.TARGET_UNREACHABLE


def test_broker_restart_cells_reconnect_and_fail_meanwhile() -> None:
    b = Broker("tcp://127.0.0.1:*", heartbeat_interval=0.1)
    b.start()
    url = b.url
    opts = {"heartbeat_interval": 0.1, "broker_timeout": 0.5}
    a, s = Cell("server", url, **opts), Cell("site-1", url, **opts)
    try:
        a.start()
        s.start()
        a.register_request_cb("ch", "echo", echo)
        assert s.send_request("ch", "server", "echo", Message(payload=1), 5).payload == 1
        b.stop()
        wait_for(lambda: not s.is_connected and not a.is_connected, timeout=5)
        t0 = time.monotonic()
        reply = s.send_request("ch", "server", "echo", Message(payload=2), 5)
        assert reply.get_header(RC) == ReturnCode.COMM_ERROR
        assert time.monotonic() - t0 < 1.0
        b = Broker(url, heartbeat_interval=0.1)
        b.start()
        wait_for(lambda: s.is_connected and a.is_connected, timeout=10)
        assert s.send_request("ch", "server", "echo", Message(payload=3), 5).payload == 3
    finally:
        a.stop()
        s.stop()
        b.stop()


def test_crashed_cell_rejoins_under_its_name(broker: Broker) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_procs.hold_name_main, args=("site-1", broker.url, ready))
    proc.start()
    try:
        ready.get(timeout=30)
        proc.kill()  # a crash: no BYE, the name is still registered
        proc.join(10)
        cell = Cell("site-1", broker.url)
        t0 = time.monotonic()
        cell.start(timeout=10)
        assert time.monotonic() - t0 < 5.0
        cell.stop()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        ready.close()
        ready.join_thread()


def test_broker_and_three_cells_in_separate_processes() -> None:
    bproc, url = _procs.start_broker_process()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    stop = ctx.Event()
    names = ["site-1", "site-2", "site-3"]
    procs = [
        ctx.Process(
            target=_procs.echo_cell_main,
            args=(n, url, [p for p in names if p != n], results, stop, 30.0),
        )
        for n in names
    ]
    try:
        for p in procs:
            p.start()
        done: dict[str, Any] = {}
        deadline = time.monotonic() + 40
        while len(done) < 3 and time.monotonic() < deadline:
            name, what, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if what == "done":
                done[name] = value
        for n in names:
            assert done[n] == {p: {"from": n} for p in names if p != n}
        stop.set()
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        stop.set()
        _procs.end_children(procs, results)
        _procs.stop_process(bproc)


def test_broker_urls_are_checked_up_front() -> None:
    for bad in ("tcp://host", "127.0.0.1:8002", "tcp://:8002", "http://x:1 y", ""):
        with pytest.raises(ValueError, match="broker_url"):
            Cell("site-1", bad)
    for good in (
        "tcp://127.0.0.1:8002",
        "tcp://[::1]:8002",
        "tcp://broker.example:1",
        "ipc:///tmp/x",
    ):
        Cell("site-1", good)  # not started: nothing to stop


def test_stop_lets_running_handlers_reply(make_cell: Callable[..., Cell]) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    started = threading.Event()

    def slow(req: Message) -> Message:
        started.set()
        time.sleep(0.3)
        return Message(payload="finished")

    server.register_request_cb("ch", "slow", slow)
    replies: list[Message] = []
    t = threading.Thread(
        target=lambda: replies.append(site.send_request("ch", "server", "slow", Message(), 5.0))
    )
    t.start()
    assert started.wait(5)
    server.stop()  # while the handler runs
    t.join(10)
    assert replies and replies[0].get_header(RC) == ReturnCode.OK
    assert replies[0].payload == "finished"


def test_a_handler_may_stop_its_own_cell(broker: Broker) -> None:
    cell = Cell("server", broker.url, drain_timeout=0.2)
    cell.start()
    site = Cell("site-1", broker.url)
    site.start()
    try:
        stopped = threading.Event()
        cell.add_stop_callback(stopped.set)
        cell.register_request_cb("ch", "quit", lambda req: cell.stop())
        reply = site.send_request("ch", "server", "quit", Message(), 2.0)
        # The reply may or may not make it out, but nothing raises or hangs.
        assert reply.get_header(RC) in (
            ReturnCode.OK,
            ReturnCode.TIMEOUT,
            ReturnCode.TARGET_UNREACHABLE,
        )
        wait_for(lambda: not cell.is_connected, timeout=5)
        assert stopped.wait(5)  # stop() ran to its end, from the handler thread
    finally:
        site.stop()
        cell.stop()


def test_waker_wake_after_close_writes_nowhere(tmp_path: Path) -> None:
    # A handler still running after stop() may queue a reply: its wake-up must not
    # land in a file that reused the closed pipe's descriptor number.
    from objdl._wake import Waker

    box = Waker()
    box.open()
    box.close()
    files = [open(tmp_path / f"f{i}", "wb") for i in range(2)]  # noqa: SIM115
    try:
        box.wake()
        box.wake()
        box.close()  # idempotent
    finally:
        for f in files:
            f.close()
    assert all((tmp_path / f"f{i}").read_bytes() == b"" for i in range(2))


# ---------------------------------------------------------------- inline handlers, on_done


def test_an_inline_handler_runs_on_the_io_thread_and_a_pool_one_does_not(
    make_cell: Callable[..., Cell],
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    threads: dict[str, str] = {}

    def where(req: Message, kind: str) -> Message:
        threads[kind] = threading.current_thread().name
        return Message(payload=req.payload)

    server.register_request_cb("ch", "inline", where, "inline", inline=True)
    server.register_request_cb("ch", "pool", where, "pool")
    for topic in ("inline", "pool"):
        reply = site.send_request("ch", "server", topic, Message(payload=topic), 5.0)
        assert reply.get_header(RC) == ReturnCode.OK and reply.payload == topic
    assert threads == {"inline": "objdl-server-io", "pool": threads["pool"]}
    assert threads["pool"].startswith("objdl-server-handler-")


def test_an_inline_handler_cannot_block_on_a_request(make_cell: Callable[..., Cell]) -> None:
    """Waiting for a reply on the I/O thread would wait for itself: it raises at once."""
    server, site = make_cell("server"), make_cell("site-1")
    site.register_request_cb("ch", "echo", echo)

    def relay(req: Message) -> Message:
        return server.send_request("ch", "site-1", "echo", req, 5.0)

    server.register_request_cb("ch", "relay", relay, inline=True)
    t0 = time.monotonic()
    reply = site.send_request("ch", "server", "relay", Message(payload=1), 5.0)
    assert time.monotonic() - t0 < 2.0
    assert reply.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
    assert "CellError" in reply.get_header(MessageHeaderKey.ERROR)
    # The cell goes on serving.
    server.register_request_cb("ch", "echo", echo, inline=True)
    assert site.send_request("ch", "server", "echo", Message(payload=2), 5.0).payload == 2


def test_a_flood_at_an_inline_handler_is_answered_in_order(
    make_cell: Callable[..., Cell],
) -> None:
    """Inline requests bypass the pool's admission: each is answered as it is read,
    so nothing queues up in the cell however many arrive at once."""
    server, site = make_cell("server", max_pending=1), make_cell("site-1")
    seen: list[int] = []
    server.register_request_cb("ch", "n", lambda req: seen.append(req.payload), inline=True)
    pending = [
        site.request_async("ch", "server", "n", Message(payload=i), 10.0) for i in range(500)
    ]
    replies = [p.result() if p.wait(10.0) else None for p in pending]
    assert all(r is not None and r.get_header(RC) == ReturnCode.OK for r in replies)
    assert seen == list(range(500))  # one DEALER pipe, one thread: order kept


def test_requests_chained_from_on_done_leave_from_the_io_thread(
    make_cell: Callable[..., Cell],
) -> None:
    """on_done runs on the I/O thread; a request_async made there goes out at once."""
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo, inline=True)
    done = threading.Event()
    seen: list[tuple[Any, str]] = []

    def next_one(p: Any) -> None:
        seen.append((p.reply.payload, threading.current_thread().name))
        if len(seen) == 200:
            done.set()
            return
        site.request_async(
            "ch", "server", "echo", Message(payload=len(seen)), 5.0, on_done=next_one
        )

    site.request_async("ch", "server", "echo", Message(payload=0), 5.0, on_done=next_one)
    assert done.wait(10.0)
    assert [v for v, _ in seen] == list(range(200))
    assert {name for _, name in seen} == {"objdl-site-1-io"}


def test_an_on_done_hook_that_raises_does_not_break_the_cell(
    make_cell: Callable[..., Cell],
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)

    def boom(p: Any) -> None:
        raise RuntimeError("hook failed")

    p = site.request_async("ch", "server", "echo", Message(payload=1), 5.0, on_done=boom)
    assert p.wait(5.0) and p.result().payload == 1
    assert site.send_request("ch", "server", "echo", Message(payload=2), 5.0).payload == 2
