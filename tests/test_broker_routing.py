"""RoutingTable rules, driven by hand with a fake clock (no sockets, no threads)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.routing import (
    _MAX_RETRY_S,
    _RETRY_S,
    COUNTERS,
    MESSAGE_OVERHEAD,
    Actions,
    RoutingTable,
    Send,
)
from objdl import wire
from objdl.message import Message

A, B, C = b"peer-a", b"peer-b", b"peer-c"
HEADERS = b"\x81\xa6req_id\x01"  # opaque to the broker: any bytes will do


def table(**kw: Any) -> RoutingTable:
    args: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "cell_timeout": 3.0,
        "probe_timeout": 1.0,
        "max_message_size": 1000,
    }
    args.update(kw)
    return RoutingTable(**args)


def out(act: Actions[Any]) -> list[tuple[bytes, list[bytes]]]:
    """The sends of `act` as (peer, frames) with every frame as bytes."""
    return [(s.peer, [bytes(f) for f in s.frames]) for s in act.sends]


def reg(t: RoutingTable, peer: bytes, name: str, now: float = 0.0) -> Actions[bytes]:
    return t.handle(peer, [wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode()], now)


def msg(t: RoutingTable, peer: bytes, dest: bytes, now: float = 0.0, *extra: bytes) -> Actions[Any]:
    return t.handle(peer, [wire.KIND_MSG, dest, HEADERS, b"body", *extra], now)


def registered(**kw: Any) -> RoutingTable:
    t = table(**kw)
    assert out(reg(t, A, "site-1")) == [(A, [wire.KIND_REG_OK, b"site-1"])]
    assert out(reg(t, B, "server")) == [(B, [wire.KIND_REG_OK, b"server"])]
    return t


def only_counted(t: RoutingTable, **expected: int) -> None:
    """Every counter is zero except those named (reg_ok is ignored, and routed_bytes,
    which must move with routed, unless named)."""
    counters = t.counters()
    if "routed_bytes" not in expected:
        assert bool(counters["routed_bytes"]) == bool(counters["routed"]), counters
        counters.pop("routed_bytes")
    got = {k: v for k, v in counters.items() if v and k != "reg_ok"}
    assert got == expected


# -- registration -----------------------------------------------------------------


def test_free_name_is_granted() -> None:
    t = table()
    assert out(reg(t, A, "site-1.job-7")) == [(A, [wire.KIND_REG_OK, b"site-1.job-7"])]
    assert t.cells() == ["site-1.job-7"]
    assert t.name_of(A) == "site-1.job-7"
    assert t.counters()["reg_ok"] == 1


def test_same_connection_same_name_is_granted_again() -> None:
    t = registered()
    assert out(reg(t, A, "site-1", 1.0)) == [(A, [wire.KIND_REG_OK, b"site-1"])]
    assert t.cells() == ["server", "site-1"]


def test_second_name_on_one_connection_is_refused() -> None:
    t = registered()
    [(peer, frames)] = out(reg(t, A, "site-2"))
    assert peer == A and frames[:2] == [wire.KIND_REG_ERR, b"site-2"]
    assert frames[2].startswith(b"second name") and b"taken" not in frames[2]
    assert t.cells() == ["server", "site-1"]
    only_counted(t, reg_err_second_name=1)


def test_bad_version_is_refused_with_reason() -> None:
    t = table()
    [(peer, frames)] = out(t.handle(A, [wire.KIND_REG, b"2", b"site-1"], 0.0))
    assert peer == A and frames[:2] == [wire.KIND_REG_ERR, b"site-1"]
    assert frames[2].startswith(b"bad version")
    assert t.cells() == []
    only_counted(t, reg_err_version=1)


@pytest.mark.parametrize(
    "name",
    ["a..b", "a b", "site.site", ".x", "x" * 300, "é"],
    ids=["dots", "space", "repeat", "lead", "long", "accent"],
)
def test_invalid_name_is_refused_with_reason(name: str) -> None:
    t = table()
    act = reg(t, A, name)
    if len(name.encode()) > 255:  # too long to be a name at all: junk, not answered
        assert out(act) == []
        only_counted(t, drop_bad_name=1)
        return
    [(peer, frames)] = out(act)
    assert peer == A and frames[:2] == [wire.KIND_REG_ERR, name.encode()]
    assert frames[2].startswith(b"bad name")
    assert t.cells() == []
    only_counted(t, reg_err_bad_name=1)


def test_non_utf8_name_is_dropped() -> None:
    t = table()
    assert out(t.handle(A, [wire.KIND_REG, wire.PROTOCOL_VERSION, b"\xff\xfe"], 0.0)) == []
    only_counted(t, drop_bad_name=1)


def test_live_holder_that_answers_keeps_its_name() -> None:
    t = registered()
    assert out(reg(t, C, "site-1", 1.0)) == [(A, [wire.KIND_PING])]
    assert all(s.peer != C for s in t.tick(1.5).sends)  # not decided before the deadline
    assert out(t.handle(A, [wire.KIND_HB], 1.6)) == [(C, [wire.KIND_REG_ERR, b"site-1", b"taken"])]
    assert t.name_of(A) == "site-1" and t.name_of(C) is None
    assert [s for s in t.tick(5.0).sends if s.peer == C] == []  # the claim is gone
    assert t.counters()["probes"] == 1 and t.counters()["reg_err_taken"] == 1


def test_any_message_from_the_holder_counts_as_an_answer() -> None:
    t = registered()
    reg(t, C, "site-1", 1.0)
    act = t.handle(A, [b"JUNK"], 1.1)
    assert (C, [wire.KIND_REG_ERR, b"site-1", b"taken"]) in out(act)


def test_silent_holder_is_evicted_at_the_probe_deadline() -> None:
    t = registered()
    reg(t, C, "site-1", 1.0)
    assert t.next_deadline() <= 2.0
    assert [s for s in t.tick(1.99).sends if s.peer == C] == []
    act = t.tick(2.0)
    assert (C, [wire.KIND_REG_OK, b"site-1"]) in out(act)
    assert t.name_of(C) == "site-1" and t.name_of(A) is None
    assert t.counters()["evicted"] == 1
    # The evicted connection is a stranger now.
    assert out(msg(t, A, b"server", 2.1)) == [
        (A, [wire.KIND_NACK, b"server", wire.NACK_UNREGISTERED, HEADERS])
    ]


def test_holder_saying_bye_during_probe_grants_the_claim_at_once() -> None:
    t = registered()
    reg(t, C, "site-1", 1.0)
    assert out(t.handle(A, [wire.KIND_BYE], 1.2)) == [(C, [wire.KIND_REG_OK, b"site-1"])]
    assert t.name_of(C) == "site-1"


def test_holder_found_gone_during_probe_grants_the_claim() -> None:
    t = registered()
    [ping] = reg(t, C, "site-1", 1.0).sends
    act = t.send_failed(ping, True, 1.0)
    assert out(act) == [(C, [wire.KIND_REG_OK, b"site-1"])]
    assert t.counters()["gone"] == 1


def test_stale_holder_is_replaced_without_a_probe() -> None:
    t = registered()
    assert out(reg(t, C, "site-1", 3.5)) == [(C, [wire.KIND_REG_OK, b"site-1"])]
    assert t.counters()["probes"] == 0 and t.counters()["expired"] == 1


def test_second_claimant_during_a_probe_is_refused() -> None:
    t = registered()
    reg(t, C, "site-1", 1.0)
    assert out(reg(t, b"peer-d", "site-1", 1.1)) == [
        (b"peer-d", [wire.KIND_REG_ERR, b"site-1", b"taken"])
    ]


def test_claimant_waiting_on_a_probe_is_left_waiting() -> None:
    t = registered()
    reg(t, C, "site-1", 1.0)
    assert out(reg(t, C, "site-1", 1.1)) == []  # same claim again: no second PING
    assert out(t.handle(C, [wire.KIND_HB], 1.2)) == []  # not a stranger: no WHO
    assert out(t.handle(C, [wire.KIND_BYE], 1.3)) == []
    assert [s for s in t.tick(2.5).sends if s.peer == C] == []  # gave up: not granted
    assert t.name_of(A) == "site-1"


# -- MSG --------------------------------------------------------------------------


def test_msg_is_forwarded_with_origin_stamped_and_payload_untouched() -> None:
    t = registered()
    body, buf = bytearray(b"body"), memoryview(b"x" * 100)
    frames: list[Any] = [wire.KIND_MSG, b"server", HEADERS, body, buf]
    [send] = t.handle(A, frames, 0.1).sends
    assert send.peer == B
    assert send.frames[:2] == [wire.KIND_MSG, b"site-1"]
    assert send.frames[2] is HEADERS and send.frames[3] is body and send.frames[4] is buf
    assert t.counters()["routed"] == 1


def test_msg_without_a_body_frame_is_forwarded() -> None:
    # The destination cell, not the broker, answers it invalid_request (PROTOCOL.md).
    t = registered()
    assert out(t.handle(A, [wire.KIND_MSG, b"server", HEADERS], 0.1)) == [
        (B, [wire.KIND_MSG, b"site-1", HEADERS])
    ]
    only_counted(t, routed=1)


def test_origin_is_the_registered_name_not_what_the_sender_wrote() -> None:
    t = registered()
    frames = [wire.KIND_MSG, b"server", b"origin=server", b"server"]
    [(peer, sent)] = out(t.handle(A, frames, 0.1))
    assert peer == B and sent[1] == b"site-1" and sent[2:] == frames[2:]


def test_msg_to_own_name_comes_back() -> None:
    t = registered()
    assert out(msg(t, A, b"site-1")) == [(A, [wire.KIND_MSG, b"site-1", HEADERS, b"body"])]


def test_msg_to_unknown_name_is_nacked_unreachable_with_headers() -> None:
    t = registered()
    assert out(msg(t, A, b"site-9")) == [
        (A, [wire.KIND_NACK, b"site-9", wire.NACK_UNREACHABLE, HEADERS])
    ]
    only_counted(t, nack_unreachable=1)


def test_msg_from_unregistered_connection_is_nacked_unregistered() -> None:
    t = registered()
    assert out(msg(t, C, b"server")) == [
        (C, [wire.KIND_NACK, b"server", wire.NACK_UNREGISTERED, HEADERS])
    ]
    only_counted(t, nack_unregistered=1)


@pytest.mark.parametrize(
    "dest",
    [b"", b"a..b", b"\xff", b"x" * 300, b"a b"],
    ids=["empty", "dots", "utf8", "long", "space"],
)
def test_msg_to_invalid_name_is_dropped(dest: bytes) -> None:
    t = registered()
    assert out(msg(t, A, dest)) == []
    only_counted(t, drop_bad_name=1)


def test_oversize_msg_from_registered_cell_is_nacked_too_big() -> None:
    t = registered(max_message_size=1000)
    big = b"x" * 1000
    assert out(msg(t, A, b"server", 0.0, big)) == [
        (A, [wire.KIND_NACK, b"server", wire.NACK_TOO_BIG, HEADERS])
    ]
    only_counted(t, nack_too_big=1)


def test_message_of_exactly_the_maximum_size_is_routed() -> None:
    t = registered(max_message_size=1000)
    base = len(wire.KIND_MSG) + len(b"server") + len(HEADERS) + len(b"body")
    [(peer, _)] = out(msg(t, A, b"server", 0.0, b"x" * (1000 - base)))
    assert peer == B
    only_counted(t, routed=1)


@pytest.mark.parametrize(
    "sender, frames",
    [
        (C, [wire.KIND_MSG, b"server", HEADERS, b"x" * 2000]),  # unregistered
        (A, [wire.KIND_MSG, b"\xff", HEADERS, b"x" * 2000]),  # bad name: nothing to echo
        (A, [wire.KIND_HB, b"x" * 2000]),  # not a MSG
        (A, [wire.KIND_LIST, b"t", b"x" * 2000]),
    ],
)
def test_oversize_message_that_cannot_be_nacked_is_dropped(
    sender: bytes, frames: list[bytes]
) -> None:
    t = registered(max_message_size=1000)
    assert out(t.handle(sender, frames, 0.0)) == []
    only_counted(t, drop_too_big=1)


# -- HB, BYE, LIST ----------------------------------------------------------------


def test_heartbeat_keeps_a_cell_alive_and_silence_forgets_it() -> None:
    t = registered(cell_timeout=3.0, heartbeat_interval=0.5)
    for now in (1.0, 2.0, 3.0, 4.0):
        t.handle(A, [wire.KIND_HB], now)
        t.tick(now)
    assert t.cells() == ["site-1"]  # B (server) last spoke at 0.0
    assert t.counters()["expired"] == 1
    assert out(msg(t, A, b"server", 4.1)) == [
        (A, [wire.KIND_NACK, b"server", wire.NACK_UNREACHABLE, HEADERS])
    ]


def test_silent_cell_is_kept_until_cell_timeout() -> None:
    t = registered(cell_timeout=3.0, heartbeat_interval=0.5)
    t.tick(0.0)
    t.tick(3.0)
    assert t.cells() == ["server", "site-1"]
    t.tick(3.5)
    assert t.cells() == []


def test_heartbeat_from_unknown_connection_gets_who() -> None:
    t = registered()
    assert out(t.handle(C, [wire.KIND_HB], 0.0)) == [(C, [wire.KIND_WHO])]
    assert out(t.handle(A, [wire.KIND_HB], 0.0)) == []
    only_counted(t, who=1)


def test_broker_heartbeats_every_cell_each_interval() -> None:
    t = registered(heartbeat_interval=0.5)
    assert sorted(out(t.tick(1.0))) == [(A, [wire.KIND_HB]), (B, [wire.KIND_HB])]
    assert t.next_deadline() == 1.5
    assert out(t.tick(1.4)) == []
    assert sorted(out(t.tick(1.5))) == [(A, [wire.KIND_HB]), (B, [wire.KIND_HB])]


def test_bye_forgets_the_cell() -> None:
    t = registered()
    assert out(t.handle(A, [wire.KIND_BYE], 0.1)) == []
    assert t.cells() == ["server"] and t.name_of(A) is None
    assert out(msg(t, B, b"site-1", 0.2)) == [
        (B, [wire.KIND_NACK, b"site-1", wire.NACK_UNREACHABLE, HEADERS])
    ]
    assert out(t.handle(C, [wire.KIND_BYE], 0.3)) == []  # a stranger's BYE: nothing
    assert t.counters()["bye"] == 1


@pytest.mark.parametrize(
    "prefix, names",
    [
        (b"", b"server\nsite-1\nsite-1.job-7\nsite-10"),
        (b"site-1", b"site-1\nsite-1.job-7"),
        (b"site-1.job-7", b"site-1.job-7"),
        (b"nobody", b""),
    ],
)
def test_list_echoes_token_and_names_under_prefix(prefix: bytes, names: bytes) -> None:
    t = table()
    for i, name in enumerate(["site-10", "site-1.job-7", "server", "site-1"]):
        reg(t, b"p%d" % i, name)
    # Anyone may ask, registered or not.
    assert out(t.handle(C, [wire.KIND_LIST, b"tok", prefix], 0.0)) == [
        (C, [wire.KIND_LIST_R, b"tok", names])
    ]
    assert t.cells(prefix.decode()) == (names.decode().split("\n") if names else [])
    assert t.counters()["list"] == 1


@pytest.mark.parametrize(
    "frames, counter",
    [
        ([wire.KIND_LIST, b"t" * 65, b""], "drop_bad_frames"),
        ([wire.KIND_LIST, b"t", b"a..b"], "drop_bad_name"),
        ([wire.KIND_LIST, b"t", b"\xff"], "drop_bad_name"),
    ],
)
def test_bad_list_is_dropped(frames: list[bytes], counter: str) -> None:
    t = registered()
    assert out(t.handle(A, frames, 0.0)) == []
    only_counted(t, **{counter: 1})


# -- junk -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [b"FOO"],
        [b""],
        [wire.KIND_REG_OK, b"site-1"],
        [wire.KIND_PING],
        [wire.KIND_NACK, b"a", b"b", b"c"],
        [b"M" * 10_000, b"server"],
    ],
)
def test_unknown_kind_is_dropped(frames: list[bytes]) -> None:
    t = registered()
    assert out(t.handle(A, frames, 0.0)) == []
    only_counted(t, drop_unknown_kind=1)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [wire.KIND_HB, b"x"],
        [wire.KIND_BYE, b""],
        [wire.KIND_REG, wire.PROTOCOL_VERSION],
        [wire.KIND_REG, wire.PROTOCOL_VERSION, b"a", b"b"],
        [wire.KIND_LIST, b"t"],
        [wire.KIND_MSG, b"server"],
        [wire.KIND_MSG],
    ],
)
def test_wrong_frame_count_is_dropped(frames: list[bytes]) -> None:
    t = registered()
    assert out(t.handle(A, frames, 0.0)) == []
    only_counted(t, drop_bad_frames=1)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(
        st.one_of(
            st.sampled_from(
                [wire.KIND_MSG, wire.KIND_REG, wire.KIND_HB, wire.KIND_LIST, wire.KIND_BYE]
            ),
            st.sampled_from([b"site-1", b"server", wire.PROTOCOL_VERSION, b""]),
            st.binary(max_size=40),
        ),
        max_size=6,
    ),
    registered_sender=st.booleans(),
)
def test_any_input_yields_only_protocol_output(
    frames: list[bytes], registered_sender: bool
) -> None:
    t = registered()
    act = t.handle(A if registered_sender else C, frames, 0.5)
    broker_kinds = {
        wire.KIND_MSG,
        wire.KIND_NACK,
        wire.KIND_REG_OK,
        wire.KIND_REG_ERR,
        wire.KIND_WHO,
        wire.KIND_LIST_R,
        wire.KIND_PING,
    }
    for peer, sent in out(act):
        assert sent[0] in broker_kinds
        assert peer in (A, B, C)


# -- failed sends -----------------------------------------------------------------


def test_send_libzmq_refused_waits_and_is_retried_in_order() -> None:
    t = registered()
    t.tick(0.0)  # the first heartbeats, out of the way
    [first] = msg(t, A, b"server", 0.0, b"1").sends
    assert out(t.send_failed(first, False, 0.0)) == []  # libzmq's pipe to B is full
    assert msg(t, A, b"server", 0.0, b"2").sends == []  # waits behind the refused one
    assert t.next_deadline() == pytest.approx(_RETRY_S)
    assert out(t.tick(_RETRY_S / 2)) == []
    assert [f[-1] for _, f in out(t.tick(_RETRY_S))] == [b"1", b"2"]
    assert t.cells() == ["server", "site-1"]  # a slow cell is still a live cell
    only_counted(t, routed=2, deferred=1)


def test_a_retry_that_moves_nothing_backs_off_up_to_a_limit() -> None:
    t = registered(heartbeat_interval=100.0, cell_timeout=200.0)
    t.tick(0.0)
    [send] = msg(t, A, b"server").sends
    t.send_failed(send, False, 0.0)
    now, waits = 0.0, []
    for _ in range(12):
        now = t.next_deadline()
        [again] = t.tick(now).sends
        t.send_failed(again, False, now)
        waits.append(t.next_deadline() - now)
    assert waits[0] == pytest.approx(2 * _RETRY_S) and waits[1] == pytest.approx(4 * _RETRY_S)
    assert waits[-1] == pytest.approx(_MAX_RETRY_S)
    [again] = t.tick(t.next_deadline()).sends  # it went: the next refusal starts afresh
    [later] = msg(t, A, b"server", now).sends
    t.send_failed(later, False, 10.0)
    assert t.next_deadline() == pytest.approx(10.0 + _RETRY_S)


def test_failed_broker_message_waits_too() -> None:
    t = registered()
    t.tick(0.0)
    t.send_failed(Send(A, [wire.KIND_HB]), False, 0.1)
    assert out(t.tick(0.1 + _RETRY_S)) == [(A, [wire.KIND_HB])]
    only_counted(t, deferred=1)


# -- the per-peer byte bound --------------------------------------------------------

REPLY = wire.encode(Message({"msg_type": "rep", "req_id": 1}))[0]
FIRE = wire.encode(Message({"msg_type": "fire"}))[0]
REQUEST = wire.encode(Message({"msg_type": "req", "req_id": 1}))[0]


def bounded(limit: int = 10_000) -> RoutingTable:
    return registered(max_message_size=100_000, max_peer_queue=limit)


def big(t: RoutingTable, headers: bytes, nbytes: int, now: float = 0.0) -> Actions[Any]:
    return t.handle(A, [wire.KIND_MSG, b"server", headers, b"b", bytes(nbytes)], now)


def test_a_sent_message_counts_until_libzmq_lets_go_of_it() -> None:
    t = bounded()
    [send] = big(t, REQUEST, 6000).sends
    assert send.track and send.cost == sum(len(f) for f in send.frames) + MESSAGE_OVERHEAD
    assert t.outbound(B) == send.cost
    t.released(send)
    assert t.outbound(B) == 0


def test_request_past_the_bound_is_nacked_busy_at_once() -> None:
    t = bounded()
    [first] = big(t, REQUEST, 6000).sends
    assert out(big(t, REQUEST, 6000)) == [(A, [wire.KIND_NACK, b"server", wire.NACK_BUSY, REQUEST])]
    assert t.outbound(B) == first.cost  # the refused one was never counted
    t.released(first)
    assert [s.peer for s in big(t, REQUEST, 6000).sends] == [B]  # room again
    only_counted(t, routed=2, nack_busy=1)


@pytest.mark.parametrize("headers", [REPLY, FIRE], ids=["reply", "fire"])
def test_reply_or_fire_past_the_bound_is_dropped_and_counted(headers: bytes) -> None:
    t = bounded()
    big(t, REQUEST, 6000)
    assert out(big(t, headers, 6000)) == []  # no NACK: nobody waits for one
    only_counted(t, routed=1, drop_busy=1)


def test_headers_that_do_not_decode_are_nacked() -> None:
    t = bounded()
    big(t, REQUEST, 6000)
    assert out(big(t, b"\xc1junk", 6000))[0][1][:3] == [wire.KIND_NACK, b"server", wire.NACK_BUSY]


def test_waiting_sends_count_against_the_bound() -> None:
    t = bounded()
    [first] = big(t, REQUEST, 4000).sends
    t.send_failed(first, False, 0.0)  # waits here now, still counted
    assert t.outbound(B) == first.cost
    assert big(t, REQUEST, 4000).sends == []  # waits behind it
    assert out(big(t, REPLY, 4000)) == []  # no room for a third
    assert t.outbound(B) == 2 * first.cost
    only_counted(t, routed=2, deferred=1, drop_busy=1)


def test_broker_messages_for_a_full_peer_are_dropped() -> None:
    t = bounded()
    big(t, REQUEST, 9800)
    assert out(t.tick(0.0)) == [(A, [wire.KIND_HB])]  # B is over its bound: no HB for it
    only_counted(t, routed=1, drop_busy=1)


def test_one_message_larger_than_the_bound_goes_to_an_idle_peer() -> None:
    t = bounded()
    [send] = big(t, REPLY, 50_000).sends
    assert out(big(t, REQUEST, 10)) == [(A, [wire.KIND_NACK, b"server", wire.NACK_BUSY, REQUEST])]
    t.released(send)
    assert t.peak_outbound() == send.cost
    assert [s.peer for s in big(t, REQUEST, 10).sends] == [B]


def test_small_messages_count_only_while_they_wait() -> None:
    t = bounded()
    sends = [s for _ in range(100) for s in msg(t, A, b"server").sends]
    assert len(sends) == 100 and not any(s.track for s in sends)  # libzmq holds <= SNDHWM
    assert t.outbound(B) == 0
    t.send_failed(sends[0], False, 0.0)
    assert t.outbound(B) == sends[0].cost


def test_forgotten_peer_fails_what_waits_but_keeps_what_libzmq_holds() -> None:
    t = bounded()
    [held] = big(t, REQUEST, 3000).sends
    [waits] = big(t, REQUEST, 3000).sends
    t.send_failed(waits, False, 0.0)
    act = t.handle(B, [wire.KIND_BYE], 0.1)
    assert out(act) == [(A, [wire.KIND_NACK, b"server", wire.NACK_UNREACHABLE, REQUEST])]
    assert t.outbound(B) == held.cost  # until libzmq lets go of it: it may reconnect
    t.released(held)
    assert t.outbound(B) == 0


def test_forward_to_a_vanished_peer_is_nacked_unreachable_and_forgotten() -> None:
    t = registered()
    [fwd] = msg(t, A, b"server").sends
    act = t.send_failed(fwd, True, 0.1)
    assert out(act) == [(A, [wire.KIND_NACK, b"server", wire.NACK_UNREACHABLE, HEADERS])]
    assert t.cells() == ["site-1"]
    only_counted(t, nack_unreachable=1, gone=1)


def test_gone_peer_fails_what_waited_for_it() -> None:
    t = registered()
    t.tick(0.0)
    [first] = msg(t, A, b"server", 0.0, b"1").sends
    t.send_failed(first, False, 0.0)
    msg(t, A, b"server", 0.0, b"2")  # waits behind the first
    [retry, second] = t.tick(0.1).sends
    act = t.send_failed(retry, True, 0.1)
    nack = [wire.KIND_NACK, b"server", wire.NACK_UNREACHABLE, HEADERS]
    assert out(act) == [(A, nack)] and t.cells() == ["site-1"]
    assert out(t.send_failed(second, True, 0.1)) == [(A, nack)]
    only_counted(t, nack_unreachable=2, gone=1, deferred=1)


def test_failed_broker_message_to_a_gone_peer_is_only_counted() -> None:
    t = registered()
    act = t.send_failed(Send(A, [wire.KIND_HB]), True, 0.1)
    assert out(act) == [] and t.cells() == ["server"]
    only_counted(t, drop_send_failed=1, gone=1)


# -- misc -------------------------------------------------------------------------


def test_counters_name_every_reason_and_are_a_copy() -> None:
    t = table()
    c = t.counters()
    assert set(c) == set(COUNTERS) and not any(c.values())
    c["routed"] = 99
    assert t.counters()["routed"] == 0


def test_events_name_the_counter_and_the_peer() -> None:
    t = table()
    act = t.handle(C, [b"FOO"], 0.0)
    assert [(e.kind, e.peer) for e in act.events] == [("drop_unknown_kind", C)]


@pytest.mark.parametrize(
    "kw",
    [
        {"heartbeat_interval": 0},
        {"cell_timeout": -1},
        {"probe_timeout": 0},
        {"max_message_size": 0},
    ],
)
def test_bad_settings_raise(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        table(**kw)
