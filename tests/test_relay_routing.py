"""Relay rules of the RoutingTable, driven by hand with a fake clock (no sockets).

A root table takes relay links (connections that sent RREG); a relay's table (one
with a ``prefix``) also has a link to its parent, the peer UPSTREAM, whose frames go
to ``handle_upstream``. docs/PROTOCOL.md, "Relay brokers", is the contract.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker._links import MAX_LINK_NAMES
from broker._relay import KIND_ADD, KIND_DEL, KIND_FNACK, KIND_FWD, KIND_RREG, Upstream
from broker.routing import UPSTREAM, Actions, RoutingTable, Send
from objdl import wire
from objdl.message import Message

pytestmark = pytest.mark.timeout(30)

S, L, L2, X = b"peer-server", b"peer-link", b"peer-link-2", b"peer-x"
HEADERS = b"\x81\xa6req_id\x01"  # opaque to the broker
V = wire.PROTOCOL_VERSION


def out(act: Actions[Any]) -> list[tuple[bytes, list[bytes]]]:
    return [(s.peer, [bytes(f) for f in s.frames]) for s in act.sends]


def reg(t: RoutingTable, peer: bytes, name: str, now: float = 0.0) -> Actions[Any]:
    return t.handle(peer, [wire.KIND_REG, V, name.encode()], now)


def rreg(t: RoutingTable, peer: bytes, prefix: str, now: float = 0.0, **kw: Any) -> Actions[Any]:
    return t.handle(peer, [KIND_RREG, V, prefix.encode()], now, **kw)


def root_with_link(names: tuple[str, ...] = ("site-1.a",)) -> RoutingTable:
    """A root table with cell "server" (peer S) and relay link L holding "site-1"."""
    t = RoutingTable(max_message_size=10_000)
    assert out(reg(t, S, "server")) == [(S, [wire.KIND_REG_OK, b"server"])]
    assert out(rreg(t, L, "site-1")) == [(L, [wire.KIND_REG_OK, b"site-1"])]
    if names:
        assert out(t.handle(L, [KIND_ADD, "\n".join(names).encode()], 0.0)) == []
    return t


def registered_relay(prefix: str = "site-1", cells: tuple[str, ...] = ()) -> RoutingTable:
    """A relay table whose link to its parent is registered, with `cells` (peer = name)."""
    t = RoutingTable(prefix=prefix, max_message_size=10_000)
    for name in cells:
        reg(t, name.encode(), name)
    up = [sent for sent in out(t.tick(0.0)) if sent[0] == UPSTREAM]
    assert up == [(UPSTREAM, [KIND_RREG, V, prefix.encode()])]
    act = t.handle_upstream([wire.KIND_REG_OK, prefix.encode()], 0.0)
    snapshot = [(UPSTREAM, [KIND_ADD, "\n".join(cells).encode()])] if cells else []
    assert out(act) == snapshot
    assert t.upstream_state() == "registered"
    return t


# ---------------------------------------------------------------- a root and its relays


def test_names_a_relay_announced_are_routed_down_with_the_stamped_origin() -> None:
    t = root_with_link()
    act = t.handle(S, [wire.KIND_MSG, b"site-1.a", HEADERS, b"body"], 0.0)
    assert out(act) == [(L, [KIND_FWD, b"site-1.a", b"server", HEADERS, b"body"])]
    assert t.tree_cells() == ["server", "site-1.a"] and t.cells() == ["server"]


def test_a_name_under_a_relay_it_did_not_announce_is_unreachable_at_once() -> None:
    t = root_with_link()
    act = t.handle(S, [wire.KIND_MSG, b"site-1.b", HEADERS, b"body"], 0.0)
    assert out(act) == [(S, [wire.KIND_NACK, b"site-1.b", wire.NACK_UNREACHABLE, HEADERS])]
    t.handle(L, [KIND_DEL, b"site-1.a"], 0.0)
    act = t.handle(S, [wire.KIND_MSG, b"site-1.a", HEADERS], 0.0)
    assert out(act)[0][1][:3] == [wire.KIND_NACK, b"site-1.a", wire.NACK_UNREACHABLE]


def test_fwd_up_from_a_relay_reaches_a_cell_here_as_a_plain_msg() -> None:
    t = root_with_link()
    act = t.handle(L, [KIND_FWD, b"server", b"site-1.a", HEADERS, b"body"], 0.0)
    assert out(act) == [(S, [wire.KIND_MSG, b"site-1.a", HEADERS, b"body"])]


def test_a_relay_cannot_speak_for_a_name_outside_its_subtree() -> None:
    t = root_with_link()
    for origin in (b"server", b"site-10.a", b"site-2", b"site"):
        act = t.handle(L, [KIND_FWD, b"server", origin, HEADERS, b"body"], 0.0)
        assert out(act) == [], origin
    assert t.counters()["drop_forged_origin"] == 4
    # nor fake a failure for a message that never went through it
    act = t.handle(L, [KIND_FNACK, b"server", b"other", wire.NACK_UNREACHABLE, HEADERS], 0.0)
    assert out(act) == [] and t.counters()["drop_forged_origin"] == 5
    # nor announce a name outside its subtree
    t.handle(L, [KIND_ADD, b"server\nsite-2.b\nsite-1.b"], 0.0)
    assert t.tree_cells() == ["server", "site-1.a", "site-1.b"]
    assert t.counters()["drop_outside"] == 1


def test_an_fnack_from_a_relay_reaches_the_sender_as_a_nack() -> None:
    t = root_with_link()
    act = t.handle(L, [KIND_FNACK, b"server", b"site-1.a", wire.NACK_BUSY, HEADERS], 0.0)
    assert out(act) == [(S, [wire.KIND_NACK, b"site-1.a", wire.NACK_BUSY, HEADERS])]


def test_a_message_from_a_relay_for_its_own_subtree_does_not_loop_back() -> None:
    t = root_with_link()
    act = t.handle(L, [KIND_FWD, b"site-1.a", b"site-1.b", HEADERS, b"body"], 0.0)
    assert out(act) == [(L, [KIND_FNACK, b"site-1.b", b"site-1.a", wire.NACK_UNREACHABLE, HEADERS])]


def test_a_cell_may_not_register_at_the_parent_under_a_relays_prefix() -> None:
    t = root_with_link()
    for name in ("site-1", "site-1.a", "site-1.new"):
        frames = out(reg(t, X, name))[0][1]
        assert frames[0] == wire.KIND_REG_ERR and frames[2].startswith(b"relayed: "), name
    assert out(reg(t, X, "site-10"))[0][1][0] == wire.KIND_REG_OK  # whole segments only


def test_rreg_overlapping_a_cell_or_another_relay_is_refused() -> None:
    t = root_with_link()
    reg(t, X, "site-2.a")
    for prefix, why in (
        ("site-2", b"overlap: the cell 'site-2.a'"),
        ("site-1.x", b"overlap: 'site-1.x' overlaps 'site-1'"),
        ("server", b"overlap: the cell 'server'"),
    ):
        frames = out(rreg(t, L2, prefix))[0][1]
        assert frames[:2] == [wire.KIND_REG_ERR, prefix.encode()] and frames[2].startswith(why)
    assert t.counters()["relay_reg_err"] == 3


def test_a_second_relay_for_a_live_prefix_is_refused_and_the_holder_probed() -> None:
    t = root_with_link()
    act = rreg(t, L2, "site-1")
    assert out(act) == [(L2, [wire.KIND_REG_ERR, b"site-1", b"taken"]), (L, [wire.KIND_PING])]


def test_a_relay_link_that_goes_silent_takes_its_names_with_it() -> None:
    t = root_with_link()
    act = t.tick(0.0)
    assert (L, [wire.KIND_HB]) in out(act)
    t.handle(S, [wire.KIND_HB], 3.0)  # the cell here stays; the link says nothing
    t.tick(3.6)
    assert t.tree_cells() == ["server"] and t.relay_links() == []
    assert t.counters()["relay_lost"] == 1 and t.counters()["names_removed"] == 1
    act = t.handle(S, [wire.KIND_MSG, b"site-1.a", HEADERS], 3.6)
    assert out(act)[0][1][2] == wire.NACK_UNREACHABLE


def test_a_relay_link_whose_connection_is_gone_is_forgotten_and_its_sender_told() -> None:
    t = root_with_link()
    act = t.handle(S, [wire.KIND_MSG, b"site-1.a", HEADERS, b"x"], 0.0)
    act = t.send_failed(act.sends[0], gone=True, now=0.1)
    assert out(act) == [(S, [wire.KIND_NACK, b"site-1.a", wire.NACK_UNREACHABLE, HEADERS])]
    assert t.relay_links() == []


def test_a_message_for_a_relay_link_over_its_bound_is_nacked_busy() -> None:
    t = RoutingTable(max_relay_queue=5000)
    reg(t, S, "server")
    rreg(t, L, "site-1")
    t.handle(L, [KIND_ADD, b"site-1.a"], 0.0)
    request = wire.encode(Message({"msg_type": "req"}, b"y" * 3000))
    first = t.handle(S, [wire.KIND_MSG, b"site-1.a", *request], 0.0)
    assert out(first)[0][0] == L  # tracked: still held
    act = t.handle(S, [wire.KIND_MSG, b"site-1.a", *request], 0.0)
    assert out(act) == [(S, [wire.KIND_NACK, b"site-1.a", wire.NACK_BUSY, request[0]])]


def test_a_too_big_fwd_is_nacked_back_down_the_link() -> None:
    t = root_with_link()
    act = t.handle(L, [KIND_FWD, b"server", b"site-1.a", HEADERS, b"x" * 20_000], 0.0)
    assert out(act) == [(L, [KIND_FNACK, b"site-1.a", b"server", wire.NACK_TOO_BIG, HEADERS])]


def test_relay_kinds_from_a_connection_that_holds_no_subtree() -> None:
    t = root_with_link()
    act = t.handle(X, [KIND_FWD, b"server", b"site-9.a", HEADERS, b"body"], 0.0)
    assert out(act) == [
        (X, [wire.KIND_WHO]),
        (X, [KIND_FNACK, b"site-9.a", b"server", wire.NACK_UNREGISTERED, HEADERS]),
    ]
    assert out(t.handle(S, [KIND_FWD, b"server", b"server", HEADERS], 0.0)) == []  # a cell
    assert out(t.handle(X, [KIND_ADD, b"site-9.a"], 0.0)) == [(X, [wire.KIND_WHO])]
    assert t.tree_cells() == ["server", "site-1.a"]


def test_a_link_announces_at_most_max_link_names() -> None:
    t = RoutingTable()
    rreg(t, L, "site-1")
    names = [f"site-1.c{i}" for i in range(MAX_LINK_NAMES + 5)]
    for start in range(0, len(names), 40_000):
        t.handle(L, [KIND_ADD, "\n".join(names[start : start + 40_000]).encode()], 0.0)
    assert len(t.tree_cells("site-1")) == MAX_LINK_NAMES
    assert t.counters()["drop_too_many_names"] >= 1


def test_with_curve_a_relay_needs_a_key_that_may_hold_the_subtree() -> None:
    def may(identity: str | None, prefix: str) -> str:
        return "" if identity == "relay-key" and prefix == "site-1" else "key not bound"

    t = RoutingTable(authorize=lambda identity, name: "", authorize_relay=may)
    frames = out(rreg(t, L, "site-1", identity="cell-key"))[0][1]
    assert frames[0] == wire.KIND_REG_ERR and frames[2] == b"not allowed: key not bound"
    assert out(rreg(t, L, "site-1", identity="relay-key"))[0][1][0] == wire.KIND_REG_OK
    no_relays = RoutingTable(authorize=lambda identity, name: "")
    frames = out(rreg(no_relays, L2, "site-2", identity="any"))[0][1]
    assert frames[2] == b"not allowed: this broker takes no relays"


# ---------------------------------------------------------------- a relay and its parent


def test_a_relay_takes_only_names_in_its_subtree() -> None:
    t = RoutingTable(prefix="site-1")
    assert out(reg(t, b"a", "site-1"))[0][1][0] == wire.KIND_REG_OK
    assert out(reg(t, b"b", "site-1.job-7"))[0][1][0] == wire.KIND_REG_OK
    for name in ("server", "site-10", "site-2.a"):
        frames = out(reg(t, X, name))[0][1]
        assert frames[0] == wire.KIND_REG_ERR and frames[2].startswith(b"outside subtree: ")
    assert t.counters()["reg_err_outside"] == 3


def test_registration_sends_the_subtree_and_then_each_change() -> None:
    t = registered_relay(cells=("site-1.a", "site-1.b"))
    assert out(reg(t, b"c", "site-1.c"))[-1] == (UPSTREAM, [KIND_ADD, b"site-1.c"])
    act = t.handle(b"c", [wire.KIND_BYE], 0.1)
    assert out(act) == [(UPSTREAM, [KIND_DEL, b"site-1.c"])]


def test_messages_for_names_outside_go_up_and_back_down() -> None:
    t = registered_relay(cells=("site-1.a",))
    act = t.handle(b"site-1.a", [wire.KIND_MSG, b"server", HEADERS, b"body"], 0.0)
    assert out(act) == [(UPSTREAM, [KIND_FWD, b"server", b"site-1.a", HEADERS, b"body"])]
    act = t.handle_upstream([KIND_FWD, b"site-1.a", b"server", HEADERS, b"re"], 0.0)
    assert out(act) == [(b"site-1.a", [wire.KIND_MSG, b"server", HEADERS, b"re"])]
    # the parent says the destination is unreachable: the cell gets a plain NACK
    act = t.handle_upstream([KIND_FNACK, b"site-1.a", b"nobody", b"unreachable", HEADERS], 0.0)
    assert out(act) == [(b"site-1.a", [wire.KIND_NACK, b"nobody", b"unreachable", HEADERS])]
    # a name inside the subtree that is not here is unreachable at once, never sent up
    act = t.handle(b"site-1.a", [wire.KIND_MSG, b"site-1.zz", HEADERS], 0.0)
    assert out(act) == [(b"site-1.a", [wire.KIND_NACK, b"site-1.zz", b"unreachable", HEADERS])]


def test_the_parent_cannot_forge_a_local_origin_or_misroute() -> None:
    t = registered_relay(cells=("site-1.a",))
    assert out(t.handle_upstream([KIND_FWD, b"site-1.a", b"site-1.b", HEADERS], 0.0)) == []
    assert out(t.handle_upstream([KIND_FWD, b"server", b"other", HEADERS], 0.0)) == []
    fnack = [KIND_FNACK, b"site-1.a", b"site-1.b", b"unreachable", HEADERS]
    assert out(t.handle_upstream(fnack, 0.0)) == []
    c = t.counters()
    assert c["drop_forged_origin"] == 2 and c["drop_outside"] == 1


def test_a_local_request_whose_upstream_send_fails_is_nacked_with_its_headers() -> None:
    t = registered_relay(cells=("site-1.a",))
    act = t.handle(b"site-1.a", [wire.KIND_MSG, b"server", HEADERS, b"body"], 0.0)
    act = t.send_failed(act.sends[0], gone=True, now=0.0)
    assert (b"site-1.a", [wire.KIND_NACK, b"server", b"unreachable", HEADERS]) in out(act)


def test_a_delivery_from_the_parent_that_fails_here_is_fnacked_up() -> None:
    t = registered_relay(cells=("site-1.a",))
    act = t.handle_upstream([KIND_FWD, b"site-1.a", b"server", HEADERS, b"x"], 0.0)
    act = t.send_failed(act.sends[0], gone=True, now=0.0)
    assert (UPSTREAM, [KIND_FNACK, b"server", b"site-1.a", b"unreachable", HEADERS]) in out(act)


def test_while_the_parent_is_away_local_traffic_flows_and_the_rest_is_unreachable() -> None:
    t = registered_relay(cells=("site-1.a", "site-1.b"))
    t.tick(1.0)
    act = t.tick(2.6)  # nothing heard from the parent for 2 s
    assert act.reconnect_upstream and t.upstream_state() == "connecting"
    assert t.counters()["upstream_lost"] == 1
    t.upstream_replaced(2.6)
    act = t.handle(b"site-1.a", [wire.KIND_MSG, b"site-1.b", HEADERS, b"x"], 2.7)
    assert out(act) == [(b"site-1.b", [wire.KIND_MSG, b"site-1.a", HEADERS, b"x"])]
    act = t.handle(b"site-1.a", [wire.KIND_MSG, b"server", HEADERS, b"x"], 2.7)
    assert out(act) == [(b"site-1.a", [wire.KIND_NACK, b"server", b"unreachable", HEADERS])]
    # the parent is back: the whole subtree is registered again
    assert (UPSTREAM, [KIND_RREG, V, b"site-1"]) in out(t.tick(2.8))
    act = t.handle_upstream([wire.KIND_REG_OK, b"site-1"], 2.9)
    assert out(act) == [(UPSTREAM, [KIND_ADD, b"site-1.a\nsite-1.b"])]


def test_a_parent_that_restarted_says_who_and_gets_the_subtree_again() -> None:
    t = registered_relay(cells=("site-1.a",))
    act = t.handle_upstream([wire.KIND_WHO], 1.0)
    assert out(act) == [(UPSTREAM, [KIND_RREG, V, b"site-1"])] and not act.reconnect_upstream
    act = t.handle_upstream([wire.KIND_REG_OK, b"site-1"], 1.1)
    assert out(act) == [(UPSTREAM, [KIND_ADD, b"site-1.a"])]


def test_a_refused_relay_asks_again_later_and_says_why() -> None:
    t = RoutingTable(prefix="site-1")
    t.tick(0.0)
    act = t.handle_upstream([wire.KIND_REG_ERR, b"site-1", b"taken"], 0.0)
    assert t.upstream_state() == "refused" and act.events[0].kind == "upstream_refused"
    assert out(t.tick(0.4)) == [] and t.next_deadline() <= 0.5
    assert out(t.tick(0.5)) == [(UPSTREAM, [KIND_RREG, V, b"site-1"])]
    t.handle_upstream([wire.KIND_REG_ERR, b"site-1", b"taken"], 0.5)
    assert out(t.tick(1.0))  # taken: every 0.5 s (its own old link, soon gone)
    t.handle_upstream([wire.KIND_REG_ERR, b"site-1", b"not allowed: no"], 1.0)
    assert out(t.tick(1.5))
    t.handle_upstream([wire.KIND_REG_ERR, b"site-1", b"not allowed: no"], 1.5)
    assert out(t.tick(2.4)) == [] and out(t.tick(2.5))  # other refusals: the wait doubles


def test_unsent_heartbeats_to_the_parent_are_dropped_not_queued() -> None:
    t = registered_relay()
    act = t.tick(0.5)
    hb = next(s for s in act.sends if s.peer == UPSTREAM)
    assert out(t.send_failed(hb, gone=False, now=0.5)) == []
    assert t.outbound(UPSTREAM) == 0 and t.counters()["deferred"] == 0


def test_list_inside_the_subtree_is_answered_here_outside_by_the_parent() -> None:
    t = registered_relay(cells=("site-1.a",))
    act = t.handle(b"site-1.a", [wire.KIND_LIST, b"t1", b"site-1"], 0.0)
    assert out(act) == [(b"site-1.a", [wire.KIND_LIST_R, b"t1", b"site-1.a"])]
    act = t.handle(b"site-1.a", [wire.KIND_LIST, b"t2", b""], 0.0)
    ((peer, frames),) = out(act)
    assert peer == UPSTREAM and frames[0] == wire.KIND_LIST and frames[2] == b""
    act = t.handle_upstream([wire.KIND_LIST_R, frames[1], b"server\nsite-1.a"], 0.1)
    assert out(act) == [(b"site-1.a", [wire.KIND_LIST_R, b"t2", b"server\nsite-1.a"])]
    # a parent that does not answer: the relay answers with what it knows
    act = t.handle(b"site-1.a", [wire.KIND_LIST, b"t3", b"server"], 0.5)
    assert out(act)[0][0] == UPSTREAM and t.next_deadline() <= 2.5
    act = t.tick(2.5)
    assert (b"site-1.a", [wire.KIND_LIST_R, b"t3", b""]) in out(act)


def test_relays_nest_and_names_climb_the_tree() -> None:
    mid = registered_relay(cells=("site-1.a",))
    assert out(rreg(mid, L, "site-1.x")) == [(L, [wire.KIND_REG_OK, b"site-1.x"])]
    act = mid.handle(L, [KIND_ADD, b"site-1.x.c"], 0.0)
    assert out(act) == [(UPSTREAM, [KIND_ADD, b"site-1.x.c"])]
    act = mid.handle_upstream([KIND_FWD, b"site-1.x.c", b"server", HEADERS, b"b"], 0.0)
    assert out(act) == [(L, [KIND_FWD, b"site-1.x.c", b"server", HEADERS, b"b"])]
    act = mid.handle(L, [KIND_FWD, b"server", b"site-1.x.c", HEADERS, b"r"], 0.0)
    assert out(act) == [(UPSTREAM, [KIND_FWD, b"server", b"site-1.x.c", HEADERS, b"r"])]
    act = mid.handle(L, [KIND_FWD, b"site-1.a", b"site-1.x.c", HEADERS], 0.0)
    assert out(act) == [(b"site-1.a", [wire.KIND_MSG, b"site-1.x.c", HEADERS])]
    # a relay under a relay holds a prefix under it; a cell there not under the child
    frames = out(rreg(mid, L2, "site-2"))[0][1]
    assert frames[2].startswith(b"outside subtree: ")
    frames = out(reg(mid, X, "site-1.x.d"))[0][1]
    assert frames[2].startswith(b"relayed: ")
    # the child's link goes: its names leave the parent too
    act = mid.handle(L, [wire.KIND_BYE], 0.1)
    assert out(act) == [(UPSTREAM, [KIND_DEL, b"site-1.x.c"])]


def test_upstream_state_machine_times_out_only_when_registered() -> None:
    up = Upstream("site-1", heartbeat_interval=0.5, timeout=2.0)
    assert up.tick(0.0).send == [[KIND_RREG, V, b"site-1"]]
    assert not up.tick(100.0).reconnect  # connecting: keeps asking
    act = up.on_frame(wire.KIND_REG_OK, [wire.KIND_REG_OK, b"other"], 100.0)
    assert not act.registered  # not our prefix
    assert up.on_frame(wire.KIND_REG_OK, [wire.KIND_REG_OK, b"site-1"], 100.0).registered
    assert up.on_frame(wire.KIND_PING, [wire.KIND_PING], 101.0).send == [[wire.KIND_HB]]
    assert up.tick(103.1).reconnect
    with pytest.raises(ValueError, match="heartbeat_interval < upstream_timeout"):
        Upstream("site-1", heartbeat_interval=1.0, timeout=1.0)


def test_a_relay_table_takes_its_arguments_checked() -> None:
    with pytest.raises(ValueError, match="invalid cell name"):
        RoutingTable(prefix="site-1..x")
    with pytest.raises(ValueError, match="max_relay_queue"):
        RoutingTable(max_relay_queue=0)
    assert RoutingTable().upstream_state() == "none"
    assert isinstance(Send(UPSTREAM, [b"HB"]).peer, bytes)
