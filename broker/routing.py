"""The broker's routing table: names, liveness and routing decisions, with no I/O.

How it works (docs/PROTOCOL.md is the contract): the I/O shell hands every received
multipart message to :meth:`RoutingTable.handle` and calls :meth:`RoutingTable.tick`
on time; both take the current time ``now`` and return :class:`Actions` (messages to
send and events to log). A send the shell could not queue goes back through
:meth:`RoutingTable.send_failed`. Nothing here touches a socket, a thread or a clock.

The common message has a fast path: for a MSG (3 frames or more) the shell first asks
:meth:`RoutingTable.forward` with the raw destination bytes. When the MSG goes straight
to libzmq with nothing else to do (a registered sender, a live destination with nothing
outbound, untracked, within the maximum size, no probe pending), ``forward`` does what
``handle`` would have done to the table and returns the destination's peer id and the
sender's name to stamp: two dict lookups, no object built. Otherwise it changes nothing
and returns None, and the shell calls ``handle``. Names are validated once, at REG, and
live cells are found by their raw name bytes; a destination is validated only when it
misses (to tell ``drop_bad_name`` from ``NACK unreachable``).

A connection (peer id) is in one of three states:

    unknown --REG of a free name--> registered
    unknown --REG of a live cell's name--> claiming (the holder gets PING)
    claiming --holder says anything--> unknown (claimant gets REG_ERR taken)
    claiming --BYE or gone--> unknown
    claiming --holder silent for probe_timeout, leaves or is gone--> registered
               (the holder is forgotten)
    registered --BYE / silent for cell_timeout / send says gone--> unknown

Rules:
- Frame 0 is the kind. Wrong frame counts, unknown kinds, names that are not UTF-8
  FQCNs are dropped and counted, never answered (a peer cannot make us amplify).
  Exception: REG of short UTF-8 text that breaks the FQCN rules gets REG_ERR saying
  which rule, as does a REG with a protocol version other than ours.
- A message larger than ``max_message_size`` in total is dropped; a well-formed MSG
  from a registered cell gets ``NACK too_big`` with its headers frame echoed.
- MSG: only frames 0 and 1 are read. A registered sender's message goes to the
  destination with frame 1 replaced by the sender's name; an unknown destination
  gets ``NACK unreachable``, an unregistered sender ``NACK unregistered``.
- Anything heard from a registered cell renews it; HB from an unknown peer gets WHO.
- A connection holds at most one name; REG of the name it holds is answered again.
- With an ``authorize`` policy (a broker running CURVE), REG is granted only if
  ``authorize(identity, name)`` says so; ``identity`` is what authenticated the
  connection (its Z85 public key), passed in by the shell with the REG. A refusal
  is ``REG_ERR not allowed: ...`` and comes before any probe of a holder, so a key
  cannot even disturb a name it is not bound to.
- Every ``heartbeat_interval`` each registered cell gets HB.
- Relays (``broker/_tree.py``, docs/PROTOCOL.md "Relay brokers"): with ``prefix`` the
  table is a relay's, holding that subtree for its parent; any table takes relays
  that hold subtrees under it. A MSG for a name that is no cell here, REGs and LISTs
  consult the tree; frames from a relay link or the parent go to it whole.

What the broker holds for one peer is bounded in bytes (``max_peer_queue``), whatever
that peer asks for and however slowly it reads (docs/RELIABILITY.md):
- Every message for a peer, routed or broker-made, goes through one admission: it is
  sent if the peer's outbound bytes (held by libzmq, or waiting here) plus this message
  stay within the bound, or if nothing at all is outbound for that peer (one message
  larger than the bound may go alone). Otherwise it is refused: a forwarded request
  (or a message whose type the headers do not say) gets ``NACK busy`` so its sender
  learns at once; a reply, a fire-and-forget message or a broker-made message cannot
  be usefully NACKed and is dropped (``drop_busy``).
- A sent message of at least ``track_min`` bytes (default :data:`TRACK_MIN`) stays
  counted until the shell reports it :meth:`RoutingTable.released` (libzmq let go of
  it); smaller ones count only while they wait here (libzmq holds at most SNDHWM of them
  per peer, so under SNDHWM x ``track_min`` bytes; a shell without an SNDHWM passes
  ``track_min=0``: everything is tracked).
- A send libzmq refused (its per-peer pipe full) waits here, in order, counted, and
  is tried again by :meth:`RoutingTable.tick` after a short backoff (doubling while the
  peer takes nothing, up to ``_MAX_RETRY_S``); a message for a peer with messages
  waiting queues behind them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from broker import _links, _relay, _tree
from objdl import fqcn, wire
from objdl.errors import WireError
from objdl.message import MessageHeaderKey, MessageType

__all__ = [
    "COUNTERS",
    "DEFAULT_MAX_PEER_QUEUE",
    "MESSAGE_OVERHEAD",
    "NOT_ALLOWED",
    "TRACK_MIN",
    "UPSTREAM",
    "Actions",
    "Authorize",
    "Event",
    "RoutingTable",
    "Send",
]

# A received frame: bytes in tests, zmq.Frame in the broker. Anything that supports
# the buffer protocol works; payload frames are passed through untouched.
F = TypeVar("F")

COUNTERS = (
    "routed",  # MSGs queued to their destination
    "routed_bytes",  # their bytes as they go out (frames, not the per-message overhead)
    "nack_unreachable",
    "nack_unregistered",
    "nack_too_big",
    "nack_busy",  # a request for a peer over its byte bound (or whose libzmq pipe vanished)
    "drop_bad_frames",  # frame count wrong for the kind, or LIST token too long
    "drop_unknown_kind",
    "drop_bad_name",  # a name frame that is not a UTF-8 FQCN
    "drop_too_big",  # oversize and not NACKable (not a MSG, sender unregistered, bad dest)
    "drop_send_failed",  # a broker-made message (HB, REG_OK, NACK...) the peer could not take
    "drop_busy",  # a reply, fire or broker-made message for a peer over its byte bound
    "deferred",  # sends libzmq refused (its pipe to the peer full) that waited in the broker
    "reg_ok",
    "reg_err_taken",
    "reg_err_version",
    "reg_err_bad_name",
    "reg_err_second_name",
    "reg_err_not_allowed",  # the connection's key is not bound to the name (CURVE brokers)
    "probes",  # PINGs sent to a name's holder because another connection claimed it
    "evicted",  # holders that did not answer a probe in time
    "expired",  # cells silent for longer than cell_timeout
    "gone",  # cells whose connection vanished (a send found no such peer)
    "bye",
    "who",
    "list",
    *_tree.COUNTERS,
)

_MAX_KIND_BYTES = 16
_MAX_TOKEN_BYTES = 64
# A longer frame cannot be a valid name (FQCN characters are ASCII); never decode it.
_MAX_NAME_BYTES = fqcn.MAX_FQCN_LENGTH
_FRAMES = {
    wire.KIND_REG: (3, 3),
    wire.KIND_MSG: (3, math.inf),  # kind, destination, headers[, body, buffers...]
    wire.KIND_HB: (1, 1),
    wire.KIND_LIST: (3, 3),
    wire.KIND_BYE: (1, 1),
}
_TAKEN = b"taken"
# A send libzmq refused is tried again after this long, doubled while the peer takes
# nothing, up to the maximum: a peer that stopped reading costs one try per 0.25 s.
_RETRY_S = 0.002
_MAX_RETRY_S = 0.25
_NO_NACK_TYPES = frozenset({MessageType.REPLY, MessageType.FIRE})

DEFAULT_MAX_PEER_QUEUE = 64 * 1024 * 1024
"""Default bound, in bytes, on what the broker holds outbound for any one peer."""

TRACK_MIN = 1024
"""The table's default ``track_min``: sends of at least this many bytes are counted until
libzmq lets go of them. The broker derives its own from its bound and SNDHWM."""

MESSAGE_OVERHEAD = 256
"""Bytes charged per message on top of its frames (the objects that carry it)."""

UPSTREAM = _relay.UPSTREAM
"""The peer id of a relay's link to its parent, in :class:`Send` and :class:`Event`."""

NOT_ALLOWED = "not allowed: "
"""Start of the REG_ERR reason when the connection's key may not use the name."""

Authorize = Callable[[str | None, str], str]
"""``authorize(identity, name)``: ``""`` when the connection may register `name`, else why not."""


@dataclass(frozen=True, slots=True)
class Send(Generic[F]):
    """One multipart message for the shell to send to `peer` (routing id not included).

    For a forwarded MSG, `origin` is the sender's peer id and `dest` the destination's
    name, so that a failed send can be NACKed back to the sender.
    """

    peer: bytes
    frames: list[bytes | F]
    origin: bytes | None = None
    dest: bytes = b""
    cost: int = 0  # bytes charged to `peer`'s bound: the frames plus MESSAGE_OVERHEAD
    track: bool = False  # the shell must report when libzmq let go of it (released)


@dataclass(frozen=True)
class Event:
    """Something worth logging: `kind` is the counter it bumped."""

    kind: str
    peer: bytes
    detail: str = ""


@dataclass
class Actions(Generic[F]):
    """What the shell must do after a call: send these messages, log these events."""

    sends: list[Send[F]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reconnect_upstream: bool = False  # a relay: replace the socket to the parent


@dataclass
class _Cell:
    name: str
    raw: bytes  # name.encode(), stamped on every message the cell sends
    peer: bytes
    last_seen: float


@dataclass
class _Out:
    """What is outbound for one peer: bytes held by libzmq, sends waiting here."""

    held: int = 0  # cost of tracked sends handed to the shell and not yet released
    waiting: deque[Send[Any]] = field(default_factory=deque)
    waiting_bytes: int = 0
    retry: list[Send[Any]] = field(default_factory=list)  # refused by libzmq, in send order
    retry_at: float = math.inf
    backoff: float = _RETRY_S
    head: Send[Any] | None = None  # the first send of the last retry

    def total(self) -> int:
        return self.held + self.waiting_bytes

    def idle(self) -> bool:
        return not (self.held or self.waiting or self.retry)


@dataclass
class _Claim:
    name: str
    claimant: bytes
    holder: bytes
    deadline: float


def _nbytes(frame: object) -> int:
    return memoryview(cast(bytes, frame)).nbytes


def _bytes(frame: object) -> bytes:
    return frame if isinstance(frame, bytes) else bytes(memoryview(cast(bytes, frame)))


def _name(frame: object) -> str | None:
    """The frame as a str if it is short UTF-8 text, else None (decoding not attempted)."""
    if _nbytes(frame) > _MAX_NAME_BYTES:
        return None
    try:
        return _bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_name(raw: bytes) -> bool:
    """True when `raw` is the UTF-8 of a valid FQCN."""
    try:
        return fqcn.is_valid(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + fqcn.SEPARATOR)


class RoutingTable:
    """Live cells by name and connection, and every routing decision of the broker.

    Args:
        heartbeat_interval: seconds between the broker's HBs to every cell.
        cell_timeout: a cell heard from for this long is forgotten.
        probe_timeout: how long a name's holder has to answer PING before a new
            claimant takes the name.
        max_message_size: largest total size (all frames) of a message, in bytes.
        max_peer_queue: most bytes held outbound for any one peer (see the module
            docstring); one message larger than this may still go to an idle peer.
        authorize: if given, every REG must pass it (see :data:`Authorize`); the
            shell passes the connection's identity to :meth:`handle`.
        prefix: this table is a relay's, holding the subtree `prefix` for its parent
            (frames from the parent go to :meth:`handle_upstream`, frames for it to
            the peer :data:`UPSTREAM`). Default: a root broker.
        upstream_timeout: a relay takes its parent for gone after this much silence.
        max_relay_queue: most bytes held outbound for one relay link (the parent's
            or a relay's), which all the cells behind it share.
        authorize_relay: with `authorize`, may a connection hold a subtree (see
            :data:`broker._tree.AuthorizeRelay`); without it such a table takes no relays.
        track_min: sends of at least this many bytes are tracked until released
            (:data:`TRACK_MIN`); 0 tracks every send, for a shell whose socket has no
            per-peer message limit.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = 0.5,
        cell_timeout: float = 3.0,
        probe_timeout: float = 1.0,
        max_message_size: int = 256 * 1024 * 1024,
        max_peer_queue: int = DEFAULT_MAX_PEER_QUEUE,
        authorize: Authorize | None = None,
        prefix: str | None = None,
        upstream_timeout: float = 2.0,
        max_relay_queue: int = _tree.DEFAULT_MAX_RELAY_QUEUE,
        authorize_relay: _tree.AuthorizeRelay | None = None,
        track_min: int = TRACK_MIN,
    ) -> None:
        for arg, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("cell_timeout", cell_timeout),
            ("probe_timeout", probe_timeout),
            ("max_message_size", max_message_size),
            ("max_peer_queue", max_peer_queue),
        ):
            if not value > 0:
                raise ValueError(f"{arg} must be > 0, not {value!r}")
        if track_min < 0:
            raise ValueError(f"track_min must be >= 0, not {track_min!r}")
        self.heartbeat_interval = heartbeat_interval
        self.cell_timeout = cell_timeout
        self.probe_timeout = probe_timeout
        self.max_message_size = max_message_size
        self.max_peer_queue = max_peer_queue
        self.authorize = authorize
        self.track_min = track_min
        self._by_peer: dict[bytes, _Cell] = {}
        self._by_name: dict[str, _Cell] = {}
        self._by_raw: dict[bytes, _Cell] = {}  # the same cells by their name's UTF-8
        self._claims: dict[str, _Claim] = {}  # by name
        self._claim_of: dict[bytes, str] = {}  # claimant peer -> name
        self._out: dict[bytes, _Out] = {}  # only peers with something outbound
        self._peak = 0
        self._next_hb = -math.inf
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._tree = _tree.Tree(self, prefix, upstream_timeout, max_relay_queue, authorize_relay)

    # -- queries -------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """A copy of every counter (names in :data:`COUNTERS`)."""
        return dict(self._counters)

    def cells(self, prefix: str = "") -> list[str]:
        """Sorted names of live cells equal to `prefix` or under it (``""``: all)."""
        return sorted(n for n in self._by_name if _under(n, prefix))

    def name_of(self, peer: bytes) -> str | None:
        """The name `peer` registered, or None."""
        cell = self._by_peer.get(peer)
        return cell.name if cell else None

    def outbound(self, peer: bytes) -> int:
        """Bytes charged to `peer`'s bound now: held by libzmq or waiting here."""
        out = self._out.get(peer)
        return out.total() if out else 0

    def outbound_by_peer(self) -> dict[bytes, int]:
        """Bytes charged to each peer's bound now, for the peers that have any. The table
        keeps only such peers, so this costs what is queued, not how many cells there are."""
        return {peer: out.total() for peer, out in self._out.items() if out.total() > 0}

    def peak_outbound(self) -> int:
        """The most bytes ever charged to one peer's bound at once (the bound's high mark)."""
        return self._peak

    def next_deadline(self) -> float:
        """The earliest time :meth:`tick` has something to do (for the poll timeout)."""
        if not self._claims and not self._out:
            return self._next_hb
        retries = (o.retry_at for o in self._out.values() if o.retry_at < math.inf)
        claims = (c.deadline for c in self._claims.values())
        return min([self._next_hb, self._tree.next_deadline(), *claims, *retries])

    def tree_cells(self, prefix: str = "") -> list[str]:
        """Sorted live names here and under this broker's relays (what LIST answers at
        a root broker), equal to `prefix` or under it."""
        return self._tree.cells(prefix)

    def relay_links(self) -> list[_tree.LinkInfo]:
        """This broker's links to other brokers: its parent's (``"up"``), its relays'."""
        return self._tree.link_infos()

    def upstream_state(self) -> str:
        """``"none"`` for a root broker, else connecting, registered or refused."""
        return self._tree.upstream_state()

    # -- input ---------------------------------------------------------------------

    def forward(
        self, peer: bytes, dest: bytes, size: int, now: float
    ) -> tuple[bytes, bytes] | None:
        """The fast path of a MSG: ``(to, origin)`` when it goes straight out, else None.

        `dest` is frame 1 of a MSG of 3 frames or more from connection `peer` and `size`
        the bytes of all its frames. If :meth:`handle` would do nothing but forward it,
        untracked, to a peer with nothing outbound, this does to the table what
        ``handle`` would (renews the sender, counts it routed) and returns the
        destination's peer id and the sender's name: the shell sends ``[to, MSG, origin,
        *frames[2:]]`` and, should libzmq refuse it, hands that to :meth:`send_failed`
        as a :class:`Send` with ``origin=peer``. Otherwise the table is left as it was
        and the answer is None: call ``handle``.
        """
        cell = self._by_peer.get(peer)
        target = self._by_raw.get(dest)
        if cell is None or target is None or self._claims:
            return None
        to = target.peer
        nbytes = size - len(dest) + len(cell.raw)  # frame 1 goes out as the sender's name
        if nbytes >= self.track_min or size > self.max_message_size:
            return None
        out = self._out.get(to)
        if out is not None:
            if not out.idle():
                return None
            del self._out[to]  # what _deliver would do
        cell.last_seen = now
        counters = self._counters
        counters["routed"] += 1
        counters["routed_bytes"] += nbytes
        if nbytes + MESSAGE_OVERHEAD > self._peak:
            self._peak = nbytes + MESSAGE_OVERHEAD
        return to, cell.raw

    def handle(
        self, peer: bytes, frames: Sequence[F], now: float, identity: str | None = None
    ) -> Actions[F]:
        """Process one message `frames` (routing id removed) from connection `peer`.

        `identity` is what authenticated the connection (e.g. its CURVE public key),
        or None; only REG reads it, and only when the table has an ``authorize`` policy.
        """
        act: Actions[F] = Actions()
        cell = self._by_peer.get(peer)
        if cell is not None:
            cell.last_seen = now
        elif peer in self._tree.links:
            self._tree.handle_link(act, peer, frames, now, identity)
            return act
        if not frames:
            self._count(act, "drop_bad_frames", peer, "empty message")
            return act
        kind = _bytes(frames[0]) if _nbytes(frames[0]) <= _MAX_KIND_BYTES else b"?"
        if cell is not None and kind != wire.KIND_BYE:
            self._holder_answered(act, cell)
        limits = _FRAMES.get(kind)
        if limits is None:
            if kind in _links.STRANGER_KINDS:
                self._tree.handle_stranger(act, peer, cell is not None, kind, frames, now, identity)
                return act
            self._count(act, "drop_unknown_kind", peer, f"kind {kind[:16]!r}")
            return act
        if sum(_nbytes(f) for f in frames) > self.max_message_size:
            self._too_big(act, peer, cell, kind, frames)
            return act
        if not limits[0] <= len(frames) <= limits[1]:
            self._count(act, "drop_bad_frames", peer, f"{kind.decode()} with {len(frames)} frames")
            return act
        known = cell is not None or peer in self._claim_of
        if kind == wire.KIND_MSG:
            self._msg(act, peer, cell, frames)
        elif kind == wire.KIND_REG:
            self._reg(act, peer, cell, frames, now, identity)
        elif kind == wire.KIND_LIST:
            self._list(act, peer, frames, now)
        elif kind == wire.KIND_BYE:
            if known:
                self._forget(act, peer, "bye", "said goodbye", now)
        elif not known:  # HB from a connection we do not know: a restarted broker
            self._count(act, "who", peer, "heartbeat from an unknown connection")
            self._deliver(act, peer, [wire.KIND_WHO])
        return act

    def handle_upstream(self, frames: Sequence[F], now: float) -> Actions[F]:
        """Process one message from a relay's parent (the table has a ``prefix``)."""
        act: Actions[F] = Actions()
        self._tree.handle_upstream(act, frames, now)
        return act

    def upstream_replaced(self, now: float) -> None:
        """The shell replaced the socket to the parent (after ``reconnect_upstream``)."""
        self._tree.upstream_replaced(now)

    def upstream_bye(self) -> list[bytes] | None:
        """The frames to send the parent when the relay stops, if it is registered there."""
        return self._tree.upstream_bye()

    def tick(self, now: float) -> Actions[Any]:
        """Retry sends libzmq refused, resolve expired probes; every heartbeat interval,
        forget silent cells and send HB.

        Cheap between heartbeats (it looks only at pending claims and peers with sends
        waiting), so the shell may call it as often as it likes; a silent cell is
        forgotten between ``cell_timeout`` and ``cell_timeout + heartbeat_interval``
        after it was last heard.
        """
        act: Actions[Any] = Actions()
        for out in [o for o in self._out.values() if o.retry_at <= now]:
            self._flush(act, out)
        for claim in [c for c in self._claims.values() if c.deadline <= now]:
            self._count(act, "evicted", claim.holder, f"{claim.name!r} did not answer PING")
            self._forget(act, claim.holder, None, "", now)
        if now >= self._next_hb:
            self._next_hb = now + self.heartbeat_interval
            silent = [c for c in self._by_peer.values() if now - c.last_seen > self.cell_timeout]
            for cell in silent:
                self._forget(act, cell.peer, "expired", f"{cell.name!r} silent", now)
            for peer in list(self._by_peer):
                self._deliver(act, peer, [wire.KIND_HB])
            self._tree.heartbeat(act, now)
        self._tree.tick(act, now)
        return act

    def send_failed(self, send: Send[F], gone: bool, now: float) -> Actions[F]:
        """The shell could not queue `send`: its peer is `gone`, or else libzmq's pipe
        to it is full.

        A full pipe: `send` waits here, ahead of anything that came after it, and is
        tried again by :meth:`tick`. A gone peer is forgotten, and `send` and whatever
        waited for it fail: a forwarded MSG is NACKed ``unreachable`` to its sender,
        anything else is only counted.
        """
        act: Actions[F] = Actions()
        out = self._out.get(send.peer)
        if out is not None and send.track:
            out.held -= send.cost
        if not gone and self._tree.unsent(send):
            return act  # a relay's HB, RREG or LIST the parent's pipe did not take: sent again
        if not gone:
            if out is None:
                out = self._out[send.peer] = _Out()
            if not out.retry:  # the first refusal of this round sets the next try
                stuck = out.head is send  # a retry that moved nothing: back off further
                out.backoff = min(out.backoff * 2, _MAX_RETRY_S) if stuck else _RETRY_S
                out.retry_at = now + out.backoff
            out.retry.append(send)
            out.waiting_bytes += send.cost
            self._counters["deferred"] += 1
            return act
        if send.origin is not None:
            self._counters["routed"] -= 1
            self._counters["routed_bytes"] -= sum(_nbytes(f) for f in send.frames)
        self._fail_send(act, send, wire.NACK_UNREACHABLE, "connection gone")
        if send.peer in self._by_peer or send.peer in self._claim_of:
            self._forget(act, send.peer, "gone", "connection closed", now)
        elif send.peer in self._tree.links:
            self._tree.forget_link(act, send.peer, "relay connection closed", now)
        elif out is not None:
            self._fail_waiting(act, send.peer, out)
        return act

    def released(self, send: Send[Any]) -> None:
        """libzmq let go of `send` (a tracked one): it no longer counts for its peer."""
        out = self._out.get(send.peer)
        if out is None:
            return
        out.held -= send.cost
        if out.idle():
            del self._out[send.peer]

    # -- kinds ---------------------------------------------------------------------

    def _msg(self, act: Actions[F], peer: bytes, cell: _Cell | None, frames: Sequence[F]) -> None:
        dest = _bytes(frames[1]) if _nbytes(frames[1]) <= _MAX_NAME_BYTES else b""
        target = self._by_raw.get(dest)  # a live cell's name is valid: checked at REG
        if target is None and not _is_name(dest):
            self._count(act, "drop_bad_name", peer, "MSG destination is not a valid name")
            return
        if cell is None:
            self._nack(act, peer, dest, wire.NACK_UNREGISTERED, frames[2])
            return
        if target is None:  # under a relay, above this one, or nowhere
            self._tree.route_away(act, peer, cell.raw, dest.decode(), dest, frames[2:])
            return
        out: list[bytes | F] = [wire.KIND_MSG, cell.raw, *frames[2:]]
        self._deliver(act, target.peer, out, peer, dest)

    def _reg(
        self,
        act: Actions[F],
        peer: bytes,
        cell: _Cell | None,
        frames: Sequence[F],
        now: float,
        identity: str | None,
    ) -> None:
        name = _name(frames[2])
        if name is None:
            self._count(act, "drop_bad_name", peer, "REG name is not short UTF-8 text")
            return
        raw = name.encode()
        version = _bytes(frames[1]) if _nbytes(frames[1]) <= _MAX_KIND_BYTES else b"?"
        if version != wire.PROTOCOL_VERSION:
            why = f"bad version: this broker speaks {wire.PROTOCOL_VERSION.decode()}"
            self._refuse(act, peer, raw, "reg_err_version", why + f", not {version[:16]!r}")
            return
        try:
            fqcn.validate(name)
        except ValueError as exc:
            self._refuse(act, peer, raw, "reg_err_bad_name", f"bad name: {exc}")
            return
        refusal = self._tree.refuse_name(name)
        if refusal is not None:
            self._refuse(act, peer, raw, *refusal)
            return
        if self.authorize is not None:
            why = self.authorize(identity, name)
            if why:
                why = (why if why.startswith(NOT_ALLOWED) else NOT_ALLOWED + why)[:300]
                self._refuse(act, peer, raw, "reg_err_not_allowed", why)
                return
        held = cell.name if cell is not None else self._claim_of.get(peer)
        if held is not None and held != name:
            why = f"second name: this connection is {held!r}; use a new connection for {name!r}"
            self._refuse(act, peer, raw, "reg_err_second_name", why)
            return
        if held is not None and cell is None:
            return  # the same claim again: its probe is already running
        holder = self._by_name.get(name)
        if holder is not None and holder.peer != peer:
            if name in self._claims:  # another connection is already claiming it
                self._refuse(act, peer, raw, "reg_err_taken", "")
                return
            if now - holder.last_seen <= self.cell_timeout:
                self._claims[name] = _Claim(name, peer, holder.peer, now + self.probe_timeout)
                self._claim_of[peer] = name
                self._count(act, "probes", holder.peer, f"{name!r} claimed by another connection")
                self._deliver(act, holder.peer, [wire.KIND_PING])
                return
            self._forget(act, holder.peer, "expired", f"{name!r} silent", now)
        self._grant(act, peer, name, now)

    def _list(self, act: Actions[F], peer: bytes, frames: Sequence[F], now: float) -> None:
        if _nbytes(frames[1]) > _MAX_TOKEN_BYTES:
            self._count(act, "drop_bad_frames", peer, "LIST token longer than 64 bytes")
            return
        prefix = _name(frames[2])
        if prefix is None or (prefix and not fqcn.is_valid(prefix)):
            self._count(act, "drop_bad_name", peer, "LIST prefix is not a valid name")
            return
        self._counters["list"] += 1
        self._tree.answer_list(act, peer, _bytes(frames[1]), prefix, now)

    # -- helpers -------------------------------------------------------------------

    def _grant(self, act: Actions[F], peer: bytes, name: str, now: float) -> None:
        cell = _Cell(name, name.encode(), peer, now)
        self._by_peer[peer] = cell
        self._by_name[name] = cell
        self._by_raw[cell.raw] = cell
        self._count(act, "reg_ok", peer, f"registered {name!r}")
        self._deliver(act, peer, [wire.KIND_REG_OK, cell.raw])
        self._tree.added(act, name, now)

    def _refuse(self, act: Actions[F], peer: bytes, raw: bytes, counter: str, why: str) -> None:
        reason = why.encode() if why else _TAKEN
        self._count(act, counter, peer, f"REG {raw[:64]!r} refused: {reason.decode()}")
        self._deliver(act, peer, [wire.KIND_REG_ERR, raw, reason])

    def _holder_answered(self, act: Actions[F], cell: _Cell) -> None:
        claim = self._claims.get(cell.name)
        if claim is not None and claim.holder == cell.peer:
            self._drop_claim(claim)
            self._refuse(act, claim.claimant, cell.raw, "reg_err_taken", "")

    def _drop_claim(self, claim: _Claim) -> None:
        del self._claims[claim.name]
        del self._claim_of[claim.claimant]

    def _forget(
        self, act: Actions[F], peer: bytes, counter: str | None, detail: str, now: float
    ) -> None:
        """Forget `peer` as a cell or a claimant; a claim on its name is granted."""
        if counter is not None:
            self._count(act, counter, peer, detail)
        claimed = self._claim_of.get(peer)
        if claimed is not None:
            self._drop_claim(self._claims[claimed])
        out = self._out.get(peer)
        if out is not None:  # nothing more goes to a forgotten cell; its held bytes stay
            self._fail_waiting(act, peer, out)
        cell = self._by_peer.pop(peer, None)
        if cell is None:
            return
        del self._by_name[cell.name]
        self._tree.removed(act, cell.name, now)
        del self._by_raw[cell.raw]
        claim = self._claims.get(cell.name)
        if claim is not None:
            self._drop_claim(claim)
            self._grant(act, claim.claimant, cell.name, now)

    def _nack(
        self, act: Actions[F], to: bytes, dest: bytes, reason: bytes, headers: bytes | F
    ) -> None:
        self._count(act, "nack_" + reason.decode(), to, f"for {dest[:64]!r}")
        self._deliver(act, to, [wire.KIND_NACK, dest, reason, headers])

    def _too_big(
        self, act: Actions[F], peer: bytes, cell: _Cell | None, kind: bytes, frames: Sequence[F]
    ) -> None:
        if kind == wire.KIND_MSG and cell is not None and len(frames) >= 3:
            dest = _bytes(frames[1]) if _nbytes(frames[1]) <= _MAX_NAME_BYTES else b""
            if dest in self._by_raw or _is_name(dest):
                self._nack(act, peer, dest, wire.NACK_TOO_BIG, frames[2])
                return
        self._count(act, "drop_too_big", peer, f"{kind.decode('ascii', 'replace')} too big")

    def _count(self, act: Actions[F], counter: str, peer: bytes, detail: str) -> None:
        self._counters[counter] += 1
        act.events.append(Event(counter, peer, detail))

    # -- outbound bound ------------------------------------------------------------

    def _deliver(
        self,
        act: Actions[F],
        peer: bytes,
        frames: list[Any],  # bytes, or frames of type F forwarded as they came
        origin: bytes | None = None,
        dest: bytes = b"",
        force: bool = False,
    ) -> None:
        """Send, queue behind waiting sends, or refuse `frames` for `peer`, by its byte bound.

        `origin` and `dest` are the sender's peer id and the destination's name of a
        forwarded MSG (see :class:`Send`). A relay link's bound is ``max_relay_queue``;
        `force` queues it even past the bound.
        """
        nbytes = sum(_nbytes(f) for f in frames)
        cost, track = nbytes + MESSAGE_OVERHEAD, nbytes >= self.track_min
        send: Send[F] = Send(peer, frames, origin, dest, cost, track)
        out = self._out.get(peer)
        if out is not None and out.idle():  # left by a retry that went through: forget it
            del self._out[peer]
            out = None
        total = out.total() if out is not None else 0
        if total and not force and total + send.cost > self._tree.limit(peer):
            self._fail_send(act, send, wire.NACK_BUSY, "over its byte bound")
            return
        if send.origin is not None:
            self._counters["routed"] += 1
            self._counters["routed_bytes"] += nbytes
        if out is not None and (out.waiting or out.retry):
            out.waiting.append(send)
            out.waiting_bytes += send.cost
        else:
            if track:
                if out is None:
                    out = self._out[peer] = _Out()
                out.held += cost
            act.sends.append(send)
        self._peak = max(self._peak, total + cost)

    def _deliver_send(self, act: Actions[F], send: Send[Any], force: bool = False) -> None:
        """:meth:`_deliver` of a :class:`Send` made elsewhere (the relay modules build them)."""
        self._deliver(act, send.peer, list(send.frames), send.origin, send.dest, force)

    def _flush(self, act: Actions[F], out: _Out) -> None:
        """Hand every waiting send of a peer to the shell again, oldest first.

        The shell stops at the first one libzmq refuses and hands it and the rest back
        through :meth:`send_failed`, in order, so they wait again as they were.
        """
        moved = out.retry + list(out.waiting)
        out.retry, out.waiting, out.waiting_bytes = [], deque(), 0
        out.retry_at = math.inf
        out.head = moved[0] if moved else None
        for send in moved:
            if send.track:
                out.held += send.cost
            act.sends.append(cast(Send[F], send))

    def _fail_waiting(self, act: Actions[F], peer: bytes, out: _Out) -> None:
        """Everything still waiting for `peer` fails (the peer is forgotten or gone)."""
        failed = out.retry + list(out.waiting)
        out.retry, out.waiting, out.waiting_bytes = [], deque(), 0
        out.retry_at = math.inf
        if out.idle():
            del self._out[peer]
        for send in failed:
            if send.origin is not None:
                self._counters["routed"] -= 1
                self._counters["routed_bytes"] -= sum(_nbytes(f) for f in send.frames)
            self._fail_send(act, cast(Send[F], send), wire.NACK_UNREACHABLE, "peer forgotten")

    def _fail_send(self, act: Actions[F], send: Send[F], reason: bytes, why: str) -> None:
        """`send` will not reach its peer: NACK its sender if that can help, else count it."""
        if send.origin is None:
            counter = "drop_busy" if reason == wire.NACK_BUSY else "drop_send_failed"
            self._count(act, counter, send.peer, f"{_bytes(send.frames[0])[:16]!r} not sent: {why}")
            return
        if self._tree.fail_forwarded(act, send, reason, why):
            return  # it came over a relay link, or was going over one
        if reason == wire.NACK_BUSY and _msg_type(send.frames[2]) in _NO_NACK_TYPES:
            self._count(act, "drop_busy", send.peer, f"reply for {send.dest[:64]!r} dropped: {why}")
            return
        self._nack(act, send.origin, send.dest, reason, send.frames[2])


def _msg_type(headers: object) -> object:
    """The MSG_TYPE header of a headers frame, or None if it does not decode."""
    try:
        return wire.decode_headers(headers).get(MessageHeaderKey.MSG_TYPE)
    except WireError:
        return None
