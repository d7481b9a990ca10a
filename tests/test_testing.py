"""objdl.testing: the fake network keeps the real cell's semantics, faults and clock."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from objdl.cell import Cell, CellLike, PendingRequest, check_cell, clock_of
from objdl.downloader import ObjDownloader, TransferStatus, download_object
from objdl.errors import CellError, NameTakenError
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, Signal
from objdl.objects import BytesConsumer, DownloadError, download_bytes, new_transaction, offer_bytes
from objdl.security import SecureUnavailableError
from objdl.testing import ClockStalled, FakeCell, FakeClock, FakeNetwork
from objdl.wire import BULK_THRESHOLD
from tests.conftest import wait_for

H = MessageHeaderKey
RC = H.RETURN_CODE


@pytest.fixture
def net() -> Iterator[FakeNetwork]:
    """A network on a clock that moves only when the test advances it."""
    n = FakeNetwork(FakeClock(start=100.0, stall_timeout=5.0))
    try:
        yield n
    finally:
        ObjDownloader.shutdown()
        n.close()


def started(net: FakeNetwork, *names: str, **kw: Any) -> list[FakeCell]:
    cells = [net.cell(n, **kw) for n in names]
    for c in cells:
        c.start()
    return cells


def echo(request: Message) -> Message:
    """Answers with what the handler saw."""
    return Message(
        payload={
            "origin": request.get_header(H.ORIGIN),
            "secure": request.get_header(H.SECURE),
            "payload": request.payload,
        }
    )


def rc(reply: Message) -> Any:
    return reply.get_header(RC)


def in_thread(clock: FakeClock, fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run `fn(*args)` on a thread; return once it waits on `clock` (or has returned)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    wait_for(lambda: clock.waiting or out)
    return t, out


# --- the protocol --------------------------------------------------------------------------


def test_real_and_fake_cells_are_cell_like(net: FakeNetwork) -> None:
    real = Cell("site-1", "tcp://127.0.0.1:1")  # never started: no socket
    assert isinstance(real, CellLike) and isinstance(net.cell("site-1"), CellLike)
    assert clock_of(real) is time.monotonic
    assert clock_of(net.cell("site-2")) is net.clock


class HalfACell:
    fqcn = "server"

    def register_request_cb(self, *a: Any) -> None:
        pass


def test_a_non_cell_is_refused_naming_what_it_lacks() -> None:
    with pytest.raises(TypeError, match=r"HalfACell, which lacks get_fqcn, is_connected") as e:
        check_cell(HalfACell())
    assert "register_request_cb" not in str(e.value)
    with pytest.raises(TypeError, match="str, which lacks fqcn"):
        ObjDownloader.new_transaction("server", object(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="HalfACell, which lacks"):
        download_object("server", "R-1", 1.0, HalfACell(), BytesConsumer())  # type: ignore[arg-type]


# --- what travels, and how ----------------------------------------------------------------


def test_payloads_come_back_as_the_wire_gives_them(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "echo", echo)
    big = bytearray(b"b" * BULK_THRESHOLD)
    sent = {"tuple": (1, 2), "small": b"s", "big": big, "arr": np.arange(4)}
    got = site.send_request("t", "server", "echo", Message(payload=sent), 5.0).payload["payload"]
    assert got["tuple"] == [1, 2] and got["small"] == b"s"
    assert isinstance(got["big"], memoryview) and got["big"].readonly
    assert not got["arr"].flags.writeable and got["arr"].tolist() == [0, 1, 2, 3]
    big[0] = ord("X")  # the frames were copied, as a socket would: the sender's memory is its own
    assert bytes(got["big"][:1]) == b"b"
    with pytest.raises(TypeError, match="payload"):
        site.send_request("t", "server", "echo", Message(payload={"x": object()}), 5.0)


def test_origin_and_secure_headers_cannot_be_forged(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "echo", echo)
    forged = Message({H.ORIGIN: "server", H.SECURE: True}, "hi")
    seen = site.send_request("t", "server", "echo", forged, 5.0).payload
    assert seen == {"origin": "site-1", "secure": False, "payload": "hi"}


def test_secure_marks_the_request_and_its_reply(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "echo", echo)
    reply = site.send_request("t", "server", "echo", Message(payload=1), 5.0, secure=True)
    assert reply.payload["secure"] is True and reply.get_header(H.SECURE) is True


def test_a_cell_without_keys_neither_sends_nor_accepts_secure(net: FakeNetwork) -> None:
    (site,) = started(net, "site-1")
    (plain,) = started(net, "plain", keys=False)
    plain.register_request_cb("t", "echo", echo)
    with pytest.raises(SecureUnavailableError, match="keys=False"):
        plain.send_request("t", "site-1", "echo", Message(), 5.0, secure=True)
    reply = site.send_request("t", "plain", "echo", Message(), 5.0, secure=True)
    assert rc(reply) == ReturnCode.AUTHENTICATION_ERROR
    assert reply.get_header("auth_reason") == "no_keys" and reply.payload is None
    assert rc(site.send_request("t", "plain", "echo", Message(), 5.0)) == ReturnCode.OK
    fired = site.fire_and_forget("t", "echo", ["plain", "nobody"], Message(), secure=True)
    assert fired == {
        "plain": ReturnCode.AUTHENTICATION_ERROR,
        "nobody": ReturnCode.TARGET_UNREACHABLE,
    }


def test_an_owner_serving_only_sealed_requests_refuses_plaintext(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    tx = new_transaction(owner, secure=True)
    ref = offer_bytes(owner, b"secret", transaction_id=tx)
    with pytest.raises(DownloadError, match="authentication_error"):
        download_bytes(site, "server", ref, tries=1)
    assert download_bytes(site, "server", ref, secure=True) == b"secret"


# --- return codes -------------------------------------------------------------------------


def test_target_unreachable_at_once_for_a_name_not_connected(net: FakeNetwork) -> None:
    site, gone = started(net, "site-1", "gone")
    net.cell("idle")  # made, never started
    gone.stop()
    t0 = net.clock()
    for name in ("nobody", "idle", "gone"):
        reply = site.send_request("t", name, "x", Message(), 5.0)
        assert rc(reply) == ReturnCode.TARGET_UNREACHABLE, name
        assert f"could not deliver to {name}" in reply.get_header(H.ERROR)
    assert net.clock() == t0  # no time waited out
    assert [e.fate for e in net.messages(kind=MessageType.REQUEST)] == ["unreachable"] * 3


def test_timeout_when_the_clock_passes_the_deadline(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "echo", echo)
    net.drop(kind=MessageType.REPLY)
    t, out = in_thread(net.clock, site.send_request, "t", "server", "echo", Message(), 2.0)
    net.clock.advance(1.9)
    assert net.clock.waiting == 1 and not out  # still within its 2 s
    net.clock.advance(0.1)
    t.join(5)
    assert rc(out[0]) == ReturnCode.TIMEOUT and "within 2s" in out[0].get_header(H.ERROR)


def test_handler_trouble_comes_back_as_codes(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")

    def boom(request: Message) -> Message:
        raise ValueError("bad handler")

    owner.register_request_cb("t", "boom", boom)
    owner.register_request_cb("t", "int", lambda r: 5)
    owner.register_request_cb("t", "unsendable", lambda r: Message(payload=object()))
    owner.register_request_cb("t", "none", lambda r: None)
    ask = lambda topic: site.send_request("t", "server", topic, Message(), 5.0)  # noqa: E731
    assert rc(ask("boom")) == ReturnCode.PROCESS_EXCEPTION
    assert ask("boom").get_header(H.ERROR) == "ValueError: bad handler"
    assert "returned int" in ask("int").get_header(H.ERROR)
    assert "could not be encoded" in ask("unsendable").get_header(H.ERROR)
    assert rc(ask("none")) == ReturnCode.OK
    assert rc(ask("missing")) == ReturnCode.INVALID_REQUEST
    assert "no handler for channel 't' topic 'missing'" in ask("missing").get_header(H.ERROR)


def test_comm_error_when_not_connected_and_when_stopping(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    idle = net.cell("idle")
    with pytest.raises(CellError, match="call start"):
        idle.send_request("t", "server", "x", Message(), 1.0)
    net.hold(kind=MessageType.REQUEST, origin="site-1")
    pending = site.request_async("t", "server", "x", Message(), 5.0)
    site.stop()  # a waiting request ends with comm_error, not a timeout
    assert pending.done() and rc(pending.result()) == ReturnCode.COMM_ERROR
    with pytest.raises(CellError, match="not running"):
        site.send_request("t", "server", "x", Message(), 1.0)
    net.partition("server")
    assert rc(owner.send_request("t", "server", "x", Message(), 1.0)) == ReturnCode.COMM_ERROR
    assert owner.fire_and_forget("t", "x", "server", Message()) == {"server": ReturnCode.COMM_ERROR}


def test_service_unavailable_beyond_max_pending(net: FakeNetwork) -> None:
    (cell,) = started(net, "server", max_pending=1)
    inner: list[Message] = []
    # While the outer handler runs, a second request for the same cell finds it full.
    cell.register_request_cb(
        "t", "outer", lambda r: inner.append(cell.send_request("t", "server", "x", Message(), 1))
    )
    assert rc(cell.send_request("t", "server", "outer", Message(), 5.0)) == ReturnCode.OK
    assert (
        rc(inner[0]) == ReturnCode.SERVICE_UNAVAILABLE and "overloaded" in inner[0].headers[H.ERROR]
    )


def test_msg_too_big_for_a_request_and_a_timeout_for_a_reply() -> None:
    net = FakeNetwork(FakeClock(autojump=True), max_message_size=BULK_THRESHOLD)
    with net:
        owner, site = started(net, "server", "site-1")
        owner.register_request_cb("t", "big", lambda r: Message(payload=bytes(BULK_THRESHOLD)))
        reply = site.send_request("t", "server", "big", Message(payload=bytes(BULK_THRESHOLD)), 5.0)
        assert rc(reply) == ReturnCode.MSG_TOO_BIG
        # An oversized reply is lost at the broker (its NACK goes to the replier): timeout.
        assert rc(site.send_request("t", "server", "big", Message(), 5.0)) == ReturnCode.TIMEOUT
        assert [e.fate for e in net.log] == ["too_big", "delivered", "too_big"]


def test_abort_signal_ends_a_wait_with_abort_run(net: FakeNetwork) -> None:
    _owner, site = started(net, "server", "site-1")
    net.hold()
    sig = Signal()
    net.clock.call_later(1.0, sig.trigger)
    t, out = in_thread(
        net.clock, site.send_request, "t", "server", "x", Message(), 10.0, False, False, sig
    )
    net.clock.advance(1.0)
    t.join(5)
    assert rc(out[0]) == ReturnCode.ABORT_RUN


def test_request_async_is_not_resolved_at_its_deadline(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "x", lambda r: None)
    held = net.hold(kind=MessageType.REQUEST)
    done: queue.SimpleQueue[PendingRequest] = queue.SimpleQueue()
    p = site.request_async("t", "server", "x", Message(), 1.0, done_queue=done)
    assert p.deadline == net.clock() + 1.0
    net.clock.advance(5.0)
    assert not p.done() and done.empty()  # as with the real cell: result() decides
    assert rc(p.result()) == ReturnCode.TIMEOUT and done.get_nowait() is p
    held.release()  # the request arrives late; its reply finds no one waiting
    assert owner.stats["received"] == 1 and site.stats["dropped_late_reply"] == 1
    assert rc(p.result()) == ReturnCode.TIMEOUT


# --- faults ---------------------------------------------------------------------------------


def test_drop_by_predicate_and_count(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    net.clock.autojump = True
    owner.register_request_cb("t", "echo", echo)
    fault = net.drop(lambda e: e.payload == "lose me", count=1)
    ask = lambda p: rc(site.send_request("t", "server", "echo", Message(payload=p), 1.0))  # noqa: E731
    assert ask("keep") == ReturnCode.OK
    assert ask("lose me") == ReturnCode.TIMEOUT
    assert ask("lose me") == ReturnCode.OK  # count=1: only the first
    assert fault.hits == 1
    with net.drop(kind=MessageType.REPLY, origin="server"):
        assert ask("keep") == ReturnCode.TIMEOUT
    assert ask("keep") == ReturnCode.OK  # removed at the end of the block
    with pytest.raises(TypeError, match="cannot match on"):
        net.drop(colour="red")


def test_delay_delivers_on_the_clock(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "echo", echo)
    net.delay(0.5, kind=MessageType.REQUEST)
    net.delay(0.25, kind=MessageType.REPLY)
    p = site.request_async("t", "server", "echo", Message(), 2.0)
    net.clock.advance(0.5)
    assert owner.stats["received"] == 1 and not p.done()  # the reply is on its way
    net.clock.advance(0.2)
    assert not p.done()
    net.clock.advance(0.05)
    assert p.done() and rc(p.result()) == ReturnCode.OK
    # A delay longer than the timeout is a timeout.
    t, out = in_thread(net.clock, site.send_request, "t", "server", "echo", Message(), 0.6)
    net.clock.advance(0.6)
    t.join(5)
    assert rc(out[0]) == ReturnCode.TIMEOUT


def test_jittered_delays_and_holds_reorder(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    arrived: list[int] = []
    owner.register_request_cb("t", "n", lambda r: arrived.append(r.payload))
    with net.delay(lambda e: 1.0 - e.payload / 10, kind=MessageType.FIRE):
        for i in range(5):
            site.fire_and_forget("t", "n", "server", Message(payload=i))
    net.clock.advance(1.0)
    assert arrived == [4, 3, 2, 1, 0]
    arrived.clear()
    hold = net.hold(kind=MessageType.FIRE)
    for i in range(4):
        site.fire_and_forget("t", "n", "server", Message(payload=i))
    assert arrived == [] and len(hold.held) == 4
    assert hold.release([2, 0]) == 2 and arrived == [2, 0]
    hold.release("reverse")
    assert arrived == [2, 0, 3, 1]
    hold.remove()
    for i in range(6):
        site.fire_and_forget("t", "n", "server", Message(payload=i))
    hold = net.hold(kind=MessageType.FIRE)
    for i in range(6):
        site.fire_and_forget("t", "n", "server", Message(payload=i))
    hold.release(random.Random(3))
    assert sorted(arrived[-6:]) == list(range(6)) and arrived[-6:] != list(range(6))


def test_partition_and_heal(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    owner.register_request_cb("t", "x", lambda r: None)
    hold = net.hold(kind=MessageType.REQUEST)
    waiting = site.request_async("t", "server", "x", Message(), 5.0)
    net.partition("site-1")
    hold.remove()
    assert not site.is_connected and rc(waiting.result()) == ReturnCode.COMM_ERROR
    assert "partitioned" in waiting.result().get_header(H.ERROR)
    assert net.cells() == ["server"]
    assert (
        rc(owner.send_request("t", "site-1", "x", Message(), 1.0)) == ReturnCode.TARGET_UNREACHABLE
    )
    t, out = in_thread(net.clock, site.wait_connected, 10.0)
    net.clock.advance(1.0)
    net.heal("site-1")
    t.join(5)
    assert out == [True] and site.is_connected
    net.partition("site-1")
    t, out = in_thread(net.clock, site.wait_connected, 2.0)
    net.clock.advance(2.0)
    t.join(5)
    assert out == [False]


def test_kill_frees_the_name_and_skips_stop_callbacks(net: FakeNetwork) -> None:
    owner, site = started(net, "server", "site-1")
    stopped: list[str] = []
    site.add_stop_callback(lambda: stopped.append("old"))
    net.kill("site-1")
    assert not site.is_connected and stopped == []
    assert rc(site.send_request("t", "server", "x", Message(), 1.0)) == ReturnCode.COMM_ERROR
    assert (
        rc(owner.send_request("t", "site-1", "x", Message(), 1.0)) == ReturnCode.TARGET_UNREACHABLE
    )
    (again,) = started(net, "site-1")  # a restart under the same name
    again.register_request_cb("t", "x", lambda r: None)
    assert rc(owner.send_request("t", "site-1", "x", Message(), 1.0)) == ReturnCode.OK
    site.stop()
    assert stopped == ["old"] and again.is_connected  # stopping the dead one leaves the new one


def test_names_are_unique_and_cells_start_once(net: FakeNetwork) -> None:
    (a,) = started(net, "site-1")
    with pytest.raises(NameTakenError):
        net.cell("site-1").start()
    with pytest.raises(CellError, match="already started"):
        a.start()
    with pytest.raises(ValueError, match="segment"):
        net.cell("bad name")
    with net.cell("site-1.w0") as w:
        assert a.list_cells("site-1") == ["site-1", "site-1.w0"] and w.is_connected
    assert not w.is_connected and a.list_cells() == ["site-1"]


# --- the clock ------------------------------------------------------------------------------


def test_advance_runs_timers_in_order_each_at_its_time() -> None:
    clock = FakeClock(start=0.0)
    seen: list[tuple[str, float]] = []
    clock.call_at(2.0, lambda: seen.append(("b", clock())))
    clock.call_at(1.0, lambda: seen.append(("a", clock())))
    clock.call_later(1.0, lambda: seen.append(("a2", clock())))  # same time: in order made
    cancelled = clock.call_at(1.5, lambda: seen.append(("never", clock())))
    cancelled.cancel()
    moves: list[float] = []
    unwatch = clock.on_advance(lambda: moves.append(clock()))
    clock.advance(1.5)
    assert seen == [("a", 1.0), ("a2", 1.0)] and clock() == 1.5 and moves == [1.0, 1.5]
    unwatch()
    clock.advance(10)
    assert seen[-1] == ("b", 2.0) and clock() == 11.5 and moves == [1.0, 1.5]
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def test_a_wait_nobody_advances_fails_instead_of_hanging() -> None:
    clock = FakeClock(start=0.0, stall_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ClockStalled, match="advance it"):
        clock.sleep(1.0)
    assert time.monotonic() - t0 < 2.0


def test_autojump_moves_to_the_next_timer_then_the_deadline() -> None:
    clock = FakeClock(start=0.0, autojump=True)
    fired: list[float] = []
    clock.call_at(3.0, lambda: fired.append(clock()))
    t0 = time.monotonic()
    clock.sleep(10.0)
    assert fired == [3.0] and clock() == 10.0
    assert time.monotonic() - t0 < 1.0


def test_autojump_times_out_a_lost_request_without_waiting() -> None:
    with FakeNetwork(FakeClock(autojump=True)) as net:
        _owner, site = started(net, "server", "site-1")
        net.drop()
        t0, c0 = time.monotonic(), net.clock()
        assert rc(site.send_request("t", "server", "x", Message(), 30.0)) == ReturnCode.TIMEOUT
        assert net.clock() - c0 == 30.0 and time.monotonic() - t0 < 1.0


def test_owner_timeouts_are_on_the_cells_clock(net: FakeNetwork) -> None:
    (owner,) = started(net, "server")
    fired: list[float] = []
    tx = new_transaction(owner, timeout=30.0, timeout_cb=lambda t, o: fired.append(net.clock()))
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    net.clock.advance(29.9)
    assert fired == []
    net.clock.advance(0.1)
    # Ran on the advancing thread, before advance returned: no polling for it.
    assert fired == [net.clock()] and outcome.status == TransferStatus.TIMEOUT
