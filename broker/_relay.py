"""A relay broker's link to its parent, as a state machine with no sockets.

How it works (docs/PROTOCOL.md, "Relay brokers"): a relay owns the subtree ``PREFIX``
and ``PREFIX.*``. Its I/O thread holds one DEALER connected to the parent broker and
feeds this object what arrives on it and the time; the routing table
(``broker/_tree.py``) carries out what it returns.

    CONNECTING --REG_OK PREFIX--> REGISTERED (the table sends its names: ADD)
    CONNECTING --REG_ERR PREFIX--> REFUSED --backoff passed--> CONNECTING
    REGISTERED --silence > timeout--> CONNECTING on a new socket (``reconnect``)
    REGISTERED --WHO--> CONNECTING on the same socket (the parent restarted)

Rules:
- While CONNECTING it sends ``RREG`` every ``register_interval``; while REGISTERED,
  ``HB`` every ``heartbeat_interval``. Every frame from the parent is a sign of life.
- A refusal is not final: a relay is a server and must come back by itself once
  the conflict is gone (a stale link of its earlier life the parent has not dropped
  yet, a name policy fixed by the operator). It asks again after ``retry_min``
  seconds, doubling up to ``retry_max`` (but not after ``taken``: that is most often
  the link of its own earlier connection, which the parent drops within its cell
  timeout), and says why each time.
- ``lost`` reports leaving REGISTERED, so the table stops sending upstream and fails
  what waited there; ``registered`` asks it for a snapshot of the subtree's names.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import cast

from objdl import fqcn, wire

__all__ = [
    "KIND_ADD",
    "KIND_DEL",
    "KIND_FNACK",
    "KIND_FWD",
    "KIND_RREG",
    "UPSTREAM",
    "LinkState",
    "UpAction",
    "Upstream",
    "bytes_of",
    "kind_of",
    "name_of",
    "nbytes",
    "under",
]

# The relay link's own kinds (broker to broker only; docs/PROTOCOL.md "Relay brokers").
KIND_RREG = b"RREG"  # RREG, version, prefix: hold this subtree for me
KIND_FWD = b"FWD"  # FWD, destination, origin, headers, body, buffers...
KIND_FNACK = b"FNACK"  # FNACK, to, destination, reason, headers
KIND_ADD = b"ADD"  # ADD, names joined by "\n": these cells are live in my subtree
KIND_DEL = b"DEL"  # DEL, names joined by "\n": these are gone


UPSTREAM: bytes = b""
"""The peer id of a relay's link to its parent in the routing table's sends and events
(never a ROUTER routing id: those are never empty)."""

_MAX_KIND_BYTES = 16


def nbytes(frame: object) -> int:
    return memoryview(cast(bytes, frame)).nbytes


def bytes_of(frame: object) -> bytes:
    return frame if isinstance(frame, bytes) else bytes(memoryview(cast(bytes, frame)))


def kind_of(frame: object) -> bytes:
    """Frame 0 as bytes if it is short enough to be a kind, else ``b"?"``."""
    return bytes_of(frame) if nbytes(frame) <= _MAX_KIND_BYTES else b"?"


def name_of(frame: object) -> str | None:
    """The frame as a valid FQCN, or None (never decodes a frame too long to be one)."""
    if nbytes(frame) > fqcn.MAX_FQCN_LENGTH:
        return None
    try:
        text = bytes_of(frame).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if fqcn.is_valid(text) else None


def under(name: str, prefix: str) -> bool:
    """True if `name` is `prefix` or a name under it (whole segments)."""
    return name == prefix or name.startswith(prefix + fqcn.SEPARATOR)


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    REGISTERED = "registered"
    REFUSED = "refused"


@dataclass
class UpAction:
    """What the table must do for the link: send frames upstream, replace the socket,
    send the snapshot of names (``registered``), forget the link (``lost``)."""

    send: list[list[bytes]] = field(default_factory=list)
    reconnect: bool = False
    registered: bool = False
    lost: str = ""  # non-empty: the link left REGISTERED, for this reason
    refused: str = ""  # non-empty: the parent refused the prefix, for this reason


class Upstream:
    """Registration and liveness of a relay's link to its parent.

    Args:
        prefix: the subtree this relay holds (a valid FQCN, checked by the caller).
        heartbeat_interval: seconds between HBs to the parent while registered.
        timeout: the parent silent this long while registered: take it for gone,
            replace the socket and register again.
        register_interval: seconds between RREGs while connecting.
        retry_min, retry_max: the wait after a refusal, doubling from one to the other.
    """

    def __init__(
        self,
        prefix: str,
        heartbeat_interval: float = 0.5,
        timeout: float = 2.0,
        register_interval: float = 0.1,
        retry_min: float = 0.5,
        retry_max: float = 5.0,
    ) -> None:
        if not 0 < heartbeat_interval < timeout:
            raise ValueError(
                f"need 0 < heartbeat_interval < upstream_timeout, got "
                f"{heartbeat_interval} and {timeout}"
            )
        self.prefix = prefix
        self.raw = prefix.encode()
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.register_interval = register_interval
        self.retry_min, self.retry_max = retry_min, retry_max
        self.state = LinkState.CONNECTING
        self.refused = ""  # the last refusal's reason, kept for stats and logs
        self._backoff = retry_min
        self._next_send = -math.inf  # next RREG (connecting, refused) or HB (registered)
        self._last_heard = -math.inf
        self._rreg = [KIND_RREG, wire.PROTOCOL_VERSION, self.raw]

    @property
    def registered(self) -> bool:
        return self.state is LinkState.REGISTERED

    def next_deadline(self) -> float:
        """The time by which :meth:`tick` must run next."""
        if self.state is LinkState.REGISTERED:
            return min(self._next_send, self._last_heard + self.timeout)
        return self._next_send

    def tick(self, now: float) -> UpAction:
        act = UpAction()
        if self.state is LinkState.REGISTERED:
            if now - self._last_heard > self.timeout:
                self._to_connecting(now, act, f"no word from the parent for {self.timeout:g}s")
                act.reconnect = True
                return act
            if now >= self._next_send:
                act.send.append([wire.KIND_HB])
                self._next_send = now + self.heartbeat_interval
        elif now >= self._next_send:  # connecting, or refused and the backoff passed
            self.state = LinkState.CONNECTING
            act.send.append(self._rreg)
            self._next_send = now + self.register_interval
        return act

    def on_frame(self, kind: bytes, frames: list[bytes], now: float) -> UpAction:
        """A control frame from the parent (anything but FWD, FNACK and LIST_R)."""
        act = UpAction()
        self._last_heard = now
        if kind == wire.KIND_PING:
            act.send.append([wire.KIND_HB])
        elif kind == wire.KIND_REG_OK:
            if self.state is not LinkState.REGISTERED and frames[1:2] == [self.raw]:
                self.state = LinkState.REGISTERED
                self.refused = ""
                self._backoff = self.retry_min
                self._next_send = now + self.heartbeat_interval
                act.registered = True
        elif kind == wire.KIND_REG_ERR:
            if self.state is LinkState.CONNECTING and frames[1:2] == [self.raw]:
                reason = frames[2] if len(frames) > 2 else b"refused"
                self.state = LinkState.REFUSED
                self.refused = act.refused = reason.decode("utf-8", "replace")
                self._next_send = now + self._backoff
                if reason != b"taken":  # most often our own old link, soon forgotten
                    self._backoff = min(self._backoff * 2, self.retry_max)
        elif kind == wire.KIND_WHO and self.state is LinkState.REGISTERED:
            self._to_connecting(now, act, "the parent no longer knows this relay (restarted?)")
            act.send.append(self._rreg)
            self._next_send = now + self.register_interval
        return act

    def heard(self, now: float) -> None:
        """Any frame at all from the parent proves it is alive."""
        self._last_heard = now

    def socket_replaced(self, now: float) -> None:
        """The shell made a new socket: register on it at once."""
        self._last_heard = now
        self._next_send = now

    def lose(self, now: float, act: UpAction, reason: str) -> None:
        """The table gives up on the link (the parent takes nothing): start afresh."""
        if self.state is LinkState.REGISTERED:
            self._to_connecting(now, act, reason)
        act.reconnect = True

    def close(self) -> list[bytes] | None:
        """The BYE frames to send when the relay stops, if it is registered."""
        return [wire.KIND_BYE] if self.state is LinkState.REGISTERED else None

    def _to_connecting(self, now: float, act: UpAction, reason: str) -> None:
        self.state = LinkState.CONNECTING
        self._next_send = now
        self._last_heard = now
        act.lost = reason
