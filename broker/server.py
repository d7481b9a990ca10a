"""The broker's I/O shell: one thread owns a ROUTER socket and drives a RoutingTable.

Every decision (who is registered, where a MSG goes, what to NACK) is made by
:class:`broker.routing.RoutingTable`; this module only moves frames. Received
frames are kept as ``zmq.Frame`` objects and forwarded as they are (``copy=False``),
so payload bytes are never copied or parsed here. Every send is non-blocking: a
peer whose queue is full gets nothing more and its sender gets ``NACK busy``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from types import TracebackType
from typing import Any

import zmq

from broker.routing import Actions, Event, RoutingTable, Send
from objdl._logutil import RateLimitedLog
from objdl.errors import ObjdlError

__all__ = ["Broker", "BrokerError"]

logger = logging.getLogger(__name__)

# Upper bound on one poll, so a tick is never late by more than this even if the
# table's deadline math were off; the wake pipe makes stop() immediate regardless.
_MAX_POLL_S = 0.25
# Messages handled per wake-up before tick and the stop pipe get a turn.
_BATCH = 256
# A restart on the same address may race the old socket's asynchronous close.
_ADDR_IN_USE_RETRY_S = 0.5
_pipe_ids = itertools.count()

_LEVELS = {
    "nack_unreachable": logging.DEBUG,
    "nack_unregistered": logging.DEBUG,
    "nack_busy": logging.DEBUG,
    "nack_too_big": logging.INFO,
    "who": logging.DEBUG,
    "probes": logging.DEBUG,
    "list": logging.DEBUG,
    "reg_ok": logging.INFO,
    "bye": logging.INFO,
    "expired": logging.INFO,
    "evicted": logging.INFO,
    "gone": logging.INFO,
}


class BrokerError(ObjdlError):
    """The broker could not start or stop; `url` is its address, `reason` says why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"objdl broker at {url}: {reason}")
        self.url = url
        self.reason = reason


class Broker:
    """A ZeroMQ ROUTER that routes messages between named cells (docs/PROTOCOL.md).

    Args:
        bind: endpoint to bind, e.g. ``tcp://127.0.0.1:8002``; port ``*`` picks a free
            one (read it back from :attr:`url`).
        heartbeat_interval: seconds between HBs to every cell.
        cell_timeout: a cell silent this long is forgotten.
        probe_timeout: how long a name's holder has to answer PING when another
            connection claims the name.
        max_message_size: largest message (all frames) routed; bigger gets NACK too_big.
        sndhwm, rcvhwm: per-peer queue limits of the ROUTER socket, in messages.
        context: ZeroMQ context to use; by default the broker makes its own and
            terminates it on :meth:`stop`.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. A stopped
    broker can be started again: it binds the same address it had (the same port,
    even if the first bind chose it) and starts with no cells and zeroed counters,
    like a restarted process; cells learn of it from WHO and register again.
    """

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:8002",
        *,
        heartbeat_interval: float = 0.5,
        cell_timeout: float = 3.0,
        probe_timeout: float = 1.0,
        max_message_size: int = 256 * 1024 * 1024,
        sndhwm: int = 1000,
        rcvhwm: int = 1000,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        for arg, value in (("sndhwm", sndhwm), ("rcvhwm", rcvhwm)):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0 (0: unlimited), not {value!r}")
        self._table_args: dict[str, Any] = {
            "heartbeat_interval": heartbeat_interval,
            "cell_timeout": cell_timeout,
            "probe_timeout": probe_timeout,
            "max_message_size": max_message_size,
        }
        self._table = RoutingTable(**self._table_args)  # validates the arguments
        self._bind = bind
        self._url: str | None = None
        self._hwm = (sndhwm, rcvhwm)
        self._given_context = context
        self._context: zmq.Context[Any] | None = None
        self._wake: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()  # guards _table between the I/O thread and readers
        self._errors = 0
        self._log = RateLimitedLog(logger)

    # -- public --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The bound endpoint (actual port once started), else the bind address."""
        return self._url or self._bind

    def start(self, timeout: float = 5.0) -> None:
        """Bind the ROUTER socket and start the I/O thread.

        Raises:
            BrokerError: the address cannot be bound (naming it and why), the broker
                is already running, or the thread did not start within `timeout`.
        """
        with self._lifecycle:
            if self._thread is not None:
                raise BrokerError(self.url, "already running")
            context = self._given_context or zmq.Context()
            sockets: list[zmq.Socket[Any]] = []
            try:
                sock = self._bind_router(context, self._url or self._bind, timeout)
                sockets.append(sock)
                pipe = f"inproc://objdl-broker-wake-{next(_pipe_ids)}"
                wake_rx = context.socket(zmq.PAIR)
                sockets.append(wake_rx)
                wake_rx.linger = 0
                wake_rx.bind(pipe)
                wake_tx = context.socket(zmq.PAIR)
                sockets.append(wake_tx)
                wake_tx.linger = 0
                wake_tx.connect(pipe)
            except BaseException:
                for s in sockets:
                    s.close(linger=0)
                if self._given_context is None:
                    context.term()
                raise
            self._url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._context, self._wake = context, wake_tx
            with self._lock:
                self._table = RoutingTable(**self._table_args)  # a restart starts afresh
                self._errors = 0
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(sock, wake_rx, started),
                name=f"objdl-broker {self._url}",
                daemon=True,
            )
            self._thread.start()
            if not started.wait(timeout):
                self._stop_locked(timeout)
                raise BrokerError(self.url, f"I/O thread did not start within {timeout:g}s")
        logger.info("objdl broker listening on %s", self._url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the I/O thread and close the socket; does nothing if not running.

        Raises:
            BrokerError: the I/O thread did not end within `timeout`.
        """
        with self._lifecycle:
            self._stop_locked(timeout)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see :data:`broker.routing.COUNTERS`) plus ``errors``."""
        with self._lock:
            counters = self._table.counters()
            counters["errors"] = self._errors
        return counters

    def cells(self, prefix: str = "") -> list[str]:
        """Sorted names of live cells equal to `prefix` or under it (``""``: all)."""
        with self._lock:
            return self._table.cells(prefix)

    def __enter__(self) -> Broker:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------

    def _bind_router(
        self, context: zmq.Context[Any], endpoint: str, timeout: float
    ) -> zmq.Socket[Any]:
        sock = context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.sndhwm, sock.rcvhwm = self._hwm
        deadline = time.monotonic() + min(timeout, _ADDR_IN_USE_RETRY_S)
        while True:
            try:
                sock.bind(endpoint)
                return sock
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                sock.close(linger=0)
                why = zmq.strerror(exc.errno) if exc.errno else str(exc)
                raise BrokerError(endpoint, f"cannot bind: {why}") from exc

    def _stop_locked(self, timeout: float) -> None:
        thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        with contextlib.suppress(zmq.ZMQError):  # a stop already queued: join decides
            wake.send(b"stop", zmq.NOBLOCK)
        thread.join(timeout)
        if thread.is_alive():
            raise BrokerError(self.url, f"I/O thread did not stop within {timeout:g}s")
        wake.close(linger=0)
        if self._given_context is None and self._context is not None:
            self._context.term()
        self._thread = self._wake = self._context = None
        logger.info("objdl broker at %s stopped", self._url)

    # -- I/O thread ----------------------------------------------------------------

    def _run(self, sock: zmq.Socket[Any], wake: zmq.Socket[Any], started: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        started.set()
        try:
            while True:
                with self._lock:
                    wait = self._table.next_deadline() - time.monotonic()
                wait = min(max(wait, 0.0), _MAX_POLL_S)
                try:
                    ready = dict(poller.poll(int(wait * 1000.0) + 1))
                except zmq.ContextTerminated:
                    return
                if wake in ready:
                    return
                if sock in ready:
                    self._drain(sock)
                self._guarded(sock, None, [])
        except Exception:
            logger.exception("objdl broker at %s: I/O thread failed, routing stopped", self._url)
        finally:
            sock.close(linger=0)
            wake.close(linger=0)

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        for _ in range(_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._guarded(sock, frames[0].bytes, frames[1:])

    def _guarded(self, sock: zmq.Socket[Any], peer: bytes | None, frames: list[Any]) -> None:
        """Handle one message (or tick, when `peer` is None); nothing a peer sends may escape."""
        act: Actions[Any]
        try:
            now = time.monotonic()
            with self._lock:
                if peer is None:
                    act = self._table.tick(now)
                else:
                    act = self._table.handle(peer, frames, now)
            self._act(sock, act, now)
        except Exception as exc:
            self._error("message from " + peer.hex() if peer is not None else "tick", exc)

    def _error(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self._errors += 1
        self._log.log(logging.ERROR, "error", "broker error on %s: %r", where, exc)

    def _act(self, sock: zmq.Socket[Any], act: Actions[Any], now: float) -> None:
        for event in act.events:
            self._log_event(event)
        for send in act.sends:
            self._send(sock, send, now)

    def _send(self, sock: zmq.Socket[Any], send: Send[Any], now: float) -> None:
        try:
            sock.send_multipart([send.peer, *send.frames], zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            gone = False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                self._error("send to " + send.peer.hex(), exc)  # the other sends go on
                return
            gone = True
        with self._lock:
            follow_up = self._table.send_failed(send, gone, now)
        self._act(sock, follow_up, now)  # NACKs carry no origin: this recurses once at most

    def _log_event(self, event: Event) -> None:
        level = _LEVELS.get(event.kind, logging.WARNING)
        if not logger.isEnabledFor(level):
            return
        with self._lock:
            name = self._table.name_of(event.peer)
        origin = f"{event.peer.hex()} ({name})" if name else event.peer.hex()
        key = event.kind if level >= logging.WARNING else f"{event.kind}:{event.peer.hex()}"
        self._log.log(level, key, "%s: %s [connection %s]", event.kind, event.detail, origin)
