"""What arrives at a broker from another broker, checked and dispatched, with no I/O.

Three kinds of connection speak the relay protocol (docs/PROTOCOL.md, "Relay
brokers"): a *relay link* (a connection that registered a subtree here with RREG),
a *stranger* (a connection that holds no subtree but sends RREG, FWD, FNACK, ADD or
DEL: a relay registering, or one whose parent restarted and forgot it), and, at a
relay, its *parent*. Each message is checked here (frame counts, sizes, names, and
that a link speaks only for its subtree) before the :class:`~broker._tree.Tree`
routes it; a message that fails a check is dropped and counted, never answered (a
peer cannot make us amplify).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from broker import routing
from broker._relay import (
    KIND_ADD,
    KIND_DEL,
    KIND_FNACK,
    KIND_FWD,
    KIND_RREG,
    UPSTREAM,
    bytes_of,
    kind_of,
    name_of,
    nbytes,
    under,
)
from objdl import fqcn, wire

if TYPE_CHECKING:
    from broker._tree import Tree, _Link
    from broker.routing import Actions

__all__ = ["MAX_LINK_NAMES", "STRANGER_KINDS", "from_link", "from_parent", "from_stranger"]

MAX_LINK_NAMES = 100_000
"""Most names one relay link may announce."""

STRANGER_KINDS: frozenset[bytes] = frozenset({KIND_RREG, KIND_FWD, KIND_FNACK, KIND_ADD, KIND_DEL})
"""Relay kinds the table passes here from a connection that holds no subtree."""

_LINK_FRAMES: dict[bytes, tuple[float, float]] = {
    KIND_RREG: (3, 3),
    KIND_FWD: (4, math.inf),  # kind, destination, origin, headers[, body, buffers...]
    KIND_FNACK: (5, 5),  # kind, to, destination, reason, headers
    KIND_ADD: (2, 2),
    KIND_DEL: (2, 2),
    wire.KIND_REG: (3, 3),
    wire.KIND_HB: (1, 1),
    wire.KIND_LIST: (3, 3),
    wire.KIND_BYE: (1, 1),
}
_UP_FRAMES: dict[bytes, tuple[float, float]] = {
    KIND_FWD: (4, math.inf),
    KIND_FNACK: (5, 5),
    wire.KIND_LIST_R: (3, 3),
    wire.KIND_REG_OK: (2, 2),
    wire.KIND_REG_ERR: (3, 3),
    wire.KIND_HB: (1, 1),
    wire.KIND_PING: (1, 1),
    wire.KIND_WHO: (1, 1),
}
_NACK_REASONS = frozenset(
    {wire.NACK_UNREACHABLE, wire.NACK_BUSY, wire.NACK_TOO_BIG, wire.NACK_UNREGISTERED}
)
_MAX_NAMES_FRAME = 1024 * 1024


def from_link(
    tree: Tree,
    act: Actions[Any],
    peer: bytes,
    frames: Sequence[Any],
    now: float,
    identity: str | None,
) -> None:
    """One message from the relay link `peer` (a connection that holds a subtree)."""
    link = tree.links[peer]
    link.last_seen = now
    if not frames:
        tree.table._count(act, "drop_bad_frames", peer, "empty message")
        return
    kind = kind_of(frames[0])
    limits = _LINK_FRAMES.get(kind)
    if limits is None:
        tree.table._count(act, "drop_unknown_kind", peer, f"kind {kind[:16]!r} on a relay link")
        return
    if not limits[0] <= len(frames) <= limits[1]:
        tree.table._count(
            act, "drop_bad_frames", peer, f"{kind.decode()} with {len(frames)} frames"
        )
        return
    if sum(nbytes(f) for f in frames) > tree.table.max_message_size:
        _too_big(tree, act, peer, kind, frames)
    elif kind == KIND_FWD:
        _fwd_from_link(tree, act, link, frames)
    elif kind == KIND_FNACK:
        _fnack_from_link(tree, act, link, frames)
    elif kind in (KIND_ADD, KIND_DEL):
        _announced(tree, act, link, kind, frames[1], now)
    elif kind == wire.KIND_LIST:
        tree.table._list(act, peer, frames, now)
    elif kind == KIND_RREG:
        _rreg(tree, act, peer, False, frames, now, identity)
    elif kind == wire.KIND_REG:
        why = f"second name: this connection is the relay for {link.prefix!r}"
        tree.table._refuse(act, peer, bytes_of(frames[2])[:255], "reg_err_second_name", why)
    elif kind == wire.KIND_BYE:
        tree.forget_link(act, peer, f"relay {link.prefix!r} said goodbye", now)


def from_stranger(
    tree: Tree,
    act: Actions[Any],
    peer: bytes,
    is_cell: bool,
    kind: bytes,
    frames: Sequence[Any],
    now: float,
    identity: str | None,
) -> None:
    """A relay kind from a connection that holds no subtree (see STRANGER_KINDS)."""
    limits = _LINK_FRAMES[kind]
    if not limits[0] <= len(frames) <= limits[1]:
        tree.table._count(
            act, "drop_bad_frames", peer, f"{kind.decode()} with {len(frames)} frames"
        )
        return
    if sum(nbytes(f) for f in frames) > tree.table.max_message_size:
        tree.table._count(act, "drop_too_big", peer, f"{kind.decode()} too big")
        return
    if kind == KIND_RREG:
        _rreg(tree, act, peer, is_cell, frames, now, identity)
        return
    if is_cell:  # a cell speaking the relay protocol: not its to speak
        tree.table._count(act, "drop_unknown_kind", peer, f"{kind.decode()} from a cell")
        return
    # A relay whose parent forgot it (restarted): say so, and fail its message.
    tree.table._count(act, "who", peer, f"{kind.decode()} from an unknown connection")
    tree.table._deliver_send(act, routing.Send(peer, [wire.KIND_WHO]))
    if kind == KIND_FWD:
        dest, origin = name_of(frames[1]), name_of(frames[2])
        if dest is not None and origin is not None:
            nack = [
                KIND_FNACK,
                origin.encode(),
                dest.encode(),
                wire.NACK_UNREGISTERED,
                frames[3],
            ]
            tree.table._deliver_send(act, routing.Send(peer, nack))


def from_parent(tree: Tree, act: Actions[Any], frames: Sequence[Any], now: float) -> None:
    """One message from this relay's parent."""
    up = tree.up
    if up is None or not frames:
        return
    up.heard(now)
    kind = kind_of(frames[0])
    limits = _UP_FRAMES.get(kind)
    if limits is None:
        tree.table._count(act, "drop_unknown_kind", UPSTREAM, f"kind {kind[:16]!r} from the parent")
        return
    if not limits[0] <= len(frames) <= limits[1]:
        tree.table._count(
            act, "drop_bad_frames", UPSTREAM, f"{kind.decode()} with {len(frames)} frames"
        )
        return
    if sum(nbytes(f) for f in frames) > tree.table.max_message_size:
        _too_big(tree, act, UPSTREAM, kind, frames)
    elif kind == KIND_FWD:
        _fwd_from_up(tree, act, frames)
    elif kind == KIND_FNACK:
        _fnack_from_up(tree, act, frames)
    elif kind == wire.KIND_LIST_R:
        tree.list_answered(act, frames)
    elif all(nbytes(f) <= 512 for f in frames):
        tree.apply(act, up.on_frame(kind, [bytes_of(f) for f in frames], now), now)
    else:
        tree.table._count(act, "drop_bad_frames", UPSTREAM, f"oversized {kind.decode()}")


# -- relay registration --------------------------------------------------------


def _rreg(
    tree: Tree,
    act: Actions[Any],
    peer: bytes,
    is_cell: bool,
    frames: Sequence[Any],
    now: float,
    identity: str | None,
) -> None:
    raw = bytes_of(frames[2])[:255]
    refuse = tree.table._refuse
    if kind_of(frames[1]) != wire.PROTOCOL_VERSION:
        why = f"bad version: this broker speaks {wire.PROTOCOL_VERSION.decode()}"
        refuse(act, peer, raw, "relay_reg_err", why)
        return
    prefix = name_of(frames[2])
    if prefix is None:
        refuse(act, peer, raw, "relay_reg_err", "bad name: a relay's prefix must be a name")
        return
    held = tree.links.get(peer)
    mine = tree.table.name_of(peer) or tree.table._claim_of.get(peer)
    if mine is not None or is_cell or (held is not None and held.prefix != prefix):
        what = f"the relay for {held.prefix!r}" if held is not None else f"the cell {mine!r}"
        refuse(act, peer, raw, "relay_reg_err", f"second name: this connection is {what}")
        return
    if held is not None:  # registered again on the same connection: a fresh snapshot
        tree.drop_names(act, held, sorted(held.names), now)
        tree.table._count(act, "relay_reg_ok", peer, f"relay {prefix!r} registered again")
        tree.table._deliver_send(act, routing.Send(peer, [wire.KIND_REG_OK, raw]))
        return
    why = _rreg_refusal(tree, prefix, identity)
    if why:
        refuse(act, peer, raw, "relay_reg_err", why)
        holder = tree.by_prefix.get(prefix)
        if why == "taken" and holder is not None:  # a dead holder's send fails: it goes
            tree.table._deliver_send(act, routing.Send(holder.peer, [wire.KIND_PING]))
        return
    tree.add_link(peer, prefix, now)
    tree.table._count(act, "relay_reg_ok", peer, f"relay for {prefix!r}")
    tree.table._deliver_send(act, routing.Send(peer, [wire.KIND_REG_OK, raw]))


def _rreg_refusal(tree: Tree, prefix: str, identity: str | None) -> str:
    if tree.prefix is not None and not prefix.startswith(tree.prefix + fqcn.SEPARATOR):
        return (
            f"outside subtree: this broker is the relay for {tree.prefix!r}; a relay "
            f"under it must hold a prefix under {tree.prefix + '.'!r}"
        )
    if tree.table.authorize is not None:
        if tree.authorize_relay is None:
            return "not allowed: this broker takes no relays"
        why = tree.authorize_relay(identity, prefix)
        if why:
            return why if why.startswith(routing.NOT_ALLOWED) else routing.NOT_ALLOWED + why
    if prefix in tree.by_prefix:
        return "taken"
    for other in tree.by_prefix:
        if under(other, prefix) or under(prefix, other):
            return f"overlap: {prefix!r} overlaps {other!r}, which another relay holds here"
    for name in itertools.chain(tree.table._by_name, tree.table._claims):
        if under(name, prefix):
            return f"overlap: the cell {name!r} is registered here directly, under {prefix!r}"
    return ""


def _fwd_from_link(tree: Tree, act: Actions[Any], link: _Link, frames: Sequence[Any]) -> None:
    dest, origin = name_of(frames[1]), name_of(frames[2])
    if dest is None or origin is None:
        tree.table._count(act, "drop_bad_name", link.peer, "FWD with a bad name")
        return
    if not under(origin, link.prefix):
        why = f"FWD from relay {link.prefix!r} claims origin {origin!r}, outside its subtree"
        tree.table._count(act, "drop_forged_origin", link.peer, why)
        return
    tree.route(act, link.peer, origin.encode(), dest, frames[3:])


def _fwd_from_up(tree: Tree, act: Actions[Any], frames: Sequence[Any]) -> None:
    prefix = cast(str, tree.prefix)
    dest, origin = name_of(frames[1]), name_of(frames[2])
    if dest is None or origin is None:
        tree.table._count(act, "drop_bad_name", UPSTREAM, "FWD with a bad name")
        return
    if not under(dest, prefix):
        why = f"FWD from the parent for {dest!r}, outside this relay's subtree"
        tree.table._count(act, "drop_outside", UPSTREAM, why)
        return
    if under(origin, prefix):
        why = f"FWD from the parent claims origin {origin!r}, inside this relay's subtree"
        tree.table._count(act, "drop_forged_origin", UPSTREAM, why)
        return
    tree.route(act, UPSTREAM, origin.encode(), dest, frames[3:])


def _fnack_from_link(tree: Tree, act: Actions[Any], link: _Link, frames: Sequence[Any]) -> None:
    to, dest, reason = name_of(frames[1]), name_of(frames[2]), bytes_of(frames[3])[:32]
    if to is None or dest is None or reason not in _NACK_REASONS:
        tree.table._count(act, "drop_bad_name", link.peer, "FNACK with a bad name or reason")
        return
    if not under(dest, link.prefix) or under(to, link.prefix):
        why = f"FNACK from relay {link.prefix!r} about {dest!r} for {to!r}"
        tree.table._count(act, "drop_forged_origin", link.peer, why)
        return
    tree.pass_nack(act, link.peer, to, dest, reason, frames[4])


def _fnack_from_up(tree: Tree, act: Actions[Any], frames: Sequence[Any]) -> None:
    prefix = cast(str, tree.prefix)
    to, dest, reason = name_of(frames[1]), name_of(frames[2]), bytes_of(frames[3])[:32]
    if to is None or dest is None or reason not in _NACK_REASONS:
        tree.table._count(act, "drop_bad_name", UPSTREAM, "FNACK with a bad name or reason")
        return
    if not under(to, prefix) or under(dest, prefix):
        why = f"FNACK from the parent about {dest!r} for {to!r}"
        tree.table._count(act, "drop_forged_origin", UPSTREAM, why)
        return
    if reason == wire.NACK_UNREGISTERED:  # about this relay's link, not the cell
        reason = wire.NACK_UNREACHABLE
    tree.pass_nack(act, UPSTREAM, to, dest, reason, frames[4])


def _too_big(tree: Tree, act: Actions[Any], src: bytes, kind: bytes, frames: Sequence[Any]) -> None:
    if kind == KIND_FWD:
        dest, origin = name_of(frames[1]), name_of(frames[2])
        if dest is not None and origin is not None:
            tree.nack(act, src, origin.encode(), dest.encode(), wire.NACK_TOO_BIG, frames[3])
            return
    tree.table._count(act, "drop_too_big", src, f"{kind.decode('ascii', 'replace')} too big")


def _announced(
    tree: Tree, act: Actions[Any], link: _Link, kind: bytes, frame: Any, now: float
) -> None:
    if nbytes(frame) > _MAX_NAMES_FRAME:
        tree.table._count(act, "drop_bad_frames", link.peer, f"{kind.decode()} over 1 MiB")
        return
    try:
        text = bytes_of(frame).decode("utf-8")
    except UnicodeDecodeError:
        tree.table._count(act, "drop_bad_name", link.peer, f"{kind.decode()} is not UTF-8")
        return
    names = [n for n in text.split("\n") if n]
    if kind == KIND_DEL:
        tree.drop_names(act, link, [n for n in names if n in link.names], now)
        return
    added, outside, over = [], 0, 0
    for name in names:
        if name in link.names:
            continue
        if not fqcn.is_valid(name) or not under(name, link.prefix):
            outside += 1
        elif len(link.names) >= MAX_LINK_NAMES:
            over += 1
        else:
            link.names.add(name)
            added.append(name)
    if outside:
        why = f"{outside} announced names outside {link.prefix!r} (or not names)"
        tree.table._count(act, "drop_outside", link.peer, why)
    if over:
        why = f"{over} names past the {MAX_LINK_NAMES} one relay may announce"
        tree.table._count(act, "drop_too_many_names", link.peer, why)
    tree.table._counters["names_added"] += len(added)
    if added and tree.up is not None and tree.up.registered:
        tree.up_names(act, KIND_ADD, added, now)
