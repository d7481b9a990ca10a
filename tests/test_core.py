"""The cell's sans-I/O core, driven by hand: frames in, frames and answers out, no socket.

Each test plays the broker: it feeds ``CellCore.on_frames`` what a broker would send
and reads what the core queued in ``out`` (or returned as control frames), with a
clock that only moves when the test says so.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
import zmq

from objdl import wire
from objdl.cell._core import CellCore, new_request_id
from objdl.cell._pending import PendingRequest
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode

pytestmark = pytest.mark.timeout(10)

H = MessageHeaderKey
RC = H.RETURN_CODE


def frames(*parts: Any) -> list[zmq.Frame]:
    return [zmq.Frame(bytes(p) if isinstance(p, memoryview) else p) for p in parts]


class Harness:
    """A core registered as `name`, with its wake-ups and pool dispatches counted."""

    def __init__(self, name: str = "site-1", **kwargs: Any) -> None:
        self.wakes = 0
        self.jobs: list[tuple[Any, str]] = []
        self.now = 100.0
        self.core = CellCore(name, self.now, self._wake, **kwargs)
        self.core.dispatch = lambda job, origin: self.jobs.append((job, origin))
        act = self.core.on_tick(self.now)
        assert act.send == [[wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode()]]
        act = self.core.on_frames(frames(wire.KIND_REG_OK, name.encode()), self.now)
        assert act is not None and act.registered and self.core.registered

    def _wake(self) -> None:
        self.wakes += 1

    def sent(self) -> list[list[Any]]:
        out = list(self.core.out)
        self.core.out.clear()
        return out

    def deliver(self, origin: str, msg: Message) -> None:
        """`msg` as the broker hands it over from `origin`."""
        self.core.on_frames(frames(wire.KIND_MSG, origin.encode(), *wire.encode(msg)), self.now)


def sent_message(out: list[Any]) -> tuple[bytes, Message]:
    assert out[0] == wire.KIND_MSG
    return bytes(out[1]), wire.decode(
        [bytes(f) if isinstance(f, memoryview) else f for f in out[2:]]
    )


def reply_to(request: Message, rc: str = ReturnCode.OK, payload: Any = None) -> Message:
    return Message(
        {
            H.MSG_TYPE: MessageType.REPLY,
            H.REQ_ID: request.get_header(H.REQ_ID),
            H.CHANNEL: request.get_header(H.CHANNEL),
            H.TOPIC: request.get_header(H.TOPIC),
            RC: rc,
        },
        payload,
    )


def request(req_id: Any = 7, channel: str = "ch", topic: str = "t", payload: Any = None) -> Message:
    return Message(
        {H.MSG_TYPE: MessageType.REQUEST, H.REQ_ID: req_id, H.CHANNEL: channel, H.TOPIC: topic},
        payload,
    )


def submit(h: Harness, target: str = "server", payload: Any = "hi") -> PendingRequest:
    [p] = h.core.submit("ch", "t", [target], Message(payload=payload), h.now + 5.0)
    return p


def test_a_request_goes_out_and_its_reply_from_the_target_resolves_it() -> None:
    h = Harness()
    p = submit(h)
    [out] = h.sent()
    dest, msg = sent_message(out)
    assert dest == b"server" and msg.payload == "hi"
    assert msg.get_header(H.REQ_ID) == p.req_id and h.wakes == 1
    h.deliver("server", reply_to(msg, payload="back"))
    assert p.done() and p.reply is not None
    assert p.reply.payload == "back" and p.reply.get_header(H.ORIGIN) == "server"


def test_a_reply_from_another_cell_or_for_no_request_is_dropped_and_counted() -> None:
    h = Harness()
    p = submit(h)
    _, msg = sent_message(h.sent()[0])
    h.deliver("mallory", reply_to(msg, payload="forged"))  # right id, wrong origin
    h.deliver("server", reply_to(request(req_id=p.req_id ^ 1)))  # an id never used
    assert not p.done()
    assert h.core.stats["dropped_late_reply"] == 2
    h.deliver("server", reply_to(msg, payload="real"))
    assert p.reply is not None and p.reply.payload == "real"
    h.deliver("server", reply_to(msg, payload="again"))  # a duplicate is late
    assert p.reply.payload == "real" and h.core.stats["dropped_late_reply"] == 3


def test_request_ids_are_random_not_a_counter() -> None:
    h = Harness()
    ids = [submit(h).req_id for _ in range(64)]
    assert len(set(ids)) == 64
    assert all(0 < i < 2**63 for i in ids)
    steps = {b - a for a, b in itertools.pairwise(ids)}
    assert len(steps) > 32  # a counter (or a counter with a random start) has one step
    assert max(ids).bit_length() > 56  # spread over the whole 63-bit range
    assert all(new_request_id() > 0 for _ in range(1000))


def test_a_nack_resolves_the_request_it_names_with_the_mapped_code() -> None:
    h = Harness()
    p, q = submit(h, "gone"), submit(h, "big")
    out = h.sent()
    for (f, reason), pending, rc in (
        ((out[0], wire.NACK_UNREACHABLE), p, ReturnCode.TARGET_UNREACHABLE),
        ((out[1], wire.NACK_TOO_BIG), q, ReturnCode.MSG_TOO_BIG),
    ):
        h.core.on_frames(frames(wire.KIND_NACK, f[1], reason, f[2]), h.now)
        assert pending.reply is not None and pending.reply.get_header(RC) == rc


def test_silence_from_the_broker_fails_every_waiter_and_asks_for_a_new_socket() -> None:
    h = Harness(broker_timeout=2.0, heartbeat_interval=0.5)
    p = submit(h)
    act = h.core.on_tick(h.now + 0.6)
    assert act.send == [[wire.KIND_HB]] and not act.reconnect
    act = h.core.on_tick(h.now + 2.5)
    assert act.reconnect and act.lost and not h.core.registered
    assert p.reply is not None and p.reply.get_header(RC) == ReturnCode.COMM_ERROR
    h.core.socket_replaced(h.now + 2.5)
    assert h.core.stats["reconnects"] == 1
    # Not registered: a request fails at once, and nothing is queued.
    late = submit(h)
    assert late.reply is not None and late.reply.get_header(RC) == ReturnCode.COMM_ERROR
    assert not h.sent()


def test_an_inline_handler_runs_inside_on_frames_and_its_reply_is_queued() -> None:
    h = Harness("server")
    ran_on: list[int] = []

    def echo(req: Message, tag: str) -> Message:
        ran_on.append(threading.get_ident())
        return Message(payload=(tag, req.payload))

    h.core.handlers.register("ch", "t", echo, ("x",), {}, inline=True)
    h.deliver("site-1", request(req_id=41, payload="ping"))
    assert ran_on == [threading.get_ident()] and not h.jobs
    dest, msg = sent_message(h.sent()[0])
    assert dest == b"site-1" and msg.get_header(H.REQ_ID) == 41
    assert msg.get_header(RC) == ReturnCode.OK and msg.payload == ["x", "ping"]


def test_an_inline_handler_that_raises_answers_process_exception() -> None:
    h = Harness("server")
    h.core.handlers.register("ch", "t", lambda req: 1 / 0, (), {}, inline=True)
    h.deliver("site-1", request())
    _, msg = sent_message(h.sent()[0])
    assert msg.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
    assert "ZeroDivisionError" in msg.get_header(H.ERROR)


def test_pool_requests_are_admitted_up_to_max_pending_then_refused() -> None:
    h = Harness("server", max_pending=2)
    h.core.handlers.register("ch", "t", lambda req: None, (), {})
    for i in range(3):
        h.deliver("site-1", request(req_id=i))
    assert [job.get_header(H.REQ_ID) for job, _ in h.jobs] == [0, 1]
    [out] = h.sent()
    _, msg = sent_message(out)
    assert msg.get_header(H.REQ_ID) == 2
    assert msg.get_header(RC) == ReturnCode.SERVICE_UNAVAILABLE
    # The pool runs one: room for one more.
    job, origin = h.jobs.pop(0)
    h.core.handlers.run(job, origin)
    h.core.handlers.finished()
    assert sent_message(h.sent()[0])[1].get_header(RC) == ReturnCode.OK
    h.deliver("site-1", request(req_id=3))
    assert [job.get_header(H.REQ_ID) for job, _ in h.jobs] == [1, 3]


def test_a_request_without_a_handler_gets_invalid_request() -> None:
    h = Harness("server")
    h.deliver("site-1", request(channel="nope"))
    job, origin = h.jobs.pop()
    h.core.handlers.run(job, origin)
    _, msg = sent_message(h.sent()[0])
    assert msg.get_header(RC) == ReturnCode.INVALID_REQUEST


def test_only_a_request_opened_here_is_marked_secure() -> None:
    h = Harness("server")
    seen: list[Any] = []
    h.core.handlers.register("ch", "t", lambda req: seen.append(req.get_header(H.SECURE)), (), {})
    forged = request()
    forged.set_header(H.SECURE, False)  # a plaintext body that claims nothing is trusted
    h.deliver("site-1", forged)
    h.core.handlers.run(*h.jobs.pop())
    assert seen == [False]
    # Marked secure at a cell without end-to-end keys: refused, never run, and told why.
    marked = request(req_id=9)
    marked.set_header(H.SECURE, True)
    h.deliver("site-1", marked)
    assert not h.jobs
    _, msg = sent_message(h.sent()[1])
    assert msg.get_header(H.REQ_ID) == 9
    assert msg.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR


def test_junk_from_the_network_is_dropped_not_raised() -> None:
    h = Harness()
    for junk in (
        frames(wire.KIND_MSG, b"site-2"),  # too short
        frames(wire.KIND_MSG, b"\xff\xfe", b"\x80", b""),  # bad origin
        frames(wire.KIND_MSG, b"server", b"\xc1", b""),  # undecodable headers
        frames(wire.KIND_NACK, b"x"),
        frames(wire.KIND_LIST_R, b"token"),
        frames(b"HUGE", b"x" * 4096),
    ):
        h.core.on_frames(junk, h.now)
    assert h.core.stats["dropped_malformed"] == 6


def test_a_list_query_is_answered_by_its_token_only() -> None:
    h = Harness()
    token, w = h.core.list_query("site", h.now + 1)
    [out] = h.sent()
    assert out == [wire.KIND_LIST, token, b"site"]
    h.core.on_frames(frames(wire.KIND_LIST_R, b"other", b"evil"), h.now)
    assert not w.done()
    h.core.on_frames(frames(wire.KIND_LIST_R, token, b"site-1\nsite-2\n"), h.now)
    assert w.reply is not None and w.reply.payload == ["site-1", "site-2"]


def test_on_done_runs_once_when_the_reply_is_stored() -> None:
    h = Harness()
    calls: list[PendingRequest] = []
    [p] = h.core.submit("ch", "t", ["server"], Message(), h.now + 5, on_done=calls.append)
    _, msg = sent_message(h.sent()[0])
    h.deliver("server", reply_to(msg))
    p.result()  # resolving again (a timeout) does not call it twice
    assert calls == [p]
