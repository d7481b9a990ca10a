"""A cell's session with the broker, as a state machine with no sockets.

How it works (docs/PROTOCOL.md, "Registration" and "Liveness"):

    CONNECTING --REG_OK--> REGISTERED --silence > broker_timeout--> CONNECTING (new socket)
    CONNECTING --REG_ERR--> REFUSED (final)
    REGISTERED --WHO / NACK unregistered--> CONNECTING (same socket)
    any --close()--> CLOSED (final)

While CONNECTING the session sends ``REG`` every ``register_interval``; while
REGISTERED it sends ``HB`` every ``heartbeat_interval``. Every frame from the broker
counts as a sign of life. The I/O thread feeds it frames and the time, and carries
out the actions it returns.

With several brokers to choose from (``switch_after`` set: the cell was given a
standby), CONNECTING also ends after ``switch_after`` seconds without ``REG_OK``, and
at once on ``REG_ERR standby`` (a broker that is not the active one of its pair): both
return ``reconnect``, and the shell connects to the next broker. Each ``reconnect``
moves on; the order is the shell's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from objdl import wire

__all__ = ["Action", "Session", "SessionState"]


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    REGISTERED = "registered"
    REFUSED = "refused"
    CLOSED = "closed"


@dataclass
class Action:
    """What the I/O shell must do: send frames, replace the socket, and/or report."""

    send: list[list[bytes]] = field(default_factory=list)
    reconnect: bool = False
    registered: bool = False
    lost: str = ""  # non-empty: the session left REGISTERED, for this reason
    refused: str = ""  # non-empty: the broker refused the name, for this reason


class Session:
    """Registration and liveness of one cell's connection to the broker."""

    def __init__(
        self,
        fqcn: str,
        now: float,
        heartbeat_interval: float = 0.5,
        broker_timeout: float = 2.0,
        register_interval: float = 0.1,
        switch_after: float | None = None,
    ) -> None:
        if heartbeat_interval <= 0 or broker_timeout <= heartbeat_interval:
            raise ValueError(
                f"need 0 < heartbeat_interval < broker_timeout, got "
                f"{heartbeat_interval} and {broker_timeout}"
            )
        self.fqcn = fqcn
        self.heartbeat_interval = heartbeat_interval
        self.broker_timeout = broker_timeout
        self.register_interval = register_interval
        if switch_after is not None and switch_after <= 0:
            raise ValueError(f"switch_after must be positive, got {switch_after}")
        self.switch_after = switch_after
        self.state = SessionState.CONNECTING
        self._last_heard = now
        self._connecting_since = now
        self._next_send = now  # next REG (connecting) or HB (registered)
        self._reg = [wire.KIND_REG, wire.PROTOCOL_VERSION, fqcn.encode()]

    @property
    def registered(self) -> bool:
        return self.state is SessionState.REGISTERED

    def next_deadline(self) -> float:
        """The time by which :meth:`tick` must run next."""
        if self.state is SessionState.REGISTERED:
            return min(self._next_send, self._last_heard + self.broker_timeout)
        if self.switch_after is not None and self.state is SessionState.CONNECTING:
            return min(self._next_send, self._connecting_since + self.switch_after)
        return self._next_send

    def tick(self, now: float) -> Action:
        act = Action()
        if self.state is SessionState.REGISTERED:
            if now - self._last_heard > self.broker_timeout:
                self._to_connecting(
                    now, act, f"no word from the broker for {self.broker_timeout:g}s"
                )
                act.reconnect = True
                return act
            if now >= self._next_send:
                act.send.append([wire.KIND_HB])
                self._next_send = now + self.heartbeat_interval
        elif self.state is SessionState.CONNECTING:
            if self.switch_after is not None and now - self._connecting_since >= self.switch_after:
                act.reconnect = True  # no answer here: the next broker
                return act
            if now >= self._next_send:
                act.send.append(self._reg)
                self._next_send = now + self.register_interval
        return act

    def on_frame(self, kind: bytes, frames: list[bytes], now: float) -> Action:
        """A control frame from the broker (anything but MSG, NACK and LIST_R payloads)."""
        act = Action()
        if self.state in (SessionState.CLOSED, SessionState.REFUSED):
            return act
        self._last_heard = now
        if kind == wire.KIND_PING:
            act.send.append([wire.KIND_HB])
        elif kind == wire.KIND_REG_OK:
            if self.state is SessionState.CONNECTING and frames[1:2] == [self.fqcn.encode()]:
                self.state = SessionState.REGISTERED
                self._next_send = now + self.heartbeat_interval
                act.registered = True
        elif kind == wire.KIND_REG_ERR:
            if self.state is SessionState.CONNECTING:
                reason = frames[2] if len(frames) > 2 else b"refused"
                if reason == wire.REG_STANDBY and self.switch_after is not None:
                    # Not the active broker of its pair: the next tick moves on.
                    self._connecting_since = now - self.switch_after
                    return act
                self.state = SessionState.REFUSED
                act.refused = reason.decode("utf-8", "replace")
        elif kind == wire.KIND_WHO:
            self.forget(now, act, "the broker no longer knows this cell (restarted?)")
        return act

    def heard(self, now: float) -> None:
        """Any frame at all from the broker proves it is alive."""
        self._last_heard = now

    def forget(self, now: float, act: Action, reason: str) -> None:
        """The broker lost our registration: register again on the same socket."""
        if self.state is SessionState.REGISTERED:
            self._to_connecting(now, act, reason)
            act.send.append(self._reg)
            self._next_send = now + self.register_interval

    def socket_replaced(self, now: float) -> None:
        """The shell made a new socket: give the new connection a full timeout."""
        self._last_heard = now
        self._connecting_since = now
        self._next_send = now

    def close(self) -> list[bytes] | None:
        """Enter CLOSED; return the BYE frames to send if we were registered."""
        was = self.state
        self.state = SessionState.CLOSED
        return [wire.KIND_BYE] if was is SessionState.REGISTERED else None

    def _to_connecting(self, now: float, act: Action, reason: str) -> None:
        self.state = SessionState.CONNECTING
        self._connecting_since = now
        self._next_send = now
        self._last_heard = now
        act.lost = reason
