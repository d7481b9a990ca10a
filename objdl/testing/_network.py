"""The fake network: a broker's routing rules in process, and the faults a test sets.

How it works: a :class:`~objdl.testing.FakeCell` encodes each message with
:func:`objdl.wire.encode`, as the real cell does, and hands the frames to
:meth:`FakeNetwork._route`. Routing copies the frames (a socket copies too, so the
receiver never sees the sender's memory), refuses a message over
``max_message_size`` (``msg_too_big`` for a request), decodes it with
:func:`objdl.wire.decode` and stamps ``ORIGIN`` with the sender's name, whatever the
sender wrote. The faults then decide its fate, in this order: any matching drop
drops it; else the first matching hold keeps it until the test releases it; else the
matching delays add up and it is delivered that much later on the clock; else it is
delivered at once, on the sending thread.

Delivery looks at the target when the message arrives: a request for a cell that is
not connected (never started, stopped, killed or partitioned) comes back to its
sender as ``target_unreachable``, as the broker's NACK does; a reply or fire for one
is lost.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from objdl import fqcn as _fqcn
from objdl import wire
from objdl.errors import WireError
from objdl.message import Message, MessageHeaderKey, MessageType
from objdl.testing._clock import FakeClock

if TYPE_CHECKING:
    from objdl.testing._cell import FakeCell

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "Envelope", "FakeNetwork", "Fault", "Hold"]

_H = MessageHeaderKey
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
"""The broker's default: a message (all frames) above it is refused."""

Predicate = Callable[["Envelope"], bool]


class Envelope:
    """One message on the fake network, as faults and :attr:`FakeNetwork.log` see it.

    Attributes:
        kind: ``"req"``, ``"rep"`` or ``"fire"`` (:class:`~objdl.message.MessageType`).
        origin, target: the sender's and the addressee's names.
        channel, topic: the message's channel and topic.
        req_id: the request id it carries (replies: the request's), or None.
        secure: sent with ``secure=True`` (the fake seals nothing; see the package doc).
        size: bytes on the wire, routing frames included (what the size limit counts).
        message: the message as the receiver gets it (decoded, ``ORIGIN`` stamped).
        sent_at: the clock's time when it was sent.
        fate: ``"delivered"``, ``"dropped"``, ``"held"``, ``"delayed"``,
            ``"unreachable"``, ``"too_big"`` or ``"lost"`` (its addressee went away).
    """

    __slots__ = (
        "_nack",
        "channel",
        "fate",
        "kind",
        "message",
        "origin",
        "req_id",
        "secure",
        "sent_at",
        "size",
        "target",
        "topic",
    )

    def __init__(
        self,
        kind: str,
        origin: str,
        target: str,
        message: Message,
        secure: bool,
        size: int,
        sent_at: float,
        nack: Callable[[bytes], None] | None = None,
    ) -> None:
        self._nack = nack  # tells a request's sender the broker could not deliver it
        self.kind = kind
        self.origin = origin
        self.target = target
        self.message = message
        self.channel = message.headers.get(_H.CHANNEL, "")
        self.topic = message.headers.get(_H.TOPIC, "")
        self.req_id = message.headers.get(_H.REQ_ID)
        self.secure = secure
        self.size = size
        self.sent_at = sent_at
        self.fate = "sent"

    @property
    def rc(self) -> Any:
        """A reply's return code (None for a request or fire)."""
        return self.message.headers.get(_H.RETURN_CODE) if self.kind == MessageType.REPLY else None

    @property
    def payload(self) -> Any:
        return self.message.payload

    def matches(self, **match: Any) -> bool:
        """True if every given attribute (``origin="server"``, ``kind="rep"``...) equals."""
        return all(getattr(self, k) == v for k, v in match.items())

    def __repr__(self) -> str:
        return (
            f"Envelope({self.kind} {self.origin}->{self.target} {self.channel}/{self.topic} "
            f"req_id={self.req_id} rc={self.rc} {self.size}B {self.fate})"
        )


_MATCHABLE = frozenset({"kind", "origin", "target", "channel", "topic", "req_id", "secure"})


class Fault:
    """A rule the network applies to every message it matches, until removed.

    Made by :meth:`FakeNetwork.drop` and :meth:`FakeNetwork.delay`; usable as a
    context manager (removed at the end of the block). `hits` counts the messages
    it matched; with `count`, it applies to that many and then stops.
    """

    def __init__(
        self,
        net: FakeNetwork,
        action: str,
        when: Predicate | None,
        match: dict[str, Any],
        count: int | None,
        seconds: float | Callable[[Envelope], float] = 0.0,
    ) -> None:
        unknown = set(match) - _MATCHABLE
        if unknown:
            raise TypeError(f"cannot match on {sorted(unknown)}; use {sorted(_MATCHABLE)}")
        if count is not None and count < 1:
            raise ValueError(f"count must be None or >= 1, got {count!r}")
        self._net = net
        self.action = action
        self._when = when
        self._match = match
        self._left = count
        self.seconds = seconds
        self.hits = 0

    def _take(self, env: Envelope) -> bool:
        """Whether this fault applies to `env` (network lock held); counts the hit."""
        if self._left == 0 or not env.matches(**self._match):
            return False
        if self._when is not None and not self._when(env):
            return False
        self.hits += 1
        if self._left is not None:
            self._left -= 1
        return True

    def delay_for(self, env: Envelope) -> float:
        seconds = self.seconds(env) if callable(self.seconds) else self.seconds
        if seconds < 0:
            raise ValueError(f"a delay must be >= 0, got {seconds!r}")
        return float(seconds)

    def remove(self) -> None:
        """Stop applying this fault (messages already held or delayed keep their fate)."""
        self._net._remove_fault(self)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Fault({self.action}, match={self._match}, hits={self.hits})"


class Hold(Fault):
    """Keeps the messages it matches until :meth:`release`; see :meth:`FakeNetwork.hold`."""

    def __init__(self, net: FakeNetwork, when: Predicate | None, match: dict, count: int | None):
        super().__init__(net, "hold", when, match, count)
        self.held: list[Envelope] = []

    def release(self, order: Sequence[int] | random.Random | str | None = None) -> int:
        """Deliver held messages now, on this thread; return how many.

        Args:
            order: None for the order they came in; ``"reverse"``; a sequence of
                indices into :attr:`held` (those only, in that order); or a
                ``random.Random`` to shuffle them with.
        """
        with self._net._lock:
            held = self.held
            if order is None:
                picked = list(range(len(held)))
            elif order == "reverse":
                picked = list(range(len(held)))[::-1]
            elif isinstance(order, random.Random):
                picked = list(range(len(held)))
                order.shuffle(picked)
            elif isinstance(order, str):
                raise ValueError(f"order must be None, 'reverse', indices or a Random: {order!r}")
            else:
                picked = list(order)
                if len(set(picked)) != len(picked) or not all(0 <= i < len(held) for i in picked):
                    raise ValueError(f"order {picked} is not distinct indices below {len(held)}")
            out = [held[i] for i in picked]
            self.held = [e for i, e in enumerate(held) if i not in set(picked)]
        for env in out:
            self._net._deliver(env)
        return len(out)


class FakeNetwork:
    """An in-process network of fake cells, with a broker's rules and a test's faults.

    Args:
        clock: the clock deadlines and delays are measured on (default: a new
            :class:`FakeClock`, not autojumping).
        max_message_size: the largest message routed, all frames counted (the
            broker's ``max_message_size``).
        log_size: how many of the latest messages :attr:`log` keeps.
    """

    def __init__(
        self,
        clock: FakeClock | None = None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        log_size: int = 10_000,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.max_message_size = max_message_size
        self.log: deque[Envelope] = deque(maxlen=log_size)
        self._lock = threading.RLock()
        self._cells: dict[str, FakeCell] = {}  # the live cell of each name
        self._made: list[FakeCell] = []
        self._faults: list[Fault] = []

    # ---------------------------------------------------------------- cells

    def cell(self, name: str, **options: Any) -> FakeCell:
        """A new, not yet started, cell on this network (options: see FakeCell)."""
        from objdl.testing._cell import FakeCell

        cell = FakeCell(self, name, **options)
        with self._lock:
            self._made.append(cell)
        return cell

    def cells(self, prefix: str = "") -> list[str]:
        """Sorted names of the connected cells equal to `prefix` or under it."""
        with self._lock:
            names = [n for n, c in self._cells.items() if c.is_connected]
        return sorted(n for n in names if _under(n, prefix))

    def get(self, name: str) -> FakeCell | None:
        """The live (started, not stopped or killed) cell of that name, or None."""
        with self._lock:
            return self._cells.get(name)

    def _register(self, cell: FakeCell) -> bool:
        with self._lock:
            if cell.fqcn in self._cells:
                return False
            self._cells[cell.fqcn] = cell
            return True

    def _unregister(self, cell: FakeCell) -> None:
        with self._lock:
            if self._cells.get(cell.fqcn) is cell:
                del self._cells[cell.fqcn]

    def close(self) -> None:
        """Stop every cell made on this network (their stop callbacks run)."""
        with self._lock:
            made = list(self._made)
        for cell in made:
            cell.stop()

    def __enter__(self) -> FakeNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- faults

    def drop(
        self, when: Predicate | None = None, *, count: int | None = None, **match: Any
    ) -> Fault:
        """Lose the messages that match (all of them without `when` and `match`).

        Example: ``net.drop(kind="rep", origin="server", count=1)`` loses the next
        reply of ``server``; its requester times out.
        """
        return self._add(Fault(self, "drop", when, match, count))

    def delay(
        self,
        seconds: float | Callable[[Envelope], float],
        when: Predicate | None = None,
        *,
        count: int | None = None,
        **match: Any,
    ) -> Fault:
        """Deliver the messages that match `seconds` later on the clock (a function of the
        envelope for jitter: different delays reorder them)."""
        return self._add(Fault(self, "delay", when, match, count, seconds))

    def hold(
        self, when: Predicate | None = None, *, count: int | None = None, **match: Any
    ) -> Hold:
        """Keep the messages that match until ``.release(order)``: reorder them at will."""
        hold = Hold(self, when, match, count)
        self._add(hold)
        return hold

    def _add(self, fault: Fault) -> Any:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _remove_fault(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def partition(self, *names: str) -> None:
        """Cut these cells off the broker: they are not connected (their waiting
        requests get ``comm_error``, their sends too) and unreachable to others,
        until :meth:`heal`. Unlike the real cell, which notices after
        ``broker_timeout``, they notice at once."""
        for name in names:
            cell = self._live(name)
            cell._set_connected(False, f"connection to the broker lost: {name} was partitioned")

    def heal(self, *names: str) -> None:
        """Reconnect partitioned cells (``wait_connected`` returns True again)."""
        for name in names:
            self._live(name)._set_connected(True, "")

    def kill(self, name: str) -> None:
        """The cell's process dies: gone for every other cell at once, its name free for
        a new cell (a restart); no stop callback runs (``stop()`` still runs them).
        The dead cell's own calls get ``comm_error``."""
        cell = self._live(name)
        self._unregister(cell)
        cell._kill()

    def _live(self, name: str) -> FakeCell:
        cell = self.get(name)
        if cell is None:
            raise ValueError(f"no live cell {name!r} on this network (started, not stopped)")
        return cell

    # ---------------------------------------------------------------- routing

    def messages(self, **match: Any) -> list[Envelope]:
        """The logged messages whose attributes equal `match` (``kind="req"``...)."""
        with self._lock:
            return [e for e in self.log if e.matches(**match)]

    def _route(
        self,
        sender: FakeCell,
        kind: str,
        target: str,
        frames: list[Any],
        secure: bool,
        nack: Callable[[bytes], None] | None,
    ) -> None:
        """Take `frames` (``wire.encode``'s output) from `sender` toward `target`.

        `nack(reason)` tells the sender its request could not be delivered.
        """
        copied = [f if isinstance(f, bytes) else bytes(f) for f in frames]
        size = len(wire.KIND_MSG) + len(target.encode()) + sum(len(f) for f in copied)
        try:
            msg = wire.decode(copied)
        except WireError:  # cannot happen for frames wire.encode made; kept for safety
            msg = Message(wire.decode_headers(copied[0]) if copied else {})
        msg.headers[_H.ORIGIN] = sender.fqcn  # the broker stamps the connection's name
        env = Envelope(kind, sender.fqcn, target, msg, secure, size, self.clock(), nack)
        with self._lock:
            self.log.append(env)
            if size > self.max_message_size:
                env.fate = "too_big"
                faults: list[Fault] = []
            else:
                faults = [f for f in self._faults if f._take(env)]
        if env.fate == "too_big":
            if nack is not None:
                nack(wire.NACK_TOO_BIG)
            return
        if any(f.action == "drop" for f in faults):
            env.fate = "dropped"
            return
        holds = [f for f in faults if isinstance(f, Hold)]
        if holds:
            env.fate = "held"
            with self._lock:
                holds[0].held.append(env)
            return
        delay = sum(f.delay_for(env) for f in faults if f.action == "delay")
        if delay > 0:
            env.fate = "delayed"
            self.clock.call_later(delay, lambda: self._deliver(env))
            return
        self._deliver(env)

    def _deliver(self, env: Envelope) -> None:
        nack = env._nack
        target = self.get(env.target)
        with self.clock.busy():
            if target is None or not target.is_connected:
                env.fate = "unreachable" if env.kind == MessageType.REQUEST else "lost"
                if env.kind == MessageType.REQUEST and nack is not None:
                    nack(wire.NACK_UNREACHABLE)
                return
            env.fate = "delivered"
            target._receive(env)
        self.clock.notify()


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + _fqcn.SEPARATOR)
