"""RoutingTable.forward, the fast path of a MSG, against handle(), the general one.

``forward`` may answer only where ``handle`` would do nothing but forward the MSG
untracked to a peer with nothing outbound, and must then leave the table exactly as
``handle`` would. The last test drives two tables with the same random script, one
taking the fast path wherever it is offered, and compares them after every step.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing import MESSAGE_OVERHEAD, TRACK_MIN, RoutingTable, Send
from objdl import wire

A, B, C = b"peer-a", b"peer-b", b"peer-c"
HEADERS = b"\x81\xa6req_id\x01"


def registered(**kw: Any) -> RoutingTable:
    t = RoutingTable(max_message_size=100_000, max_peer_queue=20_000, **kw)
    for peer, name in ((A, b"site-1"), (B, b"server")):
        t.handle(peer, [wire.KIND_REG, wire.PROTOCOL_VERSION, name], 0.0)
    return t


def frames(dest: bytes, nbytes: int = 4) -> list[bytes]:
    return [wire.KIND_MSG, dest, HEADERS, bytes(nbytes)]


def state(t: RoutingTable) -> tuple[Any, ...]:
    peers = (A, B, C, b"peer-d")
    return (
        t.counters(),
        t.cells(),
        [t.name_of(p) for p in peers],
        [t.outbound(p) for p in peers],
        t.peak_outbound(),
        t.next_deadline(),
    )


def test_forward_says_where_and_stamps_the_senders_name() -> None:
    t = registered()
    f = frames(b"server")
    assert t.forward(A, b"server", sum(map(len, f)), 1.0) == (B, b"site-1")
    assert t.counters()["routed"] == 1
    sent = sum(map(len, f)) - len(b"server") + len(b"site-1")
    assert t.peak_outbound() == sent + MESSAGE_OVERHEAD
    t.tick(1.0)
    assert t.tick(3.9).sends  # A was renewed at 1.0: still alive at 3.9 (cell_timeout 3)
    assert t.cells() == ["site-1"]  # B spoke last at 0.0 and was forgotten


def _claim(t: RoutingTable) -> None:
    t.handle(C, [wire.KIND_REG, wire.PROTOCOL_VERSION, b"server"], 0.5)


def _stall(t: RoutingTable) -> None:
    [send] = t.handle(A, frames(b"server"), 0.5).sends
    t.send_failed(send, False, 0.5)


def _hold(t: RoutingTable) -> None:
    t.handle(A, frames(b"server", TRACK_MIN), 0.5)


@pytest.mark.parametrize(
    "setup, sender, dest, nbytes",
    [
        (None, C, b"server", 4),  # unregistered sender: NACK unregistered
        (None, A, b"site-9", 4),  # nobody of that name: NACK unreachable
        (None, A, b"\xff", 4),  # not a name: dropped
        (None, A, b"server", TRACK_MIN),  # tracked
        (None, A, b"server", 100_000),  # over the maximum: NACK too_big
        (_claim, A, b"server", 4),  # a probe is pending: the holder's answer matters
        (_stall, A, b"server", 4),  # something waits for B: this must queue behind it
        (_hold, A, b"server", 4),  # B's bytes are held: the bound must be checked
    ],
    ids=["unregistered", "unknown", "bad-name", "tracked", "too-big", "probe", "waits", "held"],
)
def test_forward_leaves_to_handle_what_it_does_not_decide(
    setup: Any, sender: bytes, dest: bytes, nbytes: int
) -> None:
    t = registered()
    if setup is not None:
        setup(t)
    before = state(t)
    f = frames(dest, nbytes)
    assert t.forward(sender, dest, sum(map(len, f)), 1.0) is None
    assert state(t) == before


def test_forward_takes_a_peer_again_once_its_retry_went_through() -> None:
    t = registered()
    _stall(t)
    [retried] = [s for s in t.tick(1.0).sends if s.frames[0] == wire.KIND_MSG]
    assert retried.peer == B  # and libzmq took it this time
    f = frames(b"server")
    assert t.forward(A, b"server", sum(map(len, f)), 1.1) == (B, b"site-1")


# -- the same script through both paths ------------------------------------------

# Weighted towards what reaches the fast path: registered senders, live destinations.
NAMES = [b"site-1", b"server", b"server", b"site-1", b"site-2", b"\xff", b"a..b"]
PEERS = [A, A, B, B, C]
# Bodies around the tracking threshold: 18 bytes of frames besides the body go out
# (MSG, a six-letter origin, the headers), so TRACK_MIN - 18 is the first tracked one.
SIZES = [0, 10, TRACK_MIN - 19, TRACK_MIN - 18, 9_000, 100_000]

_msg = st.tuples(
    st.just("msg"), st.sampled_from(PEERS), st.sampled_from(NAMES), st.sampled_from(SIZES)
)
_op = st.one_of(
    _msg,
    _msg,
    _msg,
    st.tuples(st.just("reg"), st.sampled_from(PEERS), st.sampled_from(NAMES[:5])),
    st.tuples(st.just("hb"), st.sampled_from(PEERS)),
    st.tuples(st.just("bye"), st.sampled_from(PEERS)),
    st.tuples(st.just("refuse"), st.booleans()),  # libzmq refuses the last send (gone?)
    st.tuples(st.just("release")),  # libzmq lets go of every tracked send
    st.tuples(st.just("tick")),
)


class _Side:
    """One table, its last sends and its tracked sends, as a shell would keep them."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.t = registered()
        self.last: list[Send[Any]] = []
        self.tracked: list[Send[Any]] = []

    def do(self, op: tuple[Any, ...], now: float) -> list[tuple[bytes, list[bytes]]]:
        t, kind = self.t, op[0]
        sends: list[Send[Any]] = []
        if kind == "msg":
            _, sender, dest, nbytes = op
            f = frames(dest, nbytes)
            hit = t.forward(sender, dest, sum(map(len, f)), now) if self.fast else None
            if hit is not None:
                to, origin = hit
                out: list[Any] = [wire.KIND_MSG, origin, *f[2:]]
                cost = sum(map(len, out)) + MESSAGE_OVERHEAD
                sends = [Send(to, out, sender, dest, cost, False)]
            else:
                sends = t.handle(sender, f, now).sends
        elif kind == "reg":
            sends = t.handle(op[1], [wire.KIND_REG, wire.PROTOCOL_VERSION, op[2]], now).sends
        elif kind == "hb":
            sends = t.handle(op[1], [wire.KIND_HB], now).sends
        elif kind == "bye":
            sends = t.handle(op[1], [wire.KIND_BYE], now).sends
        elif kind == "refuse":
            if self.last:
                refused = self.last.pop()
                if refused in self.tracked:
                    self.tracked.remove(refused)
                sends = t.send_failed(refused, op[1], now).sends
        elif kind == "release":
            for send in self.tracked:
                t.released(send)
            self.last = [s for s in self.last if s not in self.tracked]
            self.tracked = []
        else:
            sends = t.tick(now).sends
        self.last = list(sends) or self.last
        self.tracked += [s for s in sends if s.track]
        return [(s.peer, [bytes(f) for f in s.frames]) for s in sends]


@settings(max_examples=500, deadline=None)
@given(script=st.lists(st.tuples(_op, st.sampled_from([0.0, 0.001, 0.3, 1.2, 2.5])), max_size=40))
def test_forward_and_handle_leave_the_table_alike(
    script: list[tuple[tuple[Any, ...], float]],
) -> None:
    fast, slow = _Side(True), _Side(False)
    now = 0.0
    for op, step in script:
        now += step
        assert fast.do(op, now) == slow.do(op, now), op
        assert state(fast.t) == state(slow.t), op
