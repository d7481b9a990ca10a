"""The sockets of a cell's direct links, driven by its I/O thread (see ``_links.py``).

An owner made with ``data_bind`` gets a ROUTER, the *data socket*; under CURVE it
lives in a private ZeroMQ context whose ZAP handler is bound first, on the same I/O
thread, so no connection is accepted unchecked and no other ZAP handler in the
process (a broker's, say) is in the way. A site gets one DEALER per link, with a
monitor socket so that a closed connection or a refused CURVE key takes the link
down at once instead of after the heartbeat timeout.

Two loops drive it. The threaded cell's I/O thread registers the sockets with its
``zmq.Poller`` and hands :meth:`LinkSockets.on_events` what the poll returned. The
asyncio cell registers a watcher of its own (anything with ``register(socket, flags)``
and ``unregister(socket)``: it watches each socket's file descriptor), calls
:meth:`LinkSockets.drain` when one is readable, and :meth:`LinkSockets.pending` after
every flush: ZeroMQ's descriptors are edge-triggered and a send may consume the edge,
so ``EVENTS`` is what says whether to read again. Either way, only the thread that
owns the loop touches these sockets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

from objdl import wire
from objdl._frames import POLLIN, POLLOUT, ready_messages, send_frames, zmq_events
from objdl.cell._core import CellCore
from objdl.cell._links import LINK_MAX_TO_OWNER, LINK_MAX_TO_SITE, LinkClient, LinkServer
from objdl.errors import CellError
from objdl.security import ZAP_ENDPOINT, KeyPair, KeyPolicy, zap_reply

__all__ = ["DataConfig", "LinkSockets", "Poller", "advertised_url"]

log = logging.getLogger("objdl.cell")

_DRAIN = 256
_TICK = 0.02  # links' hellos, heartbeats and timeouts are looked at this often
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")


class Poller(Protocol):
    """What watches the link sockets for the loop that drives them (``zmq.Poller`` has it)."""

    def register(self, socket: Any, flags: int = ...) -> None: ...

    def unregister(self, socket: Any) -> None: ...


@dataclass(frozen=True)
class DataConfig:
    """An owner's data socket: where it binds, what it advertises, how it authenticates."""

    bind: str
    advertise: str | None  # a URL or a host; None: the bound address
    policy: KeyPolicy | None  # CURVE server with this allow-list; None: plain TCP


def advertised_url(bound: str, advertise: str | None) -> str:
    """The address sites are told to connect to, from the bound one and `advertise`."""
    if advertise is not None and "://" in advertise:
        return advertise
    if not bound.startswith("tcp://"):
        return bound
    host, _, port = bound[len("tcp://") :].rpartition(":")
    if advertise is not None:
        host = f"[{advertise}]" if ":" in advertise and not advertise.startswith("[") else advertise
    elif host in _WILDCARD_HOSTS:
        raise CellError(
            f"data_bind {bound!r} listens on every interface: give data_advertise= the host "
            "or address that sites use to reach this cell"
        )
    return f"tcp://{host}:{port}"


class LinkSockets:
    """The owner's data socket and the site's link sockets of one cell."""

    def __init__(
        self,
        name: str,
        ctx: zmq.Context,
        core: CellCore,
        keys: KeyPair | None,
        data: DataConfig | None,
    ) -> None:
        self._name = name
        self._ctx = ctx
        self._core = core
        self._keys = keys
        self._data = data
        self._private: zmq.Context | None = None
        self.router: zmq.Socket | None = None
        self.zap: zmq.Socket | None = None
        self._socks: dict[int, tuple[LinkClient, zmq.Socket, zmq.Socket]] = {}  # id(link)
        self._by_sock: dict[zmq.Socket, LinkClient] = {}
        self._by_monitor: dict[zmq.Socket, LinkClient] = {}
        self._poller: Poller | None = None
        self._next_tick = 0.0

    # -- the owner's data socket ----------------------------------------------------------

    def bind(self, timeout: float) -> LinkServer | None:
        """Bind the data socket (if configured); the core's :class:`LinkServer` for it.

        Raises CellError if the address cannot be bound.
        """
        data = self._data
        if data is None:
            return None
        advertised_url(data.bind, data.advertise)  # a wildcard with no advertise: before binding
        ctx = self._ctx
        if data.policy is not None:
            self._private = ctx = zmq.Context()
            self.zap = ctx.socket(zmq.REP)
            self.zap.linger = 0
            self.zap.bind(ZAP_ENDPOINT)  # before the ROUTER: nothing gets in unchecked
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone site is an error, not a silent drop
        sock.setsockopt(zmq.MAXMSGSIZE, LINK_MAX_TO_OWNER)
        sock.setsockopt(zmq.RCVHWM, 32)  # per connection: 32 x LINK_MAX_TO_OWNER read ahead
        sock.setsockopt(zmq.TCP_MAXRT, int(timeout * 1000))
        key = None
        if data.policy is not None:
            assert self._keys is not None
            sock.curve_server = True
            sock.curve_secretkey = self._keys.secret
            sock.curve_publickey = self._keys.public
            sock.zap_domain = b"objdl"
            with contextlib.suppress(AttributeError, zmq.ZMQError):  # fail closed without ZAP
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            key = self._keys.public
        try:
            sock.bind(data.bind)
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            url = advertised_url(bound, data.advertise)
        except (zmq.ZMQError, CellError) as exc:
            sock.close(linger=0)
            self._close_private()
            if isinstance(exc, CellError):
                raise
            raise CellError(
                f"cell {self._name}: cannot bind data_bind {data.bind!r}: {exc}"
            ) from exc
        self.router = sock
        log.info("cell %s: data socket on %s (offered as %s)", self._name, bound, url)
        return LinkServer(self._name, url, key, data.policy, timeout)

    def _close_private(self) -> None:
        if self.zap is not None:
            self.zap.close(linger=0)
            self.zap = None
        if self._private is not None:
            self._private.term()
            self._private = None

    # -- polling -------------------------------------------------------------------------

    def register(self, poller: Poller) -> None:
        """Watch the data socket now, and each link's sockets from when they are made
        until they are closed, with `poller` (told before a socket is closed)."""
        self._poller = poller
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)

    def busy(self) -> bool:
        """Something waits to be sent on a link (the loop should not sleep)."""
        server, table = self._core.link_server, self._core.link_table
        if server is not None and server.out:
            return True
        return table is not None and any(link.out for link in table.up.values())

    def _watched(self) -> list[zmq.Socket]:
        """The sockets that may have something to read: the data socket and its ZAP
        handler, and each link's socket and monitor (of links not down yet)."""
        socks = [s for s in (self.zap, self.router) if s is not None]
        for link, sock, monitor in self._socks.values():
            if link.state not in ("closed", "failed"):
                socks += (sock, monitor)
        return socks

    def drain(self) -> None:
        """Read what waits on any link socket, as ``EVENTS`` says (a bounded amount each:
        call :meth:`pending` after, and again if it says so)."""
        self.on_events({s: POLLIN for s in self._watched() if zmq_events(s) & POLLIN})

    def pending(self) -> bool:
        """Something waits to be read, or to be sent on a link that takes it now: the
        loop should :meth:`drain` and :meth:`flush` again without waiting for a descriptor
        (which signals changes only, and may have been consumed by a read or a send)."""
        for sock in self._watched():
            if zmq_events(sock) & POLLIN:
                return True
        table = self._core.link_table
        if table is None or not table.up:
            return False
        for link in list(table.up.values()):
            entry = self._socks.get(id(link))
            if link.out and entry is not None and zmq_events(entry[1]) & POLLOUT:
                return True
        return False

    def tick_every(self) -> float | None:
        """How often :meth:`tick` wants to run (hellos, heartbeats), or None: no link now."""
        return _TICK if self._socks else None

    def on_events(self, events: dict[Any, int]) -> None:
        """Read whatever the poll said is readable on the link sockets."""
        now = time.monotonic()
        if self.zap is not None and self.zap in events:
            self._answer_zap()
        if self.router is not None and self.router in events:
            self._drain_router(now)
        for sock, link in list(self._by_sock.items()):
            if sock in events:
                self._drain_link(sock, link, now)
        for monitor, link in list(self._by_monitor.items()):
            if monitor in events:
                self._on_monitor(monitor, link, now)

    def _answer_zap(self) -> None:
        assert self.zap is not None and self._data is not None and self._data.policy is not None
        allows = self._data.policy.allows_key
        server = self._core.link_server
        for _ in range(64):
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = zap_reply(request, allows)
            if reply[2] != b"200" and server is not None:
                server.stats["zap_denied"] += 1
            with contextlib.suppress(zmq.ZMQError):
                self.zap.send_multipart(reply, zmq.NOBLOCK)

    def _drain_router(self, now: float) -> None:
        sock = self.router
        assert sock is not None
        core = self._core
        curve = self._data is not None and self._data.policy is not None
        for frames in ready_messages(sock, _DRAIN):
            if len(frames) < 2:
                continue
            identity: str | None = None
            if curve:
                with contextlib.suppress(zmq.ZMQError):
                    user = frames[1].get("User-Id")
                    identity = user if isinstance(user, str) else None
            core.on_data_frames(frames[0].bytes, frames[1:], identity, now)

    def _drain_link(self, sock: zmq.Socket, link: LinkClient, now: float) -> None:
        core = self._core
        if link.state in ("closed", "failed"):
            return
        for frames in ready_messages(sock, _DRAIN):
            core.on_link_frames(link, frames, now)
            if link.state in ("closed", "failed"):
                return

    def _on_monitor(self, monitor: zmq.Socket, link: LinkClient, now: float) -> None:
        table = self._core.link_table
        assert table is not None
        for _ in range(16):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except (zmq.ZMQError, ValueError, IndexError):
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # Say LINK now rather than at the next retry: every request sent before
                # the link is up goes through the broker.
                if link.state == "connecting":
                    link.next_hello = now
                    self._next_tick = 0.0  # (the loop's next turn, not the next tick)
            elif kind == zmq.EVENT_DISCONNECTED:
                table.down(link, "connection closed", now, failed=True)
            elif kind & _MONITOR_EVENTS:
                table.down(link, f"CURVE handshake failed ({zmq.Event(kind).name})", now, True)

    # -- each turn of the loop -------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Open and close link sockets as the table asks; heartbeats; timeouts."""
        server, table = self._core.link_server, self._core.link_table
        if table is not None:
            while table.opens:
                self._open(table.opens.popleft())
            while table.closes:  # (a link taken down while reading: its socket goes now)
                self._close(table.closes.popleft())
        if now < self._next_tick:
            return
        self._next_tick = now + _TICK
        if server is not None:
            server.tick(now)
        if table is None:
            return
        for link, frames in table.tick(now):
            self._send_control(link, frames)
        while table.closes:
            self._close(table.closes.popleft())

    def _send_control(self, link: LinkClient, frames: list[Any]) -> None:
        entry = self._socks.get(id(link))
        if entry is not None:
            with contextlib.suppress(zmq.ZMQError):
                entry[1].send_multipart(frames, zmq.NOBLOCK)

    def _open(self, link: LinkClient) -> None:
        table = self._core.link_table
        assert table is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, LINK_MAX_TO_SITE)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        key = link.offer.key
        if key is not None:
            assert self._keys is not None
            sock.curve_serverkey = key
            sock.curve_publickey = self._keys.public
            sock.curve_secretkey = self._keys.secret
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        monitor.linger = 0
        try:
            sock.connect(link.offer.url)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            table.down(link, f"cannot connect to {link.offer.url}: {exc}", time.monotonic(), True)
            return
        self._socks[id(link)] = (link, sock, monitor)
        self._by_sock[sock] = link
        self._by_monitor[monitor] = link
        if self._poller is not None:
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)

    def _close(self, link: LinkClient) -> None:
        entry = self._socks.pop(id(link), None)
        if entry is None:
            return
        _, sock, monitor = entry
        self._by_sock.pop(sock, None)
        self._by_monitor.pop(monitor, None)
        if self._poller is not None:
            self._poller.unregister(sock)
            self._poller.unregister(monitor)
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

    def flush(self) -> None:
        """Send what waits on the data socket and on each link, without blocking."""
        core = self._core
        server, table = core.link_server, core.link_table
        if server is not None and self.router is not None:
            self._flush_router(server)
        if table is None or not table.up:
            return
        for link in list(table.up.values()):
            entry = self._socks.get(id(link))
            if entry is None or not link.out:
                continue
            sock = entry[1]
            out = link.out
            while out:
                frames, req_id = out[0]
                try:
                    send_frames(sock, frames)
                except zmq.Again:
                    break  # the heartbeat timeout or the monitor takes a dead link down
                except zmq.ZMQError as exc:
                    table.down(link, f"send failed: {exc}", time.monotonic(), failed=True)
                    break
                # (sent set before the popleft: down() moves what is still queued)
                table.sent(link, req_id)
                out.popleft()
                core.stats["sent"] += 1

    def _flush_router(self, server: LinkServer) -> None:
        sock = self.router
        assert sock is not None
        out = server.out
        core = self._core
        while out:
            item = out.popleft()
            try:
                send_frames(sock, item)
            except zmq.Again:
                # That one peer's queue is full (ROUTER_MANDATORY): never wait for it, or
                # a connection that does not read stalls every link. A control reply
                # (LINK_ERR to a stranger, say) is dropped; a site's MSG goes through the
                # broker and the site loses its link (it hears "not linked", or nothing
                # for its timeout, and fails over).
                if len(item) > 1 and item[1] == wire.KIND_MSG:
                    self._reroute(server, item)
                continue
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    log.warning("cell %s: data socket send failed: %s", self._name, exc)
                self._reroute(server, item)
                continue
            core.stats["sent"] += 1

    def _reroute(self, server: LinkServer, item: list[Any]) -> None:
        back = server.unreachable(item[0], item)
        if back is not None:
            self._core.out.append(back)
            self._core.wake()

    # -- the end ----------------------------------------------------------------------------

    def close(self, linger_ms: int = 0) -> None:
        """BYE on every link, then every socket closed (the private context ended);
        `linger_ms` bounds how long the last replies queued on the data socket may wait."""
        table = self._core.link_table
        if table is not None:
            for link, frames in table.close_all(time.monotonic()):
                self._send_control(link, frames)
            while table.closes:
                self._close(table.closes.popleft())
        for link, sock, monitor in list(self._socks.values()):
            self._close(link)
            del sock, monitor
        if self._poller is not None:
            for watched in (self.router, self.zap):
                if watched is not None:
                    self._poller.unregister(watched)
        if self.router is not None:
            self.router.close(linger=linger_ms)
            self.router = None
        self._close_private()
