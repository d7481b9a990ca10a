"""Relay brokers in the routing table: the subtrees relays hold here, and this broker's
own link to its parent when it is a relay. No I/O (the table's shell sends).

How it works (docs/PROTOCOL.md, "Relay brokers"): a relay connects a DEALER to its
parent and sends ``RREG PREFIX``; the parent then routes every name equal to
``PREFIX`` or under ``PREFIX.`` down that link (``FWD``), and the relay sends up
(``FWD``) every message for a name outside its subtree. Each link announces the live
names of its subtree (``ADD``/``DEL``, and all of them after each ``REG_OK``), so a
parent knows which names live below it. :class:`Tree` holds that state for one
:class:`~broker.routing.RoutingTable`; the table calls it where a decision concerns
another broker and it calls back the table's admission (``_deliver``).

Rules:
- Every name has one home: the deepest broker whose subtree holds it. A relay takes
  REG only of names in its subtree (``outside subtree: ``); every broker refuses REG
  of a name under a prefix one of its relays holds (``relayed: ``), so a cell may
  not register at the parent under a relay's prefix; RREG of a prefix that overlaps
  a cell or another relay here is refused (``overlap: ``), of a live relay's prefix
  ``taken`` (and that relay is PINGed, so a dead one is found at once). So a name is
  live at one broker at most, and every duplicate is refused by one broker's own
  table, across the tree.
- A name under a relay's prefix goes down only if that relay announced it; else
  ``NACK unreachable`` at once, as for a local name. A name outside this relay's
  subtree goes up while the link is registered, else ``NACK unreachable`` at once
  (local traffic goes on while the parent is away).
- Origins are stamped by the first broker (from the connection, as for any cell)
  and checked at every hop: a ``FWD`` from a relay must carry an origin inside that
  relay's subtree, a ``FWD`` from the parent one outside ours; an ``FNACK`` from a
  relay must be about a destination inside its subtree. Anything else is dropped and
  counted (``drop_forged_origin``). Names a relay announces must be in its subtree.
- No loops: nothing that came from the parent goes back up, nothing that came from a
  relay goes back down the same link.
- Bounded: at most :data:`broker._links.MAX_LINK_NAMES` names per relay link, :data:`MAX_LISTS`
  forwarded LISTs pending; what waits for a link is bounded in bytes by
  ``max_relay_queue`` (name announcements may pass it by :data:`CONTROL_SLACK`, then
  the upstream link is dropped and registered afresh).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from broker import _links, routing
from broker._relay import (
    KIND_ADD,
    KIND_DEL,
    KIND_FNACK,
    KIND_FWD,
    KIND_RREG,
    UPSTREAM,
    UpAction,
    Upstream,
    bytes_of,
    kind_of,
    under,
)
from objdl import fqcn, wire

if TYPE_CHECKING:
    from broker.routing import Actions, RoutingTable, Send

__all__ = [
    "CONTROL_SLACK",
    "COUNTERS",
    "DEFAULT_MAX_RELAY_QUEUE",
    "MAX_LISTS",
    "AuthorizeRelay",
    "LinkInfo",
    "Tree",
]

DEFAULT_MAX_RELAY_QUEUE: int = 256 * 1024 * 1024
"""Default bound, in bytes, on what a broker holds outbound for one relay link (all the
cells behind it share it)."""

MAX_LISTS = 1024
"""Most LISTs a relay forwards to its parent at once; past it, it answers from its own
subtree."""

CONTROL_SLACK = 16 * 1024 * 1024
"""How far name announcements may pass ``max_relay_queue`` before the upstream link is
taken for stuck and registered afresh."""

COUNTERS: tuple[str, ...] = (
    "relay_reg_ok",  # relays that registered a subtree here (RREG answered REG_OK)
    "relay_reg_err",  # RREGs refused (REG_ERR)
    "relay_lost",  # relay links forgotten: silent, connection gone, or BYE
    "names_added",  # names relays announced here (ADD)
    "names_removed",  # names relays withdrew (DEL), or that went with their link
    "reg_err_outside",  # REG, at a relay, of a name outside its subtree
    "reg_err_relayed",  # REG of a name under a prefix one of this broker's relays holds
    "drop_forged_origin",  # FWD/FNACK from a link speaking for a name it may not
    "drop_outside",  # a name from a link outside what it holds (ADD, FWD misrouted)
    "drop_too_many_names",  # ADDs past MAX_LINK_NAMES for one link
    "upstream_registered",  # this relay's link to its parent got REG_OK
    "upstream_lost",  # ... left the registered state (silence, WHO, stuck)
    "upstream_refused",  # ... got REG_ERR (it asks again after a backoff)
    "list_forwarded",  # LISTs this relay asked its parent (the whole tree's answer)
)

_UNSENT_OK = frozenset({wire.KIND_HB, KIND_RREG, wire.KIND_BYE, wire.KIND_LIST})
_NAMES_CHUNK = 64 * 1024  # a snapshot of names goes up in ADDs of about this size

AuthorizeRelay = Callable[[str | None, str], str]
"""``authorize_relay(identity, prefix)``: ``""`` when the connection may hold the
subtree `prefix` (the prefix and every name under it), else why not."""


@dataclass(frozen=True)
class LinkInfo:
    """One link of this broker to another, for stats and metrics.

    `direction` is ``"up"`` (this relay's link to its parent) or ``"down"`` (a relay
    that holds `prefix` here); `up` says whether it is registered now; `names` is how
    many live names it carries (for ``"up"``: this broker's subtree).
    """

    direction: str
    prefix: str
    url: str = ""
    up: bool = False
    names: int = 0


@dataclass
class _Link:
    prefix: str
    raw: bytes
    peer: bytes
    last_seen: float
    names: set[str] = field(default_factory=set)


@dataclass
class _PendingList:
    peer: bytes
    token: bytes
    prefix: str
    deadline: float


def _chunks(names: Iterable[str], size: int) -> Iterable[bytes]:
    batch: list[str] = []
    total = 0
    for name in names:
        batch.append(name)
        total += len(name) + 1
        if total >= size:
            yield "\n".join(batch).encode()
            batch, total = [], 0
    if batch:
        yield "\n".join(batch).encode()


class Tree:
    """The relay links of one routing table (see the module docstring).

    Args:
        table: the routing table this belongs to.
        prefix: this broker's subtree if it is a relay (it then has an upstream
            link), else None (a root broker).
        upstream_timeout: the parent silent this long: replace the link's socket.
        max_relay_queue: most bytes held outbound for one relay link (either way).
        authorize_relay: with CURVE, may this key hold that subtree (see
            :data:`AuthorizeRelay`); without it a table with ``authorize`` takes no
            relays.
    """

    def __init__(
        self,
        table: RoutingTable,
        prefix: str | None,
        upstream_timeout: float,
        max_relay_queue: int,
        authorize_relay: AuthorizeRelay | None,
    ) -> None:
        if prefix is not None:
            fqcn.validate(prefix)
        if not max_relay_queue > 0:
            raise ValueError(f"max_relay_queue must be > 0, not {max_relay_queue!r}")
        self.table = table
        self.prefix = prefix
        self.max_relay_queue = max_relay_queue
        self.authorize_relay = authorize_relay
        self.up: Upstream | None = None
        if prefix is not None:
            self.up = Upstream(prefix, table.heartbeat_interval, upstream_timeout)
        self.links: dict[bytes, _Link] = {}  # relays that hold a subtree here, by peer
        self.by_prefix: dict[str, _Link] = {}
        self._lists: dict[bytes, _PendingList] = {}  # LISTs forwarded up, by our token
        self._list_ids = itertools.count(1)

    # -- queries -------------------------------------------------------------------

    def cells(self, prefix: str = "") -> list[str]:
        """Live names here and in the subtrees of this broker's relays, under `prefix`."""
        names = set(self.table.cells(prefix))
        for link in self.links.values():
            if not prefix or under(link.prefix, prefix) or under(prefix, link.prefix):
                names.update(n for n in link.names if not prefix or under(n, prefix))
        return sorted(names)

    def link_infos(self) -> list[LinkInfo]:
        out = []
        if self.up is not None and self.prefix is not None:
            local = len(self.table.cells()) + sum(len(link.names) for link in self.links.values())
            out.append(LinkInfo("up", self.prefix, "", self.up.registered, local))
        for link in sorted(self.links.values(), key=lambda k: k.prefix):
            out.append(LinkInfo("down", link.prefix, "", True, len(link.names)))
        return out

    def upstream_state(self) -> str:
        """``"none"`` (a root broker), else the link's state: connecting, registered, refused."""
        return self.up.state.value if self.up is not None else "none"

    def limit(self, peer: bytes) -> int:
        """The byte bound for `peer`: ``max_relay_queue`` for a link, else per cell."""
        if peer == UPSTREAM or peer in self.links:
            return self.max_relay_queue
        return self.table.max_peer_queue

    def next_deadline(self) -> float:
        deadline = self.up.next_deadline() if self.up is not None else math.inf
        if self._lists:
            deadline = min(deadline, min(p.deadline for p in self._lists.values()))
        return deadline

    # -- hooks the table calls -----------------------------------------------------

    def refuse_name(self, name: str) -> tuple[str, str] | None:
        """(counter, reason) if a cell may not register `name` here, else None."""
        if self.prefix is not None and not under(name, self.prefix):
            return "reg_err_outside", (
                f"outside subtree: this broker is the relay for {self.prefix!r} and takes "
                f"only that name and names under it; connect {name!r} to a broker above"
            )
        link = self.link_for(name)
        if link is not None:
            return "reg_err_relayed", (
                f"relayed: {name!r} is under {link.prefix!r}, which a relay broker holds; "
                "connect to that relay"
            )
        return None

    def added(self, act: Actions[Any], name: str, now: float) -> None:
        """A cell registered here: tell the parent."""
        if self.up is not None and self.up.registered:
            self.up_names(act, KIND_ADD, [name], now)

    def removed(self, act: Actions[Any], name: str, now: float) -> None:
        """A cell here was forgotten: tell the parent."""
        if self.up is not None and self.up.registered:
            self.up_names(act, KIND_DEL, [name], now)

    def route_away(
        self,
        act: Actions[Any],
        src: bytes,
        origin: bytes,
        dest: str,
        dest_bytes: bytes,
        tail: Sequence[Any],
    ) -> None:
        """Route a message for `dest`, which is no cell here: to a relay, up, or NACK.

        `src` is the connection it came from (a cell, a relay link or UPSTREAM),
        `origin` the stamped name of its sender, `tail` its frames from headers on.
        """
        link = self.link_for(dest)
        if link is not None:
            if link.peer != src and dest in link.names:
                frames = [KIND_FWD, dest_bytes, origin, *tail]
                self.table._deliver_send(act, routing.Send(link.peer, frames, src, dest_bytes))
                return
        elif self.goes_up(src, dest) and cast(Upstream, self.up).registered:
            frames = [KIND_FWD, dest_bytes, origin, *tail]
            self.table._deliver_send(act, routing.Send(UPSTREAM, frames, src, dest_bytes))
            return
        self.nack(act, src, origin, dest_bytes, wire.NACK_UNREACHABLE, tail[0])

    def fail_forwarded(self, act: Actions[Any], send: Send[Any], reason: bytes, why: str) -> bool:
        """NACK the sender of a routed `send` that failed, if it came over a link or
        goes over one (FWD frames); False to let the table NACK a plain one."""
        assert send.origin is not None
        is_fwd = send.frames[0] == KIND_FWD
        remote = send.origin == UPSTREAM or send.origin in self.links
        if not (is_fwd or remote):
            return False
        headers = send.frames[3] if is_fwd else send.frames[2]
        origin = bytes_of(send.frames[2] if is_fwd else send.frames[1])
        if reason == wire.NACK_BUSY and routing._msg_type(headers) in routing._NO_NACK_TYPES:
            self.table._count(act, "drop_busy", send.peer, f"reply for {send.dest[:64]!r}: {why}")
            return True
        self.nack(act, send.origin, origin, send.dest, reason, headers)
        return True

    def unsent(self, send: Send[Any]) -> bool:
        """True if `send` to the parent may be dropped when libzmq refuses it (HB,
        RREG, BYE, LIST: each is sent again or answered locally in time)."""
        return send.peer == UPSTREAM and kind_of(send.frames[0]) in _UNSENT_OK

    def answer_list(
        self, act: Actions[Any], peer: bytes, token: bytes, prefix: str, now: float
    ) -> None:
        """Answer LIST: from what this broker knows if the prefix is inside its subtree
        (or it has no parent, or the parent is away), else by asking the parent."""
        up = self.up
        inside = self.prefix is not None and bool(prefix) and under(prefix, self.prefix)
        if up is not None and up.registered and not inside and len(self._lists) < MAX_LISTS:
            ours = b"r%x" % next(self._list_ids)
            self._lists[ours] = _PendingList(peer, token, prefix, now + up.timeout)
            self.table._count(act, "list_forwarded", peer, f"prefix {prefix!r}")
            self.table._deliver_send(
                act, routing.Send(UPSTREAM, [wire.KIND_LIST, ours, prefix.encode()])
            )
            return
        names = "\n".join(self.cells(prefix)).encode()
        self.table._deliver_send(act, routing.Send(peer, [wire.KIND_LIST_R, token, names]))

    def tick(self, act: Actions[Any], now: float) -> None:
        """The upstream link's timers, and forwarded LISTs the parent did not answer."""
        if self.up is not None:
            self.apply(act, self.up.tick(now), now)
        if self._lists:
            for ours, pending in list(self._lists.items()):
                if pending.deadline <= now:
                    self._answer_pending(act, ours)

    def heartbeat(self, act: Actions[Any], now: float) -> None:
        """Every heartbeat interval: forget silent relay links, HB the others."""
        for link in [k for k in self.links.values() if now - k.last_seen > self.table.cell_timeout]:
            self.forget_link(act, link.peer, f"relay {link.prefix!r} silent", now)
        for peer in self.links:
            self.table._deliver_send(act, routing.Send(peer, [wire.KIND_HB]))

    def forget_link(self, act: Actions[Any], peer: bytes, why: str, now: float) -> None:
        """Forget the relay link `peer` and every name it announced."""
        link = self.links.pop(peer, None)
        if link is None:
            return
        del self.by_prefix[link.prefix]
        self.table._count(act, "relay_lost", peer, why)
        out = self.table._out.get(peer)
        if out is not None:
            self.table._fail_waiting(act, peer, out)
        self.drop_names(act, link, sorted(link.names), now)

    def upstream_replaced(self, now: float) -> None:
        if self.up is not None:
            self.up.socket_replaced(now)

    def upstream_bye(self) -> list[bytes] | None:
        return self.up.close() if self.up is not None else None

    # -- input (checked in broker/_links.py) ---------------------------------------

    def handle_link(
        self,
        act: Actions[Any],
        peer: bytes,
        frames: Sequence[Any],
        now: float,
        identity: str | None,
    ) -> None:
        """One message from the relay link `peer` (a connection that holds a subtree)."""
        _links.from_link(self, act, peer, frames, now, identity)

    def handle_stranger(
        self,
        act: Actions[Any],
        peer: bytes,
        is_cell: bool,
        kind: bytes,
        frames: Sequence[Any],
        now: float,
        identity: str | None,
    ) -> None:
        """A relay kind (:data:`STRANGER_KINDS`) from a connection that holds no subtree."""
        _links.from_stranger(self, act, peer, is_cell, kind, frames, now, identity)

    def handle_upstream(self, act: Actions[Any], frames: Sequence[Any], now: float) -> None:
        """One message from this relay's parent."""
        _links.from_parent(self, act, frames, now)

    def add_link(self, peer: bytes, prefix: str, now: float) -> None:
        """`peer` holds the subtree `prefix` here from now on (checked by the caller)."""
        link = _Link(prefix, prefix.encode(), peer, now)
        self.links[peer] = link
        self.by_prefix[prefix] = link

    # -- messages across links -----------------------------------------------------

    def route(
        self, act: Actions[Any], src: bytes, origin: bytes, dest: str, tail: Sequence[Any]
    ) -> None:
        dest_bytes = dest.encode()
        target = self.table._by_name.get(dest)
        if target is None:
            self.route_away(act, src, origin, dest, dest_bytes, tail)
            return
        frames = [wire.KIND_MSG, origin, *tail]
        self.table._deliver_send(act, routing.Send(target.peer, frames, src, dest_bytes))

    def pass_nack(
        self, act: Actions[Any], src: bytes, to: str, dest: str, reason: bytes, headers: Any
    ) -> None:
        """Carry a NACK another broker made towards the sender `to` of the failed message."""
        cell = self.table._by_name.get(to)
        if cell is not None:
            frames: list[Any] = [wire.KIND_NACK, dest.encode(), reason, headers]
            self.table._deliver_send(act, routing.Send(cell.peer, frames))
            return
        link = self.link_for(to)
        peer: bytes | None = None
        if link is not None:
            peer = link.peer if link.peer != src else None
        elif self.goes_up(src, to):
            peer = UPSTREAM if cast(Upstream, self.up).registered else None
        if peer is None:
            self.table._count(act, "drop_send_failed", src, f"NACK for {to!r}: no route")
            return
        frames = [KIND_FNACK, to.encode(), dest.encode(), reason, headers]
        self.table._deliver_send(act, routing.Send(peer, frames))

    def nack(
        self, act: Actions[Any], src: bytes, origin: bytes, dest: bytes, reason: bytes, headers: Any
    ) -> None:
        """NACK the sender `origin` of a message that came from `src`."""
        if src == UPSTREAM or src in self.links:
            self.table._count(
                act, "nack_" + reason.decode(), src, f"for {dest[:64]!r} from {origin!r}"
            )
            frames = [KIND_FNACK, origin, dest, reason, headers]
            self.table._deliver_send(act, routing.Send(src, frames))
        else:
            self.table._nack(act, src, dest, reason, headers)

    def goes_up(self, src: bytes, name: str) -> bool:
        """True if a message for `name` from `src` is the parent's to route (never back up)."""
        return self.up is not None and src != UPSTREAM and not under(name, cast(str, self.prefix))

    def link_for(self, name: str) -> _Link | None:
        """The relay link whose subtree holds `name`, if any (prefixes never overlap)."""
        if not self.by_prefix:
            return None
        link = self.by_prefix.get(name)
        while link is None:
            name, sep, _ = name.rpartition(fqcn.SEPARATOR)
            if not sep:
                return None
            link = self.by_prefix.get(name)
        return link

    # -- names ---------------------------------------------------------------------

    def drop_names(self, act: Actions[Any], link: _Link, names: list[str], now: float) -> None:
        for name in names:
            link.names.discard(name)
        self.table._counters["names_removed"] += len(names)
        if names and self.up is not None and self.up.registered:
            self.up_names(act, KIND_DEL, names, now)

    def up_names(self, act: Actions[Any], kind: bytes, names: list[str], now: float) -> None:
        """Announce `names` to the parent: in order behind what waits, past the byte
        bound if need be (they keep the parent's view right), up to CONTROL_SLACK."""
        for chunk in _chunks(names, _NAMES_CHUNK):
            if self.table.outbound(UPSTREAM) > self.max_relay_queue + CONTROL_SLACK:
                ua = UpAction(reconnect=True)
                assert self.up is not None
                self.up.lose(now, ua, "the parent takes nothing: over the relay queue bound")
                self.apply(act, ua, now)
                return
            self.table._deliver_send(act, routing.Send(UPSTREAM, [kind, chunk]), force=True)

    def _snapshot(self) -> list[str]:
        names = list(self.table.cells())
        for link in self.links.values():
            names.extend(link.names)
        return names

    # -- the upstream link ---------------------------------------------------------

    def apply(self, act: Actions[Any], ua: UpAction, now: float) -> None:
        for frames in ua.send:
            self.table._deliver_send(act, routing.Send(UPSTREAM, list(frames)))
        if ua.refused:
            self.table._count(act, "upstream_refused", UPSTREAM, f"the parent said: {ua.refused}")
        if ua.lost:
            self.table._count(act, "upstream_lost", UPSTREAM, ua.lost)
            out = self.table._out.get(UPSTREAM)
            if out is not None:
                self.table._fail_waiting(act, UPSTREAM, out)
            for ours in list(self._lists):
                self._answer_pending(act, ours)
        if ua.reconnect:
            act.reconnect_upstream = True
        if ua.registered:
            self.table._count(act, "upstream_registered", UPSTREAM, f"holding {self.prefix!r}")
            self.up_names(act, KIND_ADD, self._snapshot(), now)

    def list_answered(self, act: Actions[Any], frames: Sequence[Any]) -> None:
        pending = self._lists.pop(bytes_of(frames[1])[:64], None)
        if pending is None:
            return
        frames_out = [wire.KIND_LIST_R, pending.token, frames[2]]
        self.table._deliver_send(act, routing.Send(pending.peer, frames_out))

    def _answer_pending(self, act: Actions[Any], ours: bytes) -> None:
        """Answer a forwarded LIST the parent will not answer, from what we know."""
        pending = self._lists.pop(ours)
        names = "\n".join(self.cells(pending.prefix)).encode()
        self.table._deliver_send(
            act, routing.Send(pending.peer, [wire.KIND_LIST_R, pending.token, names])
        )
