"""The sans-I/O core of a cell: correlation, admission, session and sealing decisions.

How it works. A :class:`CellCore` never touches a socket, a thread or the clock; the
shell that owns the socket (the threaded :class:`~objdl.cell._io.IOThread`, or any
other) feeds it and carries out what it returns:

- ``on_tick(now)`` drives the :class:`~objdl._session.Session` (states CONNECTING ->
  REGISTERED -> CONNECTING on silence or WHO; REFUSED and CLOSED are final) and returns
  its :class:`~objdl._session.Action`: control frames to send at once, a socket to
  replace, and whether the cell became registered, lost or refused.
- ``on_frames(frames, now)`` takes one message from the broker. A MSG reply resolves
  the request waiting under its ``req_id`` *from that origin* (anything else is a late
  or forged reply: counted and dropped); a request or fire runs at once if its handler
  is inline, else is admitted (``max_pending``; beyond, ``service_unavailable``) and
  handed to ``dispatch`` (the shell's pool); a NACK resolves the request it names with
  the mapped return code; a LIST_R resolves its query; other kinds go to the session.
- ``submit``, ``fire``, ``send_reply`` and ``list_query`` may be called from any
  thread: they encode, register the waiter *before* queuing, append frames to
  :attr:`out` and call ``wake``. The shell sends :attr:`out` in order while
  registered and clears it while not (calls made then have already failed).

Rules: request ids are random 63-bit integers (a third party cannot guess one to
pre-answer); every counter lives in :attr:`stats`; names from the network are
validated before use and cached (bounded); sealed messages are opened by the
:class:`~objdl.cell._secure.Opener` (requests on the pool, replies here).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from objdl import fqcn as _fqcn
from objdl import wire
from objdl._logutil import RateLimitedLog
from objdl._session import Action, Session
from objdl.cell._handlers import Handlers
from objdl.cell._links import LinkClient, LinkServer, LinkTable
from objdl.cell._pending import OnDone, PendingRequest, Sealed, Waiters
from objdl.cell._secure import Opener
from objdl.errors import CellError, WireError
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, make_reply
from objdl.security import SecureUnavailableError
from objdl.security._seal import seal_of

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = ["CellCore", "Dispatch"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
_NACK_RC = {
    wire.NACK_UNREACHABLE: ReturnCode.TARGET_UNREACHABLE,
    wire.NACK_BUSY: ReturnCode.COMM_ERROR,
    wire.NACK_TOO_BIG: ReturnCode.MSG_TOO_BIG,
    wire.NACK_UNREGISTERED: ReturnCode.COMM_ERROR,
}
_NAME_CACHE = 4096  # names come from the network and from callers: caches stay bounded
_SECURE_MSG = (
    "secure=True needs end-to-end keys, which cell {} does not have: give it curve_keys= "
    "(its key pair) and peer_keys= (its peers' public keys); refusing rather than sending "
    "plaintext (or use secure=False on a trusted network)"
)
Dispatch = Callable[["Message | Sealed", str], None]


def new_request_id() -> int:
    """A random, non-zero 63-bit request id."""
    return (int.from_bytes(os.urandom(8), "little") >> 1) or 1


def _hold_plain(sealed: list[Any], plain: list[Any]) -> None:
    """Keep `plain`'s buffers alive for as long as any sealed bulk frame of `sealed` is.

    Whoever watches a buffer's lifetime to know when it has left the process (the
    owner's per-site budget of chunk data does) would otherwise see it released as
    soon as it is sealed, while its sealed copy still waits in the outbox and in
    libzmq. Each sealed bulk frame becomes a memoryview (pyzmq holds the object it
    sends with ``copy=False`` until libzmq is done with it) whose finalizer holds the
    plaintext frames.
    """
    for i in range(2, len(sealed)):
        view = memoryview(sealed[i])
        weakref.finalize(view, _noop, plain)
        sealed[i] = view


def _noop(_: Any) -> None:
    pass


class CellCore:
    """The protocol state of one cell; see the module docstring for how it is driven.

    Args:
        fqcn: the cell's (validated) name.
        now: the time the session starts.
        wake: tells the shell that :attr:`out` has frames (any thread may call it).
        max_pending: requests allowed to wait for a pool thread.
        heartbeat_interval, broker_timeout: the session's liveness settings.
        e2e: the cell's end-to-end keys, or None.
        switch_after: with standby brokers, how long to wait for one broker's REG_OK
            before the shell moves to the next (None: one broker).
    """

    def __init__(
        self,
        fqcn: str,
        now: float,
        wake: Callable[[], None],
        *,
        max_pending: int = 1024,
        heartbeat_interval: float = 0.5,
        broker_timeout: float = 2.0,
        e2e: EndToEnd | None = None,
        switch_after: float | None = None,
    ) -> None:
        self.fqcn = fqcn
        self.out: deque[list[Any]] = deque()
        self.wake = wake
        self.dispatch: Dispatch = self._no_pool
        self.session = Session(
            fqcn, now, heartbeat_interval, broker_timeout, switch_after=switch_after
        )
        self.waiters = Waiters()
        self.e2e = e2e
        self.stats: dict[str, int] = {
            "sent": 0,
            "received": 0,
            "dropped_malformed": 0,
            "dropped_late_reply": 0,
            "reconnects": 0,
            "rejected_secure": 0,
            "resent_secure": 0,
        }
        self.stats_lock = threading.Lock()
        self.opener = Opener(
            fqcn,
            e2e,
            self.stats,
            self.stats_lock,
            self.waiters,
            self.send_reply,
            self.drop,
            self.resend,
        )
        self.handlers = Handlers(fqcn, max_pending, self.send_reply, self.opener.open_request)
        self.link_server: LinkServer | None = None  # an owner's data socket (data_bind)
        self.link_table: LinkTable | None = None  # a site's direct links
        self._origins: dict[bytes, str] = {}
        self._targets: set[str] = set()
        self.broker_url = ""  # for error texts; set by the shell
        self._rlog = RateLimitedLog(log)

    @property
    def registered(self) -> bool:
        return self.session.registered

    # ---------------------------------------------------------------- driven by the shell

    def on_tick(self, now: float) -> Action:
        """Heartbeats, registration and liveness; carry out the returned action."""
        act = self.session.tick(now)
        self._after(act)
        return act

    def socket_replaced(self, now: float) -> None:
        """The shell made a new socket (after ``Action.reconnect``)."""
        self.session.socket_replaced(now)
        self.out.clear()
        self.stats["reconnects"] += 1

    def close(self) -> list[bytes] | None:
        """The cell stops: the BYE frames to send, if it was registered."""
        return self.session.close()

    def on_frames(self, frames: list[Any], now: float) -> Action | None:
        """One message (``zmq.Frame`` list) from the broker; an action if the session moved."""
        self.session.heard(now)
        kind = frames[0].bytes
        if kind == wire.KIND_MSG:
            self._on_msg(frames)
        elif kind == wire.KIND_NACK:
            return self._on_nack(frames, now)
        elif kind == wire.KIND_LIST_R:
            self._on_list(frames)
        elif len(frames) <= 3 and all(len(f) <= 512 for f in frames):
            act = self.session.on_frame(kind, [f.bytes for f in frames], now)
            self._after(act)
            return act
        else:
            self.drop("control", "oversized control frame %r", kind[:16])
        return None

    def _after(self, act: Action) -> None:
        if act.lost:
            # Requests sent over a direct link that is still up do not need the broker.
            table = self.link_table
            keep = table.requests_on_links() if table is not None else set()
            self.waiters.fail_all(
                ReturnCode.COMM_ERROR, f"connection to the broker lost: {act.lost}", keep
            )

    # ---------------------------------------------------------------- receiving

    def _on_msg(
        self, frames: list[Any], raw_origin: bytes | None = None, via_link: bool = False
    ) -> None:
        if len(frames) < 3:
            self.drop("short", "MSG with %d frames", len(frames))
            return
        if raw_origin is None:
            raw_origin = frames[1].bytes
        origin = self._origins.get(raw_origin)
        if origin is None:
            try:
                origin = _fqcn.validate(raw_origin.decode())
            except (UnicodeDecodeError, ValueError) as exc:
                self.drop("origin", "bad origin: %s", exc)
                return
            if len(self._origins) >= _NAME_CACHE:
                self._origins.clear()
            self._origins[raw_origin] = origin
        if self.e2e is not None:
            try:
                headers = wire.decode_headers(frames[2])
            except WireError:
                headers = {}  # wire.decode below says what is wrong
            if headers.get(_H.SECURE):
                self._on_sealed(frames, headers, origin, via_link)
                return
        try:
            msg = wire.decode(frames[2:])
        except WireError as exc:
            if not self.opener.refuse(frames[2], origin):
                self.drop("decode", "undecodable message from %s: %s", origin, exc)
                self._answer_undecodable(frames, origin, exc)
            return
        headers = msg.headers
        if headers.get(_H.SECURE):  # a sealed body that happened to decode
            self.opener.refuse(frames[2], origin)
            return
        self.stats["received"] += 1
        headers[_H.ORIGIN] = origin
        mtype = headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            w = self.waiters.pop_from(headers.get(_H.REQ_ID), origin)
            if w is not None and self.link_table is not None:
                self.link_table.replied(origin, w.req_id)
            if w is None:
                self.stats["dropped_late_reply"] += 1
                log.debug(
                    "cell %s: dropped a reply from %s for no waiting request", self.fqcn, origin
                )
                return
            w.resolve(Opener.unsealed(msg, origin) if w.secure else msg)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if not via_link and mtype == MessageType.REQUEST:
                self._came_by_broker(origin, headers)
            if self.handlers.inline(headers.get(_H.CHANNEL), headers.get(_H.TOPIC)):
                self.handlers.run(msg, origin)
            elif self.handlers.admit(mtype, msg, origin):
                self.dispatch(msg, origin)
        else:
            self.drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _on_sealed(
        self, frames: list[Any], headers: dict[str, Any], origin: str, via_link: bool
    ) -> None:
        """A message marked secure, at a cell that can open it (requests open on the pool)."""
        self.stats["received"] += 1
        mtype = headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            w = self.waiters.get_from(headers.get(_H.REQ_ID), origin)
            if w is None:
                self.stats["dropped_late_reply"] += 1
                return
            self.opener.open_reply(frames, w, origin)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if not via_link and mtype == MessageType.REQUEST:
                self._came_by_broker(origin, headers)
            if self.handlers.admit(mtype, Message(headers), origin):
                self.dispatch(Sealed(frames[2:], headers), origin)
        else:
            self.drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _came_by_broker(self, origin: str, headers: dict[str, Any]) -> None:
        """A request came through the broker: its reply goes back that way, even if
        `origin` is bound to a link here (its end of the link is not up, or is gone)."""
        server = self.link_server
        if server is not None:
            server.came_by_broker(origin, headers.get(_H.REQ_ID))

    def _answer_undecodable(self, frames: list[Any], origin: str, exc: Exception) -> None:
        try:
            headers = wire.decode_headers(frames[2])
        except WireError:
            return
        # Any req_id the headers hold (int, str, bytes...) is echoed as it came.
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST:
            self.send_reply(
                make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}"),
                Message(headers),
                origin,
                False,
            )

    def _on_nack(self, frames: list[Any], now: float) -> Action | None:
        if len(frames) != 4:
            self.drop("nack", "NACK with %d frames", len(frames))
            return None
        reason = frames[2].bytes
        dest = frames[1].bytes.decode("utf-8", "replace")
        act = None
        if reason == wire.NACK_UNREGISTERED:
            act = Action()
            self.session.forget(now, act, "the broker does not know this cell (restarted?)")
            self._after(act)
        try:
            headers = wire.decode_headers(frames[3])
        except WireError:
            return act
        if headers.get(_H.MSG_TYPE) != MessageType.REQUEST:
            return act
        w = self.waiters.pop(headers.get(_H.REQ_ID))
        if w is not None:
            rc = _NACK_RC.get(reason, ReturnCode.COMM_ERROR)
            why = reason.decode("ascii", "replace")
            w.resolve(make_reply(rc, f"broker could not deliver to {dest}: {why}"))
        return act

    def _on_list(self, frames: list[Any]) -> None:
        if len(frames) != 3:
            self.drop("list", "LIST_R with %d frames", len(frames))
            return
        w = self.waiters.get_list(frames[1].bytes)
        if w is not None:
            raw = frames[2].bytes.decode("utf-8", "replace")
            w.resolve(Message(payload=[n for n in raw.split("\n") if n]))

    # ---------------------------------------------------------------- sending (any thread)

    def check_send(
        self, channel: str, topic: str, targets: Iterable[str] | str, msg: Message, secure: bool
    ) -> list[str]:
        """Validate a send's arguments; return the targets as a list. Raises on misuse."""
        if secure and self.e2e is None:
            raise SecureUnavailableError(_SECURE_MSG.format(repr(self.fqcn)))
        if not isinstance(msg, Message):
            raise TypeError(f"expected a Message, got {type(msg).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be str")
        tlist = [targets] if isinstance(targets, str) else list(targets)
        if not tlist:
            raise ValueError("no targets given")
        for t in tlist:
            if t not in self._targets:
                _fqcn.validate(t)
                if len(self._targets) >= _NAME_CACHE:
                    self._targets.clear()
                self._targets.add(t)
        if len(tlist) > 1 and len(set(tlist)) != len(tlist):
            raise ValueError(f"duplicate targets in {tlist}")
        if secure:
            assert self.e2e is not None
            for t in tlist:
                self.e2e.require_peer(t)  # all known, or nothing is sent
        return tlist

    def submit(
        self,
        channel: str,
        topic: str,
        targets: list[str],
        request: Message,
        deadline: float,
        secure: bool = False,
        done_queue: queue.SimpleQueue[Any] | None = None,
        on_done: OnDone | None = None,
    ) -> list[PendingRequest]:
        """Queue `request` for each (checked) target; return their waiters.

        Not registered: each comes back resolved with ``comm_error`` and nothing is sent.
        """
        pending = [
            PendingRequest(
                self.waiters.forget, new_request_id(), t, deadline, done_queue, secure, on_done
            )
            for t in targets
        ]
        table = self.link_table
        if not self.session.registered and not (
            table is not None and all(t in table.up for t in targets)
        ):  # (a direct link up to every target needs no broker)
            err = f"cell {self.fqcn} is not connected to the broker at {self.broker_url}"
            for p in pending:
                p.resolve(make_reply(ReturnCode.COMM_ERROR, err))
            return pending
        self.waiters.add(pending)
        if not secure:
            for p in pending:
                self.queue(
                    p.target,
                    self.encode(request, channel, topic, p.target, MessageType.REQUEST, p.req_id),
                    p.req_id,
                )
            self.wake()
            return pending
        try:
            for p in pending:
                frames = self.encode_secure(
                    request, channel, topic, p.target, MessageType.REQUEST, p.req_id
                )
                p.plain = frames  # kept until the reply, to resend if the target restarted
                self.queue_sealed(p.target, frames, pending=p)
        except BaseException:
            for p in pending:
                self.waiters.forget(p.req_id)
            raise
        finally:
            self.wake()
        return pending

    def collect(
        self,
        pending: list[PendingRequest],
        timeout: float,
        aborted: bool,
        optional: bool,
        channel: str,
        topic: str,
    ) -> dict[str, Message]:
        """The reply per target once the wait is over: ``timeout`` (or ``abort_run`` if
        `aborted`) for each that has none; every failure logged (debug if `optional`)."""
        result: dict[str, Message] = {}
        for p in pending:
            if p.reply is None and aborted:
                p.resolve(make_reply(ReturnCode.ABORT_RUN, "aborted by the caller's signal"))
            elif p.reply is None:
                p.resolve(
                    make_reply(ReturnCode.TIMEOUT, f"no reply from {p.target} within {timeout:g}s")
                )
            reply = p.result()
            rc = reply.get_header(_H.RETURN_CODE)
            if rc != ReturnCode.OK:
                self.log_failure(
                    optional,
                    "request %s/%s to %s: %s %s",
                    channel,
                    topic,
                    p.target,
                    rc,
                    reply.get_header(_H.ERROR, ""),
                )
            result[p.target] = reply
        return result

    def log_failure(self, optional: bool, msg: str, *args: Any) -> None:
        log.log(logging.DEBUG if optional else logging.WARNING, "cell %s: " + msg, self.fqcn, *args)

    def fire(
        self, channel: str, topic: str, targets: list[str], message: Message, secure: bool
    ) -> None:
        """Queue a fire-and-forget `message` for each (checked) target."""
        if not secure:
            for t in targets:
                self.queue(t, self.encode(message, channel, topic, t, MessageType.FIRE, None))
            self.wake()
            return
        try:
            for t in targets:
                frames = self.encode_secure(message, channel, topic, t, MessageType.FIRE, None)
                self.queue_sealed(t, frames)
        finally:
            self.wake()

    def list_query(self, prefix: str, deadline: float) -> tuple[bytes, PendingRequest]:
        """Ask the broker for its live cells under `prefix`; forget the token when done."""
        token = os.urandom(8).hex().encode()
        w = PendingRequest(None, 0, "broker", deadline)
        self.waiters.add_list(token, w)
        self.out.append([wire.KIND_LIST, token, prefix.encode()])
        self.wake()
        return token, w

    def send_reply(
        self, reply: Message, request: Message, origin: str, secure: bytes | bool
    ) -> None:
        """Send `reply` to `request`: in plaintext if `secure` is False, else sealed and
        bound to `secure`, the seal of the sealed request it answers."""
        channel = request.get_header(_H.CHANNEL) or ""
        topic = request.get_header(_H.TOPIC) or ""
        req_id = request.get_header(_H.REQ_ID)
        encode = self.encode_secure if secure else self.encode
        try:
            frames = encode(reply, channel, topic, origin, MessageType.REPLY, req_id)
        except (TypeError, ValueError) as exc:
            err = f"reply could not be encoded: {exc}"
            log.error("cell %s: handler for %s/%s: %s", self.fqcn, channel, topic, err)
            frames = encode(
                make_reply(ReturnCode.PROCESS_EXCEPTION, err),
                channel,
                topic,
                origin,
                MessageType.REPLY,
                req_id,
            )
        server = self.link_server
        by_broker = server is not None and server.answer_by_broker(origin, req_id)
        if not secure:
            self.queue(origin, frames, by_broker=by_broker)
            self.wake()
            return
        try:
            self.queue_sealed(
                origin, frames, secure if isinstance(secure, bytes) else b"", by_broker=by_broker
            )
        except (SecureUnavailableError, ValueError) as exc:  # its key went away meanwhile
            log.error("cell %s: sealed reply to %s not sent: %s", self.fqcn, origin, exc)
        self.wake()

    def queue(
        self,
        target: str,
        frames: list[Any],
        req_id: int | None = None,
        by_broker: bool = False,
    ) -> None:
        """Queue the MSG `frames` for `target`: on its direct link if one is up (and not
        `by_broker`), else for the broker (any thread; the caller wakes the shell)."""
        if by_broker:
            self.out.append(frames)
            return
        server = self.link_server
        if server is not None and server.route(target, frames):
            return
        table = self.link_table
        if table is not None and table.up and table.route(target, frames, req_id):
            return
        self.out.append(frames)

    # ---------------------------------------------------------------- direct links

    def on_data_frames(
        self, rid: bytes, frames: list[Any], identity: str | None, now: float
    ) -> None:
        """One message on the owner's data socket from connection `rid`."""
        server = self.link_server
        assert server is not None
        if not frames:
            return
        kind = frames[0].bytes
        if kind == wire.KIND_MSG:
            name = server.bound(rid, now)
            if name is None:
                self.drop("link", "message on an unlinked data connection")
                server.out.append([rid, wire.KIND_LINK_ERR, b"not linked"])
            elif len(frames) < 3 or frames[1].bytes != self.fqcn.encode():
                self.drop("link", "direct message from %s not addressed to this cell", name)
            else:
                self._on_msg(frames, name.encode(), via_link=True)
        elif kind == wire.KIND_HB and len(frames) == 1:
            if server.bound(rid, now) is None:
                server.out.append([rid, wire.KIND_LINK_ERR, b"not linked"])
            else:
                server.out.append([rid, wire.KIND_HB])
        elif kind == wire.KIND_LINK and all(len(f) <= 512 for f in frames):
            server.on_link(rid, frames, identity, now)
        elif kind == wire.KIND_BYE:
            server.unbind(rid)
        else:
            self.drop("link", "unexpected %r on the data socket", kind[:16])

    def on_link_frames(self, link: LinkClient, frames: list[Any], now: float) -> None:
        """One message from the owner on a site's direct `link`."""
        table = self.link_table
        assert table is not None
        if not frames:
            return
        if frames[0].bytes == wire.KIND_MSG:
            msg = table.on_frames(link, frames, now)
            if msg is None:
                self.drop("link", "message from %s on a link not up", link.peer)
            else:
                self._on_msg(msg, via_link=True)
        elif len(frames) <= 2 and all(len(f) <= 512 for f in frames):
            table.on_frames(link, frames, now)
        else:
            self.drop("link", "unexpected message on the link to %s", link.peer)

    def fail_link_requests(self, req_ids: set[int], why: str) -> None:
        """Requests sent over a link that went down: ``comm_error`` now (callers retry)."""
        for req_id in req_ids:
            w = self.waiters.pop(req_id)
            if w is not None:
                w.resolve(make_reply(ReturnCode.COMM_ERROR, why))

    # ---------------------------------------------------------------- encoding and sealing

    def _headers(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> dict[str, Any]:
        """`msg`'s headers plus the routing headers every message carries."""
        headers = dict(msg.headers)
        headers[_H.CHANNEL] = channel
        headers[_H.TOPIC] = topic
        headers[_H.MSG_TYPE] = mtype
        headers[_H.ORIGIN] = self.fqcn
        headers[_H.DESTINATION] = target
        if req_id is not None:  # a reply echoes the request's req_id, whatever its type
            headers[_H.REQ_ID] = req_id
        return headers

    def encode(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> list[Any]:
        """The frames of a plaintext MSG to `target`, routing frames included."""
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers.pop(_H.SECURE, None)  # e.g. a received secure message sent on in plaintext
        return [wire.KIND_MSG, target.encode(), *wire.encode(Message(headers, msg.payload))]

    def encode_secure(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> list[Any]:
        """The frames ``[headers, body, *buffers]`` of `msg`, marked secure, not yet sealed."""
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers[_H.SECURE] = True
        return wire.encode(Message(headers, msg.payload))

    def queue_sealed(
        self,
        target: str,
        frames: list[Any],
        in_reply_to: bytes = b"",
        pending: PendingRequest | None = None,
        by_broker: bool = False,
    ) -> None:
        """Seal `frames` for `target` and queue them, in the order of their counters.

        A reply is bound to `in_reply_to` (the request's seal); a request records its
        own seal on `pending` before it can leave, so its reply is checked against it.
        """
        assert self.e2e is not None
        route = [wire.KIND_MSG, target.encode()]

        def deliver(sealed: list[Any]) -> None:
            if pending is not None:
                pending.seal = seal_of(sealed)
            _hold_plain(sealed, frames)
            req_id = None if pending is None else pending.req_id
            self.queue(target, route + sealed, req_id, by_broker)

        self.e2e.outbound(target).seal(frames, deliver, in_reply_to=in_reply_to)

    def resend(self, pending: PendingRequest) -> None:
        """Seal a waiting request again, for the session its target now has."""
        frames = pending.plain
        if frames is None:
            return
        try:
            self.queue_sealed(pending.target, frames, pending=pending)
        except (SecureUnavailableError, ValueError) as exc:  # its key went away meanwhile
            self.waiters.forget(pending.req_id)
            pending.resolve(make_reply(ReturnCode.AUTHENTICATION_ERROR, f"not resent: {exc}"))
        self.wake()

    # ---------------------------------------------------------------- bookkeeping

    def drop(self, key: str, msg: str, *args: Any) -> None:
        """Count and log (rate-limited) a malformed message."""
        self.stats["dropped_malformed"] += 1
        self._rlog.log(logging.WARNING, key, "cell %s dropped a message: " + msg, self.fqcn, *args)

    def _no_pool(self, job: Message | Sealed, origin: str) -> None:
        self.handlers.finished()
        raise CellError(f"cell {self.fqcn}: no handler pool to run a request from {origin}")
