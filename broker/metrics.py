"""A broker you can watch: Prometheus' text format at ``http://HOST:PORT/metrics``.

How it works: ``Broker(..., metrics="127.0.0.1:9102")`` makes a :class:`MetricsServer`.
On every scrape its thread asks the broker for its counters (``Broker.stats()``),
its live cells and what it holds outbound per peer, and renders them with
``prometheus_client`` (``broker/_collector.py`` says which metric comes from which
counter). Nothing is counted per message for this: a broker with metrics routes
exactly as one without.

The HTTP side is this module's own, not ``prometheus_client``'s server: that one
starts a daemon thread per request that nothing joins and that waits for a silent
client for ever. Here one thread owns the listening socket and every connection
(a selector, non-blocking sockets), so:

- at most :data:`MAX_CONNECTIONS` connections are open at once; past that the oldest
  is closed to let the new one in;
- a request must arrive, whole, within :data:`REQUEST_TIMEOUT` of its connection
  (at most :data:`MAX_REQUEST_BYTES` of it) and its answer must leave within the same
  deadline, or the connection is closed;
- :meth:`MetricsServer.stop` wakes the thread through a socket pair, joins it and
  closes every socket: no thread or socket outlives the broker.

The endpoint has no authentication and no TLS: bind it to loopback or a private
interface that only the Prometheus server reaches.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from objdl._logutil import RateLimitedLog
from objdl.errors import ObjdlError

if TYPE_CHECKING:
    from broker._collector import Renderer
    from broker.server import Broker

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT",
    "TOP_PEERS",
    "MetricsServer",
    "MetricsUnavailableError",
    "RelayLink",
    "parse_address",
]

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
"""Most HTTP connections open at once (Prometheus needs one per scrape)."""

MAX_REQUEST_BYTES = 8192
"""Most bytes of one request (request line and headers); a scrape sends a few hundred."""

REQUEST_TIMEOUT = 5.0
"""Seconds a connection has to send its request and take the answer."""

TOP_PEERS = 10
"""How many peers ``objdl_broker_peer_queued_bytes`` names: those holding the most."""

_BACKLOG = 16


class MetricsUnavailableError(ObjdlError):
    """``metrics=`` was given but the ``prometheus_client`` package is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "broker metrics need the 'prometheus_client' package, which is not installed: "
            "pip install 'objdl[metrics]', or run the broker without --metrics"
        )


@dataclass(frozen=True)
class RelayLink:
    """One link of a broker to another broker, as the metrics show it.

    :meth:`Broker.relay_links() <broker.Broker.relay_links>` returns these (relay
    brokers: docs/PROTOCOL.md "Relay brokers"), and the collector exposes them as
    ``objdl_broker_relay_link_up`` (one sample per link) and
    ``objdl_broker_relay_links`` (how many, per direction and state).

    Attributes:
        direction: ``"up"`` for this broker's link to its parent, ``"down"`` for a
            relay that registered a subtree here.
        prefix: the subtree the link carries (the relay's prefix).
        url: the other broker's address (``""`` if unknown, e.g. a relay's connection).
        up: the link is connected and registered now.
        names: how many live cell names the link carries (for ``"up"``: this relay's
            whole subtree, as announced to the parent).
    """

    direction: str
    prefix: str
    url: str = ""
    up: bool = False
    names: int = 0


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) as ``(host, port)``; port 0 picks one.

    Raises:
        ValueError: not HOST:PORT, no host, or a port outside 0-65535; the text says
            what to give instead.
    """
    if not isinstance(address, str):
        raise ValueError(f"metrics: give HOST:PORT as a str, not {type(address).__name__}")
    host, sep, port_text = address.strip().rpartition(":")
    example = "e.g. 127.0.0.1:9102, or 127.0.0.1:0 for any free port"
    if not sep or not host:
        raise ValueError(
            f"metrics: {address!r} is not HOST:PORT ({example}); the endpoint has no "
            "authentication, so name the private interface it listens on"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"metrics: {address!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"metrics: {address!r}: write an IPv6 host in brackets, [::1]:9102")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics: {address!r}: the port must be 0-65535 ({example})")
    return host, int(port_text)


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None  # set once the request is whole
    draining: bool = False  # answered; reading what the client still sends, until it closes


class MetricsServer:
    """Serves a broker's metrics over HTTP from one thread of its own.

    The broker makes, starts and stops it (``metrics=``); use it directly only to
    serve a broker in a process that runs several.

    Args:
        address: ``HOST:PORT`` to listen on (see :func:`parse_address`).
        broker: the broker whose numbers it serves.

    Raises:
        ValueError: `address` is not HOST:PORT.
        MetricsUnavailableError: ``prometheus_client`` is not installed.
    """

    def __init__(self, address: str, broker: Broker) -> None:
        self._host, self._port = parse_address(address)
        try:
            collector = importlib.import_module("broker._collector")
        except ImportError as exc:
            if not (exc.name or "").startswith("prometheus_client"):
                raise
            raise MetricsUnavailableError() from None
        self._render: Renderer = collector.Renderer(broker)
        self._thread: threading.Thread | None = None
        self._wake: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._log = RateLimitedLog(logger)

    @property
    def url(self) -> str:
        """Where the metrics are: ``http://HOST:PORT/metrics`` (the real port once started)."""
        host, port = self._bound or (self._host, self._port)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    def start(self, timeout: float = 5.0) -> None:
        """Listen and start the thread. A restart listens on the port it had before.

        Raises:
            OSError: the address cannot be resolved or bound.
        """
        if self._thread is not None:
            return
        port = self._bound[1] if self._bound else self._port
        listener = _listen(self._host, port)
        try:
            wake_rx, wake_tx = socket.socketpair()
        except OSError:
            listener.close()
            raise
        self._bound = (self._host, listener.getsockname()[1])
        self._render.collector.reset()  # the broker's counters start again from zero
        self._wake = wake_tx
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(listener, wake_rx, started),
            name=f"objdl-broker-metrics {self.url}",
            daemon=True,
        )
        self._thread.start()
        started.wait(timeout)  # the listener already accepts; this only orders the logs
        logger.info("objdl broker metrics at %s (no authentication)", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread, join it and close every socket; does nothing if not running.

        Raises:
            TimeoutError: the thread did not end within `timeout` (it never blocks,
                so this means a scrape's rendering hung).
        """
        thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        with contextlib.suppress(OSError):  # the thread may already be gone
            wake.send(b"x")
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"metrics thread at {self.url} did not stop within {timeout:g}s")
        wake.close()
        self._thread = self._wake = None

    # -- the thread ----------------------------------------------------------------

    def _run(self, listener: socket.socket, wake: socket.socket, started: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        conns: dict[socket.socket, _Conn] = {}  # oldest first
        try:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            started.set()
            while True:
                now = time.monotonic()
                for conn in [c for c in conns.values() if c.deadline <= now]:
                    self._close(sel, conns, conn)
                # No connection, no deadline: sleep until one comes or stop() wakes us.
                wait = min((c.deadline - now for c in conns.values()), default=None)
                for key, events in sel.select(None if wait is None else max(wait, 0.0)):
                    if key.fileobj is wake:
                        return
                    if key.fileobj is listener:
                        self._accept(sel, conns, listener)
                        continue
                    if key.data is not None:
                        self._serve(sel, conns, key.data, events)
        except Exception:
            logger.exception("objdl broker metrics at %s: thread failed", self.url)
        finally:
            for conn in list(conns.values()):
                self._close(sel, conns, conn)
            sel.close()
            listener.close()
            wake.close()

    def _accept(
        self,
        sel: selectors.BaseSelector,
        conns: dict[socket.socket, _Conn],
        listener: socket.socket,
    ) -> None:
        for _ in range(_BACKLOG):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again on the next wake
                self._log.log(logging.WARNING, "accept", "metrics: accept failed: %r", exc)
                return
            if len(conns) >= MAX_CONNECTIONS:
                self._close(sel, conns, next(iter(conns.values())))
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + REQUEST_TIMEOUT)
            conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _serve(
        self,
        sel: selectors.BaseSelector,
        conns: dict[socket.socket, _Conn],
        conn: _Conn,
        events: int,
    ) -> None:
        try:
            if conn.draining:
                if not conn.sock.recv(65536):
                    self._close(sel, conns, conn)
            elif conn.answer is None and events & selectors.EVENT_READ:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(sel, conns, conn)
                    return
                conn.request += data
                head, sep, _ = conn.request.partition(b"\r\n\r\n")
                if sep or len(conn.request) > MAX_REQUEST_BYTES:
                    answer = self._answer(bytes(head) if sep else None)
                    conn.answer = memoryview(answer)
                    sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            elif conn.answer is not None and events & selectors.EVENT_WRITE:
                sent = conn.sock.send(conn.answer)
                conn.answer = conn.answer[sent:]
                if not conn.answer:
                    # Closing with unread bytes would reset the connection and could lose
                    # the answer on its way: say we are done, then wait for the client's end.
                    conn.sock.shutdown(socket.SHUT_WR)
                    conn.draining = True
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the client went away
            self._close(sel, conns, conn)

    def _answer(self, head: bytes | None) -> bytes:
        """The whole HTTP response to a request whose head (before the blank line) is `head`."""
        if head is None:
            return _response(431, "request headers too large\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, "bad request line\n")
        method, target = parts[0], parts[1].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, "use GET\n", [("Allow", "GET, HEAD")])
        if target != b"/metrics":
            return _response(404, "the metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept":
                accept = value.strip().decode("latin-1")
        try:
            body, content_type = self._render(accept)
        except Exception as exc:  # a broker stopping mid-scrape, or a bug: not the thread's end
            self._log.log(logging.ERROR, "render", "metrics: cannot render: %r", exc)
            return _response(500, "cannot render the metrics; see the broker's log\n")
        return _response(200, body, [("Content-Type", content_type)], head=method == b"HEAD")

    def _close(
        self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn
    ) -> None:
        conns.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(conn.sock)
        conn.sock.close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _response(
    status: int,
    body: bytes | str,
    headers: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    fields = headers or [("Content-Type", "text/plain; charset=utf-8")]
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines += [f"{k}: {v}" for k, v in fields]
    lines += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head else data)


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on `host`:`port` (the first address it resolves to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restart reuses its port at once, whatever the last scrape left in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
