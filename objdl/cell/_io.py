"""The I/O thread of a cell: the only thread that touches its socket.

A thin shell around the cell's sans-I/O :class:`~objdl.cell._core.CellCore`: it
polls the socket, the wake pipe and (with CURVE) a monitor socket; feeds every
received message and every tick to the core; sends the control frames the core
returns and flushes the core's outgoing queue without blocking; and replaces the
socket when the core's session asks for it. A refused CURVE key ends a pending
start at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import zmq

from objdl._frames import ready_messages, send_frames
from objdl._logutil import RateLimitedLog
from objdl._session import Action, SessionState
from objdl._wake import Waker
from objdl.cell._core import CellCore
from objdl.cell._dealer import Handshake, close_dealer, new_dealer
from objdl.cell._linkio import LinkSockets
from objdl.security import KeyPair

__all__ = ["IOThread"]

log = logging.getLogger("objdl.cell")

_CLOSE_LINGER_MS = 250  # time given to the last queued replies and BYE at stop
_DRAIN = 256  # messages read per wake-up, so timers and the outgoing queue get their turn


class IOThread:
    """Owns one cell's DEALER socket on a thread of its own, driving its `core`."""

    def __init__(
        self,
        name: str,
        broker_urls: list[str],
        ctx: zmq.Context,
        core: CellCore,
        waker: Waker,
        *,
        keys: KeyPair | None,
        broker_key: bytes | None,
        links: LinkSockets | None = None,
    ) -> None:
        self._name = name
        self._links = links
        self._urls = broker_urls
        self._url_index = 0
        self._ctx = ctx
        self._core = core
        self._waker = waker
        self._keys = keys
        self._broker_key = broker_key
        self._rlog = RateLimitedLog(log)
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._closing_linger = 0  # ms; set when the thread ends normally
        self._stopping = threading.Event()
        self.ready = threading.Event()  # registered, refused, or ended: start() may look
        self.connected = threading.Event()  # set while registered
        self.registered = False
        self.refused = ""  # the broker refused the registration
        self.handshake = Handshake()  # what the CURVE handshakes said

    @property
    def url(self) -> str:
        """The broker this cell connects to now (the next one after each failover)."""
        return self._urls[self._url_index]

    @property
    def ident(self) -> int:
        """The I/O thread's ident (-1 before it runs)."""
        return self._waker.owner_ident

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"objdl-{self._name}-io", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Unregister (BYE), close the socket and end the thread, within `timeout`."""
        self._stopping.set()
        self._waker.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the loop

    def _main(self) -> None:
        try:
            self._sock = self._new_socket()
            self._run()
        except Exception:
            log.exception("cell %s: I/O thread failed", self._name)
        finally:
            self.registered = False
            self.connected.clear()
            self.ready.set()
            if self._links is not None:
                try:
                    self._links.close(self._closing_linger)
                except Exception:
                    log.exception("cell %s: closing the direct links failed", self._name)
            if self._sock is not None:
                self._close_socket(self._sock)
                self._sock = None

    def _run(self) -> None:
        assert self._sock is not None
        self._waker.owner_ident = threading.get_ident()
        core, waker, session = self._core, self._waker, self._core.session
        session.socket_replaced(time.monotonic())  # the session starts now, not at __init__
        out = core.out
        sock = self._sock
        want_out = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(waker.read_fd, zmq.POLLIN)
        monitor = self._monitor
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        links = self._links
        if links is not None:
            links.register(poller)
        stalled: list[Any] | None = None
        while not self._stopping.is_set():
            now = time.monotonic()
            act = core.on_tick(now)
            if links is not None:
                links.tick(now)
            if act.reconnect:
                poller.unregister(sock)
                if monitor is not None:
                    poller.unregister(monitor)
                self._close_socket(sock)
                if len(self._urls) > 1:
                    self._url_index = (self._url_index + 1) % len(self._urls)
                    log.info("cell %s: trying broker %s", self._name, self.url)
                sock = self._sock = self._new_socket()
                poller.register(sock, zmq.POLLIN)
                monitor = self._monitor
                if monitor is not None:
                    poller.register(monitor, zmq.POLLIN)
                want_out = False
                stalled = None
                core.socket_replaced(now)
            self._apply(act, sock)
            if self.refused or self.handshake.auth_refused:
                return
            if session.state is SessionState.REGISTERED:
                stalled = self._flush(sock, stalled)
                if want_out != (stalled is not None):
                    want_out = stalled is not None
                    poller.register(sock, zmq.POLLIN | zmq.POLLOUT if want_out else zmq.POLLIN)
            elif out:
                out.clear()  # requests made while unregistered already failed
            if links is not None:
                links.flush()
            wait = max(0.0, session.next_deadline() - time.monotonic())
            if out and stalled is None and session.state is SessionState.REGISTERED:
                wait = 0.0  # queued meanwhile (by a handler, or an on_done hook)
            if links is not None and links.busy():
                wait = 0.0
            events = dict(poller.poll(int(min(wait, 0.1) * 1000)))
            if links is not None:
                links.on_events(events)
            if waker.read_fd in events:
                waker.woken()
            if sock in events:
                self._drain_socket(sock)
            if monitor is not None and monitor in events:
                self._on_handshake(monitor)
        if session.state is SessionState.REGISTERED:
            self._flush(sock, stalled)  # replies the last handlers queued
        if links is not None:
            links.flush()
        bye = core.close()
        if bye is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(bye, zmq.NOBLOCK)
        self._closing_linger = _CLOSE_LINGER_MS

    def _drain_socket(self, sock: zmq.Socket) -> None:
        core = self._core
        for frames in ready_messages(sock, _DRAIN):
            act = core.on_frames(frames, time.monotonic())
            if act is not None:
                self._apply(act, sock)

    def _flush(self, sock: zmq.Socket, stalled: list[Any] | None) -> list[Any] | None:
        """Send queued messages without blocking; return the one that did not fit."""
        out = self._core.out
        stats = self._core.stats
        while True:
            frames = stalled if stalled is not None else (out.popleft() if out else None)
            if frames is None:
                return None
            try:
                send_frames(sock, frames)
            except zmq.Again:
                return frames
            stalled = None
            stats["sent"] += 1

    def _apply(self, act: Action, sock: zmq.Socket) -> None:
        for frames in act.send:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(frames, zmq.NOBLOCK)
        if act.registered:
            self.registered = True
            self.connected.set()
            again = " again" if self.ready.is_set() else ""
            log.info("cell %s registered%s with broker %s", self._name, again, self.url)
            self.ready.set()
        if act.lost:
            self.registered = False
            self.connected.clear()
            log.warning("cell %s lost the broker: %s; reconnecting", self._name, act.lost)
        if act.refused:
            self.refused = act.refused
            self.ready.set()

    # ---------------------------------------------------------------- the socket

    def _new_socket(self) -> zmq.Socket:
        sock, self._monitor = new_dealer(self._ctx, self.url, self._keys, self._broker_key)
        return sock

    def _close_socket(self, sock: zmq.Socket) -> None:
        # A short, bounded linger at stop lets the last replies and BYE leave; on a
        # reconnect (or a dead broker) nothing queued is worth waiting for.
        close_dealer(sock, self._monitor, self._closing_linger)
        self._monitor = None

    def _on_handshake(self, monitor: zmq.Socket) -> None:
        """Read CURVE handshake events; a key the broker refuses ends a pending start."""
        if not self.handshake.read(monitor):
            return
        if not self.ready.is_set():
            self.ready.set()
        else:  # libzmq does not retry a refused key: this cell stays offline
            self._rlog.log(
                logging.ERROR,
                "auth",
                "cell %s: the broker at %s refused this cell's key on reconnect",
                self._name,
                self.url,
            )
