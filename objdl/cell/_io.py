"""The I/O thread of a cell: the only thread that touches its socket.

How it works: callers append encoded frames to the :class:`Outbox` and wake the
thread through a pipe. The thread polls the socket, the pipe and (with CURVE) a
monitor socket; it flushes the outbox without blocking, routes replies and NACKs
to the waiting requests, admits requests to the handler pool, and drives the
sans-I/O :class:`~objdl._session.Session` (registration, heartbeats, reconnects).
A refused CURVE key ends a pending start at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from objdl import fqcn as _fqcn
from objdl import wire
from objdl._logutil import RateLimitedLog
from objdl._session import Action, Session, SessionState
from objdl.cell._handlers import HandlerPool
from objdl.cell._pending import Sealed, Waiters
from objdl.cell._secure import Opener
from objdl.errors import WireError
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, make_reply
from objdl.security import KeyPair

__all__ = ["IOThread", "Outbox"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
_NACK_RC = {
    wire.NACK_UNREACHABLE: ReturnCode.TARGET_UNREACHABLE,
    wire.NACK_BUSY: ReturnCode.COMM_ERROR,
    wire.NACK_TOO_BIG: ReturnCode.MSG_TOO_BIG,
    wire.NACK_UNREGISTERED: ReturnCode.COMM_ERROR,
}
_CLOSE_LINGER_MS = 250  # time given to the last queued replies and BYE at stop
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
SendReply = Callable[[Message, Message, str, bool], None]


class Outbox:
    """Frames waiting for the I/O thread, and the pipe that wakes it."""

    def __init__(self) -> None:
        self.queue: deque[list[Any]] = deque()
        self.read_fd, self._write_fd = -1, -1
        self._pending = False
        self.io_ident = -1  # the I/O thread flushes before it polls: it never wakes itself
        # Held while writing to and closing the pipe: a handler still running after
        # stop() must not write into whatever file reuses the closed descriptor.
        self._fd_lock = threading.Lock()

    def open(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def close(self) -> None:
        with self._fd_lock:
            fds, (self.read_fd, self._write_fd) = (self.read_fd, self._write_fd), (-1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def put(self, batch: list[list[Any]]) -> None:
        self.queue.extend(batch)
        self.wake()

    def wake(self) -> None:
        if self._pending or threading.get_ident() == self.io_ident:
            return  # already signalled, or the I/O thread itself flushes before it polls
        self._pending = True
        with self._fd_lock, contextlib.suppress(BlockingIOError, OSError):
            if self._write_fd >= 0:
                os.write(self._write_fd, b"x")

    def woken(self) -> None:
        """The I/O thread saw the pipe: empty it, then let the next put() signal again.

        In this order no wake is lost. A wake() before the flag is cleared returns
        early, but its frames are already queued and the I/O thread flushes them
        right after this. A wake() after it writes a byte that stays in the pipe for
        the next poll. (Cleared first, a wake() between the two lines wrote a byte
        the read swallowed, leaving the flag set and the pipe empty for good.)
        """
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)
        self._pending = False


class IOThread:
    """Owns one cell's DEALER socket on a thread of its own.

    Everything it shares with the cell is handed in: the outbox, the waiters, the
    handler pool, the opener of sealed messages and the counters.
    """

    def __init__(
        self,
        name: str,
        broker_url: str,
        ctx: zmq.Context,
        *,
        keys: KeyPair | None,
        broker_key: bytes | None,
        heartbeat: float,
        broker_timeout: float,
        outbox: Outbox,
        waiters: Waiters,
        pool: HandlerPool,
        opener: Opener,
        stats: dict[str, int],
        send_reply: SendReply,
        drop: Callable[..., None],
    ) -> None:
        self._name = name
        self._url = broker_url
        self._ctx = ctx
        self._keys = keys
        self._broker_key = broker_key
        self._hb = heartbeat
        self._broker_timeout = broker_timeout
        self._outbox = outbox
        self._waiters = waiters
        self._pool = pool
        self._opener = opener
        self._stats = stats
        self._send_reply = send_reply
        self._drop = drop
        self._rlog = RateLimitedLog(log)
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._closing_linger = 0  # ms; set when the thread ends normally
        self._origins: dict[bytes, str] = {}  # validated origin names
        self._stopping = threading.Event()
        self.ready = threading.Event()  # registered, refused, or ended: start() may look
        self.connected = threading.Event()  # set while registered
        self.registered = False
        self.refused = ""  # the broker refused the registration
        self.auth_refused = ""  # the broker turned our key away (ZAP)
        self.handshake_failed = ""  # the last CURVE handshake failure, until one succeeds

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"objdl-{self._name}-io", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Unregister (BYE), close the socket and end the thread, within `timeout`."""
        self._stopping.set()
        self._outbox.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the loop

    def _main(self) -> None:
        try:
            self._sock = self._new_socket()
            session = Session(self._name, time.monotonic(), self._hb, self._broker_timeout)
            self._run(session)
        except Exception:
            log.exception("cell %s: I/O thread failed", self._name)
        finally:
            self.registered = False
            self.connected.clear()
            self.ready.set()
            if self._sock is not None:
                self._close_socket(self._sock)
                self._sock = None

    def _run(self, session: Session) -> None:
        assert self._sock is not None
        self._outbox.io_ident = threading.get_ident()
        sock = self._sock
        want_out = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.read_fd, zmq.POLLIN)
        monitor = self._monitor
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        stalled: list[Any] | None = None
        while not self._stopping.is_set():
            now = time.monotonic()
            act = session.tick(now)
            if act.reconnect:
                poller.unregister(sock)
                if monitor is not None:
                    poller.unregister(monitor)
                self._close_socket(sock)
                sock = self._sock = self._new_socket()
                poller.register(sock, zmq.POLLIN)
                monitor = self._monitor
                if monitor is not None:
                    poller.register(monitor, zmq.POLLIN)
                want_out = False
                session.socket_replaced(now)
                stalled = None
                self._outbox.queue.clear()
                self._stats["reconnects"] += 1
            self._apply(act, sock)
            if self.refused or self.auth_refused:
                return
            wait = max(0.0, session.next_deadline() - time.monotonic())
            events = dict(poller.poll(int(min(wait, 0.1) * 1000)))
            if self._outbox.read_fd in events:
                self._outbox.woken()
            if sock in events:
                self._drain_socket(sock, session)
            if monitor is not None and monitor in events:
                self._on_handshake(monitor)
            if session.state is SessionState.REGISTERED:
                stalled = self._flush(sock, stalled)
                if want_out != (stalled is not None):
                    want_out = stalled is not None
                    poller.register(sock, zmq.POLLIN | zmq.POLLOUT if want_out else zmq.POLLIN)
            elif self._outbox.queue:
                self._outbox.queue.clear()  # requests made while unregistered already failed
        if session.state is SessionState.REGISTERED:
            self._flush(sock, stalled)  # replies the last handlers queued
        bye = session.close()
        if bye is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(bye, zmq.NOBLOCK)
        self._closing_linger = _CLOSE_LINGER_MS

    def _flush(self, sock: zmq.Socket, stalled: list[Any] | None) -> list[Any] | None:
        """Send queued messages without blocking; return the one that did not fit."""
        out = self._outbox.queue
        while True:
            frames = stalled if stalled is not None else (out.popleft() if out else None)
            if frames is None:
                return None
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return frames
            stalled = None
            self._stats["sent"] += 1

    def _apply(self, act: Action, sock: zmq.Socket) -> None:
        for frames in act.send:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(frames, zmq.NOBLOCK)
        if act.registered:
            self.registered = True
            self.connected.set()
            if not self.ready.is_set():
                log.info("cell %s registered with broker %s", self._name, self._url)
            else:
                log.info("cell %s registered again with broker %s", self._name, self._url)
            self.ready.set()
        if act.lost:
            self.registered = False
            self.connected.clear()
            log.warning("cell %s lost the broker: %s; reconnecting", self._name, act.lost)
            self._waiters.fail_all(
                ReturnCode.COMM_ERROR, f"connection to the broker lost: {act.lost}"
            )
        if act.refused:
            self.refused = act.refused
            self.ready.set()

    # ---------------------------------------------------------------- the socket

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a broker that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._broker_key is not None:
            assert self._keys is not None
            sock.curve_serverkey = self._broker_key
            sock.curve_publickey = self._keys.public
            sock.curve_secretkey = self._keys.secret
            self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            self._monitor.setsockopt(zmq.LINGER, 0)
        sock.connect(self._url)
        return sock

    def _close_socket(self, sock: zmq.Socket) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        # A short, bounded linger at stop lets the last replies and BYE leave; on a
        # reconnect (or a dead broker) nothing queued is worth waiting for.
        sock.close(linger=self._closing_linger)

    def _on_handshake(self, monitor: zmq.Socket) -> None:
        """Read CURVE handshake events; a key the broker refuses ends a pending start."""
        for _ in range(64):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, IndexError):
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_failed = ""
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"it does not allow this cell's key (ZAP status {value})"
                if not self.ready.is_set():
                    self.auth_refused = why
                    self.ready.set()
                else:  # libzmq does not retry a refused key: this cell stays offline
                    self._rlog.log(
                        logging.ERROR,
                        "auth",
                        "cell %s: the broker at %s refused this cell's key on reconnect",
                        self._name,
                        self._url,
                    )
            else:
                self.handshake_failed = f"the CURVE handshake failed ({zmq.Event(kind).name})"

    # ---------------------------------------------------------------- receiving

    def _drain_socket(self, sock: zmq.Socket, session: Session) -> None:
        for _ in range(256):  # bounded, so timers and the outbound queue get their turn
            # Asking for EVENTS is cheaper than letting recv raise zmq.Again at the end.
            if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            session.heard(now)
            kind = frames[0].bytes
            if kind == wire.KIND_MSG:
                self._on_msg(frames)
            elif kind == wire.KIND_NACK:
                self._on_nack(frames, session, sock, now)
            elif kind == wire.KIND_LIST_R:
                self._on_list(frames)
            elif len(frames) <= 3 and all(len(f) <= 512 for f in frames):
                act = session.on_frame(kind, [f.bytes for f in frames], now)
                self._apply(act, sock)
            else:
                self._drop("control", "oversized control frame %r", kind[:16])

    def _on_msg(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 3:
            self._drop("short", "MSG with %d frames", len(frames))
            return
        raw_origin = frames[1].bytes
        origin = self._origins.get(raw_origin)
        if origin is None:
            try:
                origin = _fqcn.validate(raw_origin.decode())
            except (UnicodeDecodeError, ValueError) as exc:
                self._drop("origin", "bad origin: %s", exc)
                return
            if len(self._origins) >= 4096:  # names come from the network: stay bounded
                self._origins.clear()
            self._origins[raw_origin] = origin
        if self._opener.e2e is not None:
            try:
                headers = wire.decode_headers(frames[2])
            except WireError:
                headers = {}  # wire.decode below says what is wrong
            if headers.get(_H.SECURE):
                self._on_sealed(frames, headers, origin)
                return
        try:
            msg = wire.decode(frames[2:])
        except WireError as exc:
            if not self._opener.refuse(frames[2], origin):
                self._drop("decode", "undecodable message from %s: %s", origin, exc)
                self._answer_undecodable(frames, origin, exc)
            return
        if msg.headers.get(_H.SECURE):  # a sealed body that happened to decode
            self._opener.refuse(frames[2], origin)
            return
        self._stats["received"] += 1
        msg.headers[_H.ORIGIN] = origin
        mtype = msg.headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            w = self._waiters.pop_from(msg.headers.get(_H.REQ_ID), origin)
            if w is None:
                self._stats["dropped_late_reply"] += 1
                log.debug(
                    "cell %s: dropped a reply from %s for no waiting request", self._name, origin
                )
                return
            w.resolve(Opener.unsealed(msg, origin) if w.secure else msg)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if self._pool.admit(mtype, msg, origin):
                self._pool.put(msg, origin)
        else:
            self._drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _on_sealed(self, frames: list[zmq.Frame], headers: dict[str, Any], origin: str) -> None:
        """A message marked secure, at a cell that can open it."""
        self._stats["received"] += 1
        mtype = headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            w = self._waiters.get_from(headers.get(_H.REQ_ID), origin)
            if w is None:
                self._stats["dropped_late_reply"] += 1
                return
            self._opener.open_reply(frames, w, origin)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if self._pool.admit(mtype, Message(headers), origin):
                self._pool.put(Sealed(frames[2:], headers), origin)
        else:
            self._drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _answer_undecodable(self, frames: list[zmq.Frame], origin: str, exc: Exception) -> None:
        try:
            headers = wire.decode_headers(frames[2])
        except WireError:
            return
        # Any req_id the headers hold (int, str, bytes...) is echoed as it came.
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST:
            req = Message(headers)
            self._send_reply(
                make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}"),
                req,
                origin,
                False,
            )

    def _on_nack(
        self, frames: list[zmq.Frame], session: Session, sock: zmq.Socket, now: float
    ) -> None:
        if len(frames) != 4:
            self._drop("nack", "NACK with %d frames", len(frames))
            return
        reason = frames[2].bytes
        dest = frames[1].bytes.decode("utf-8", "replace")
        if reason == wire.NACK_UNREGISTERED:
            act = Action()
            session.forget(now, act, "the broker does not know this cell (restarted?)")
            self._apply(act, sock)
        try:
            headers = wire.decode_headers(frames[3])
        except WireError:
            return
        if headers.get(_H.MSG_TYPE) != MessageType.REQUEST:
            return
        w = self._waiters.pop(headers.get(_H.REQ_ID))
        if w is not None:
            rc = _NACK_RC.get(reason, ReturnCode.COMM_ERROR)
            w.resolve(
                make_reply(
                    rc, f"broker could not deliver to {dest}: {reason.decode('ascii', 'replace')}"
                )
            )

    def _on_list(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 3:
            self._drop("list", "LIST_R with %d frames", len(frames))
            return
        w = self._waiters.get_list(frames[1].bytes)
        if w is not None:
            raw = frames[2].bytes.decode("utf-8", "replace")
            w.resolve(Message(payload=[n for n in raw.split("\n") if n]))
