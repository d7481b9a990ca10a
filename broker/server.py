"""The broker's I/O shell: one thread owns a ROUTER socket and drives a RoutingTable.

Every decision (who is registered, where a MSG goes, what to NACK) is made by
:class:`broker.routing.RoutingTable`; this module only moves frames. Received frames
of 16 KiB or more are kept as ``zmq.Frame`` objects and forwarded as they are
(zero-copy); smaller ones are copied, so that none pins a shared receive buffer of
libzmq's (see ``_COPY_BELOW``). Payloads are never parsed here. Every send is
non-blocking.

The loop (``_run``): poll the file descriptors of the ROUTER, the stop pipe (and ZAP);
then, in one turn holding the table's lock, drain up to ``_BATCH`` messages, tell the
table of tracked sends libzmq is done with, and tick the table if its next deadline
has come. A MSG is first offered to :meth:`RoutingTable.forward`; when it says where,
the frames go out one by one from here (routing id, ``MSG``, the sender's name, the
received frames) and no object is built for it. Everything else goes through
:meth:`RoutingTable.handle` and the :class:`~broker.routing.Send` objects it returns.

What the broker holds for one peer is bounded in bytes by the table (``max_peer_queue``;
docs/RELIABILITY.md). libzmq counts its per-peer queue in messages and says nothing of
when it is done with one, so every send the table marks ``track`` (those of at least
``track_min`` bytes: see :func:`_track_min`) goes out with its last frame wrapped in a
tracked zero-copy ``zmq.Frame``: when libzmq lets go of the message
(written into the kernel's socket buffer, or dropped with its connection), the tracker
is done and the shell tells the table (:meth:`RoutingTable.released`), oldest first per
peer. A send libzmq refuses (its pipe to the peer full) goes back to the table, and so
does every later send to that peer in the same batch, so order is kept.

With ``curve_keys`` and ``allowed_keys`` the ROUTER is a CURVE server, and the same
I/O thread answers the context's ZAP requests (bound before the ROUTER, so no
connection is ever accepted unchecked): only allowed keys connect, and the key of
each REG's connection (its ZAP User-Id) goes to the table's name policy.

With ``upstream`` and ``prefix`` the broker is a relay (docs/PROTOCOL.md, "Relay
brokers"): the same I/O thread owns a DEALER connected to the parent broker (a CURVE
client with ``upstream_key`` and ``upstream_broker_key``), hands what arrives on it to
:meth:`RoutingTable.handle_upstream`, sends the table's sends for the peer
:data:`~broker.routing.UPSTREAM` on it, and replaces it when the table says
``reconnect_upstream``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any, cast

import zmq
from zmq.utils import z85

from broker._relay import KIND_RREG
from broker._tree import DEFAULT_MAX_RELAY_QUEUE
from broker._upstream import UpstreamSocket, check_upstream
from broker.metrics import MetricsServer, RelayLink
from broker.routing import (
    DEFAULT_MAX_PEER_QUEUE,
    MESSAGE_OVERHEAD,
    UPSTREAM,
    Actions,
    Event,
    RoutingTable,
    Send,
)
from objdl import fqcn, wire
from objdl._logutil import RateLimitedLog
from objdl._wake import Waker
from objdl.errors import ObjdlError
from objdl.security import (
    ZAP_ENDPOINT,
    KeyFileError,
    KeyPolicy,
    KeySource,
    PublicKeySource,
    load_keypair,
    short_key,
    zap_reply,
)

__all__ = ["Broker", "BrokerError"]

logger = logging.getLogger(__name__)

# Upper bound on one poll, so a tick is never late by more than this even if the
# table's deadline math were off; the wake pipe makes stop() immediate regardless.
_MAX_POLL_S = 0.25
# Messages handled per wake-up before tick and the stop pipe get a turn.
_BATCH = 256
# Messages handled between two looks at which tracked sends libzmq is done with.
_REAP_EVERY = 32
# A restart on the same address may race the old socket's asynchronous close.
_ADDR_IN_USE_RETRY_S = 0.5
# Sends too small to be worth a tracker (a zero-copy frame, an Event and a wake-up of
# pyzmq's garbage-collector thread each) may together hold 1/_UNTRACKED_SHARE of the bound.
_UNTRACKED_SHARE = 8
# libzmq receives small frames into a shared buffer (8 KiB and a table of reference
# counts, about 18 KiB) that stays allocated while any frame in it lives: a received
# frame of 60 bytes kept waiting pins 18 KiB, 300 times its size (a peer that never
# reads could make the broker hold three times its bound). Frames under this size are
# therefore copied when forwarded or kept; larger ones have their own buffer and go on
# as they came, zero-copy.
_COPY_BELOW = 16 * 1024
# A longer frame 1 cannot be a name: never copied to look it up.
_MAX_NAME_BYTES = fqcn.MAX_FQCN_LENGTH
# Plain ints: pyzmq's flag enums cost a Python-level `|` on every frame.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
# The Cython send of one frame: the Python wrapper in zmq.Socket (routing_id and group
# for draft sockets) and send_multipart's per-frame checks cost more than the send.
_zmq_send = zmq.backend.Socket.send

_LEVELS = {
    "nack_unreachable": logging.DEBUG,
    "nack_unregistered": logging.DEBUG,
    "nack_busy": logging.DEBUG,
    "nack_too_big": logging.INFO,
    "who": logging.DEBUG,
    "probes": logging.DEBUG,
    "list": logging.DEBUG,
    "reg_ok": logging.INFO,
    "reg_err_not_allowed": logging.WARNING,
    "bye": logging.INFO,
    "expired": logging.INFO,
    "evicted": logging.INFO,
    "gone": logging.INFO,
    "relay_reg_ok": logging.INFO,
    "relay_lost": logging.INFO,
    "upstream_registered": logging.INFO,
    "list_forwarded": logging.DEBUG,
    "reg_err_outside": logging.INFO,
    "reg_err_relayed": logging.INFO,
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
        max_peer_queue: most bytes the broker holds outbound for any one peer, whatever
            it asks for and however slowly it reads (default 64 MiB): past it a request
            for that peer gets ``NACK busy`` and a reply to it is dropped, both counted
            (``nack_busy``, ``drop_busy``). One message larger than this may still go
            to a peer that has nothing outbound. See docs/RELIABILITY.md for what it
            covers.
        sndhwm: per-peer send queue limit of the ROUTER socket, in messages.
        rcvhwm: per-peer receive queue limit of the ROUTER socket, in messages.
        context: ZeroMQ context to use; by default the broker makes its own and
            terminates it on :meth:`stop`. A CURVE broker binds the context's ZAP
            handler, so it needs a context no other ZAP handler uses.
        curve_keys: the broker's key pair (a ``.key_secret`` file, ``(public,
            secret)`` Z85, or a :class:`~objdl.security.KeyPair`): the ROUTER becomes
            a CURVE server. Needs `allowed_keys`. Default: plain connections.
        allowed_keys: the keys that may connect and the names each may register:
            an allow-list directory (``NAME.key`` files and ``allowed.json``, see
            docs/SECURITY.md; read again on each start and by :meth:`reload_keys`)
            or a :class:`~objdl.security.KeyPolicy`. With CURVE, a relay may register
            a subtree here only if its key may use the prefix and every name under it
            (``["site-1", "site-1.*"]``, the default for ``site-1.key``).
        upstream: the parent broker's address: this broker is a relay that holds the
            subtree `prefix` (that name and every name under it) for the parent. Cells
            here may register only names in the subtree; messages for other names go
            to the parent, which routes the subtree's names here. Needs `prefix`.
        prefix: the subtree a relay holds (see `upstream`).
        upstream_key: the relay's own key pair, to authenticate to a CURVE parent
            (its ``.key_secret`` file, or as `curve_keys`); needs `upstream_broker_key`.
        upstream_broker_key: the parent's CURVE public key (Z85 or a ``.key`` file).
        upstream_timeout: a relay takes its parent for gone after this long without a
            word (then it connects afresh and registers its subtree again).
        max_relay_queue: most bytes held outbound for one relay link (to the parent,
            or to one of this broker's relays), shared by the cells behind it
            (default 256 MiB); past it, as for `max_peer_queue`.
        metrics: ``"HOST:PORT"`` to serve Prometheus metrics at
            ``http://HOST:PORT/metrics`` while the broker runs (port 0: any free one,
            read it back from :attr:`metrics_url`); needs ``prometheus_client``
            (``pip install 'objdl[metrics]'``). No authentication: bind it to loopback
            or a private interface. Default: no metrics.

    Raises:
        ValueError: an argument is out of range, or `metrics` is not HOST:PORT.
        MetricsUnavailableError: `metrics` was given and ``prometheus_client`` is
            not installed.

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
        max_peer_queue: int = DEFAULT_MAX_PEER_QUEUE,
        sndhwm: int = 1000,
        rcvhwm: int = 1000,
        context: zmq.Context[Any] | None = None,
        curve_keys: KeySource | None = None,
        allowed_keys: str | os.PathLike[str] | KeyPolicy | None = None,
        upstream: str | None = None,
        prefix: str | None = None,
        upstream_key: KeySource | None = None,
        upstream_broker_key: PublicKeySource | None = None,
        upstream_timeout: float = 2.0,
        max_relay_queue: int = DEFAULT_MAX_RELAY_QUEUE,
        metrics: str | None = None,
    ) -> None:
        for arg, value in (("sndhwm", sndhwm), ("rcvhwm", rcvhwm)):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0 (0: unlimited), not {value!r}")
        if (curve_keys is None) != (allowed_keys is None):
            raise ValueError(
                "curve_keys and allowed_keys go together: a CURVE broker needs its own "
                "key pair and the cell keys it allows"
            )
        self._keys = load_keypair(curve_keys) if curve_keys is not None else None
        self._allowed = allowed_keys
        self._policy: KeyPolicy | None = self._load_policy()
        self._table_args: dict[str, Any] = {
            "heartbeat_interval": heartbeat_interval,
            "cell_timeout": cell_timeout,
            "probe_timeout": probe_timeout,
            "max_message_size": max_message_size,
            "max_peer_queue": max_peer_queue,
        }
        self._table_args["track_min"] = _track_min(max_peer_queue, sndhwm)
        if self._policy is not None:
            self._table_args["authorize"] = self._authorize
            self._table_args["authorize_relay"] = self._authorize_relay
        up_keys = check_upstream(upstream, prefix, upstream_key, upstream_broker_key)
        self._upstream = upstream
        self._table_args.update(
            prefix=prefix, upstream_timeout=upstream_timeout, max_relay_queue=max_relay_queue
        )
        self._table = RoutingTable(**self._table_args)  # validates the arguments
        self._bind = bind
        self._url: str | None = None
        self._hwm = (sndhwm, rcvhwm)
        self._given_context = context
        self._context: zmq.Context[Any] | None = None
        self._wake: Waker | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        # Guards the table and counters: the I/O thread holds it for each turn (from a
        # poll's return to the next poll), readers (stats, cells) between turns.
        self._lock = threading.Lock()
        self._errors = 0
        self._zap_counts = {"zap_ok": 0, "zap_denied": 0}
        # Tracked sends libzmq may still hold, oldest first, per peer (I/O thread only).
        self._inflight: dict[bytes, deque[tuple[zmq.MessageTracker, Send[Any]]]] = {}
        self._stalled: set[bytes] = set()  # peers libzmq refused in the current batch
        self._acting = False
        # A subclass that overrides _send (a test's tap) sees every send as a Send: the
        # fast path, which sends frames itself, is only taken when _send is this one.
        self._fast = type(self)._send is Broker._send
        self._log = RateLimitedLog(logger)
        self._up = (  # the DEALER to the parent, for a relay (I/O thread only)
            UpstreamSocket(upstream, up_keys, self._hwm) if upstream is not None else None
        )
        self._metrics = MetricsServer(metrics, self) if metrics is not None else None

    # -- public --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The bound endpoint (actual port once started), else the bind address."""
        return self._url or self._bind

    @property
    def metrics_url(self) -> str | None:
        """Where the metrics are served (``http://HOST:PORT/metrics``), or None without them."""
        return self._metrics.url if self._metrics is not None else None

    @property
    def public_key(self) -> bytes | None:
        """The broker's CURVE public key (Z85), which cells need; None for a plain broker."""
        return self._keys.public if self._keys is not None else None

    def reload_keys(self) -> int:
        """Read the allow-list directory again; return how many keys it allows.

        New connections and new registrations follow the new list at once; cells
        already registered stay until they disconnect (restart the broker to drop
        them all).

        Raises:
            KeyFileError: the directory cannot be read; the old list stays in force.
            BrokerError: this broker does not use CURVE.
        """
        if self._policy is None:
            raise BrokerError(self.url, "reload_keys: this broker does not use CURVE")
        policy = self._load_policy()
        assert policy is not None
        self._policy = policy
        logger.info("objdl broker at %s: %d allowed keys", self.url, len(policy.keys))
        return len(policy.keys)

    def start(self, timeout: float = 5.0) -> None:
        """Bind the ROUTER socket and start the I/O thread.

        Raises:
            BrokerError: the address cannot be bound (naming it and why), the broker
                is already running, the allowed keys cannot be read, or the thread
                did not start within `timeout`.
        """
        with self._lifecycle:
            if self._thread is not None:
                raise BrokerError(self.url, "already running")
            if self._policy is not None:
                try:
                    self._policy = self._load_policy()  # a restart reads the allow-list again
                except KeyFileError as exc:
                    raise BrokerError(self.url, f"cannot read the allowed keys: {exc}") from exc
            context = self._given_context or zmq.Context()
            sockets: list[zmq.Socket[Any]] = []
            zap: zmq.Socket[Any] | None = None
            try:
                if self._keys is not None:
                    zap = self._bind_zap(context)  # before the ROUTER: nothing gets in unchecked
                    sockets.append(zap)
                sock = self._bind_router(context, self._url or self._bind, timeout)
                sockets.append(sock)
                if self._up is not None:
                    sockets.append(self._open_upstream(context))
                waker = Waker()
                waker.open()
            except BaseException:
                for s in sockets:
                    s.close(linger=0)
                if self._given_context is None:
                    context.term()
                raise
            self._url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._context, self._wake = context, waker
            with self._lock:
                self._table = RoutingTable(**self._table_args)  # a restart starts afresh
                self._inflight = {}
                self._errors = 0
                self._zap_counts = dict.fromkeys(self._zap_counts, 0)
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(sock, waker.read_fd, zap, started),
                name=f"objdl-broker {self._url}",
                daemon=True,
            )
            self._thread.start()
            if not started.wait(timeout):
                self._stop_locked(timeout)
                raise BrokerError(self.url, f"I/O thread did not start within {timeout:g}s")
            if self._metrics is not None:
                try:
                    self._metrics.start(timeout)
                except OSError as exc:
                    self._stop_locked(timeout)
                    why = f"cannot serve metrics at {self._metrics.url}: {exc.strerror or exc}"
                    raise BrokerError(self.url, why) from exc
        if self._policy is not None:
            logger.info(
                "objdl broker listening on %s (CURVE, %d allowed keys)",
                self._url,
                len(self._policy.keys),
            )
        else:
            logger.info("objdl broker listening on %s", self._url)
        if self._upstream is not None:
            logger.info(
                "objdl broker at %s relays %r for the parent at %s",
                self._url,
                self._table_args["prefix"],
                self._upstream,
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the I/O thread and close the socket; does nothing if not running.

        Raises:
            BrokerError: the I/O thread did not end within `timeout`.
        """
        with self._lifecycle:
            self._stop_locked(timeout)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see :data:`broker.routing.COUNTERS`) plus ``errors``,
        ``zap_ok`` and ``zap_denied`` (CURVE connections let in and turned away), and
        ``peak_peer_bytes``: the most bytes ever held outbound for one peer at once."""
        with self._lock:
            counters = self._table.counters()
            counters["peak_peer_bytes"] = self._table.peak_outbound()
            counters["errors"] = self._errors
            counters.update(self._zap_counts)
        return counters

    def queued_by_cell(self) -> tuple[dict[str, int], int, int]:
        """``({cell name: bytes held outbound}, peers holding any, the per-peer bound)``.

        Connections that hold no name (a claimant, or a forgotten cell whose last
        messages libzmq still holds) are summed under ``""``; a snapshot taken under the
        broker's lock (for the metrics endpoint).
        """
        by_cell: dict[str, int] = {}
        with self._lock:
            table = self._table
            queued = table.outbound_by_peer()
            for peer, nbytes in queued.items():
                name = table.name_of(peer) or ""
                by_cell[name] = by_cell.get(name, 0) + nbytes
            limit = table.max_peer_queue
        return by_cell, len(queued), limit

    def cells(self, prefix: str = "") -> list[str]:
        """Sorted names of live cells equal to `prefix` or under it (``""``: all)."""
        with self._lock:
            return self._table.cells(prefix)

    @property
    def upstream(self) -> str | None:
        """The parent broker's address if this broker is a relay, else None."""
        return self._upstream

    def tree_cells(self, prefix: str = "") -> list[str]:
        """As :meth:`cells`, plus the live cells of the subtrees this broker's relays hold."""
        with self._lock:
            return self._table.tree_cells(prefix)

    def relay_links(self) -> list[RelayLink]:
        """This broker's links to other brokers: ``"up"`` to its parent (a relay), and
        ``"down"`` for each relay that holds a subtree here."""
        with self._lock:
            links = self._table.relay_links()
        parent = self._upstream or ""
        return [
            RelayLink(k.direction, k.prefix, parent if k.direction == "up" else "", k.up, k.names)
            for k in links
        ]

    def upstream_state(self) -> str:
        """``"none"`` (not a relay), ``"connecting"``, ``"registered"`` or ``"refused"``."""
        with self._lock:
            return self._table.upstream_state()

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

    # -- security ------------------------------------------------------------------

    def _load_policy(self) -> KeyPolicy | None:
        if self._allowed is None or isinstance(self._allowed, KeyPolicy):
            return self._allowed
        return KeyPolicy.from_dir(self._allowed)

    def _authorize(self, identity: str | None, name: str) -> str:
        policy = self._policy
        assert policy is not None
        return policy.check(identity, name)

    def _authorize_relay(self, identity: str | None, prefix: str) -> str:
        policy = self._policy
        assert policy is not None
        return policy.check_subtree(identity, prefix)

    def _bind_zap(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        zap = context.socket(zmq.REP)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close(linger=0)
            raise BrokerError(
                self.url,
                "another ZAP handler is bound in this ZeroMQ context: a CURVE broker "
                "needs a context of its own (leave context=None)",
            ) from exc
        return zap

    def _answer_zap(self, zap: zmq.Socket[Any]) -> None:
        for _ in range(_BATCH):
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            policy = self._policy
            assert policy is not None
            reply = zap_reply(request, policy.allows_key)
            allowed = reply[2] == b"200"
            self._zap_counts["zap_ok" if allowed else "zap_denied"] += 1
            if not allowed:
                address = request[3].decode("utf-8", "replace") if len(request) > 3 else "?"
                key = request[6] if len(request) == 7 and len(request[6]) == 32 else b""
                self._log.log(
                    logging.WARNING,
                    "zap_denied",
                    "refused a connection from %s: %s%s",
                    address[:64],
                    reply[3].decode(),
                    f" (key {short_key(z85.encode(key))})" if key else "",
                )
            try:
                zap.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._error("ZAP reply", exc)

    # -- relay: the link to the parent (I/O thread only, once started) -------------

    def _open_upstream(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        assert self._up is not None
        try:
            return self._up.open(context)
        except zmq.ZMQError as exc:
            why = zmq.strerror(exc.errno) if exc.errno else str(exc)
            why = f"cannot connect to the parent {self._upstream}: {why}"
            raise BrokerError(self.url, why) from exc

    def _from_parent(self, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        """Handle one message from the parent (the turn holds the lock); nothing it sends
        may escape."""
        try:
            now = time.monotonic()
            act = self._table.handle_upstream(_unpinned(frames), now)
            self._act(sock, act, now)
        except Exception as exc:
            self._error("message from the parent", exc)

    def _replace_upstream(self, now: float) -> None:
        """The table gave up on the parent's connection: a new socket, registered afresh
        (called within the turn, which holds the lock; the loop polls the new socket)."""
        context = self._context
        if self._up is None or context is None:
            return
        queue = self._inflight.pop(UPSTREAM, None)  # closed with the socket: libzmq let go
        try:
            self._up.replace(context)
        except zmq.ZMQError as exc:
            self._error("reconnect to the parent", exc)
        for _, send in queue or ():
            self._table.released(send)
        self._table.upstream_replaced(now)
        logger.info("objdl broker at %s: connecting to its parent afresh", self._url)

    def _send_up(self, sock: zmq.Socket[Any], send: Send[Any], now: float) -> None:
        """Send one message to a relay's parent, or hand it back (refused, gone)."""
        assert self._up is not None
        frames = list(send.frames)
        tracked: zmq.Frame | None = None
        if send.track:
            tracked = zmq.Frame(memoryview(frames[-1]), track=True, copy=False)
            frames[-1] = tracked
        try:
            self._up.send(frames)
        except zmq.ZMQError as exc:
            self._not_sent(sock, send, exc, "send to the parent", now)
            return
        if tracked is not None:
            self._inflight.setdefault(UPSTREAM, deque()).append((tracked.tracker, send))

    # -- lifecycle -----------------------------------------------------------------

    def _bind_router(
        self, context: zmq.Context[Any], endpoint: str, timeout: float
    ) -> zmq.Socket[Any]:
        sock = context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self._keys is not None:
            sock.curve_server = True
            sock.curve_publickey = self._keys.public
            sock.curve_secretkey = self._keys.secret
            sock.zap_domain = b"objdl"
            with contextlib.suppress(AttributeError, zmq.ZMQError):  # fail closed without ZAP
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
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
        if self._metrics is not None:
            try:
                self._metrics.stop(timeout)
            except TimeoutError as exc:
                raise BrokerError(self.url, str(exc)) from exc
        wake.wake()  # the only thing the I/O thread is ever woken for: stop
        thread.join(timeout)
        if thread.is_alive():
            raise BrokerError(self.url, f"I/O thread did not stop within {timeout:g}s")
        wake.close()
        if self._given_context is None and self._context is not None:
            self._context.term()
        self._thread = self._wake = self._context = None
        logger.info("objdl broker at %s stopped", self._url)

    # -- I/O thread ----------------------------------------------------------------

    def _run(
        self,
        sock: zmq.Socket[Any],
        stop_fd: int,
        zap: zmq.Socket[Any] | None,
        started: threading.Event,
    ) -> None:
        """Poll, then one turn; until the stop pipe is readable.

        The poll watches file descriptors only: the ROUTER's (and ZAP's, and a relay's
        link to its parent) ``ZMQ_FD`` and the stop pipe, so it costs one ``poll()``,
        not the ``ZMQ_EVENTS`` look per socket before and after that ``zmq.Poller``
        takes (each a system call). ``ZMQ_FD`` is edge-triggered: it turns readable
        when libzmq has news for the socket, and any call on the socket (a send too)
        may take that news in. So before sleeping the loop asks ``ZMQ_EVENTS`` again
        unless nothing was sent on the ROUTER since libzmq last said no message was
        waiting (``known``); the parent's link, rarely busy, is asked every turn.
        """
        sock_fd = cast(int, sock.get(zmq.FD))
        items: list[tuple[int, int]] = [(sock_fd, _POLLIN), (stop_fd, _POLLIN)]
        zap_fd = -1
        if zap is not None:
            zap_fd = cast(int, zap.get(zmq.FD))
            items.append((zap_fd, _POLLIN))
        zap_due = zap is not None  # ZAP is drained to the end each time: then its FD is armed
        pending = known = False  # a message waits in the ROUTER / that is still true
        up_sock: zmq.Socket[Any] | None = None  # a relay's link to its parent, polled too
        deadline = -math.inf  # the first turn ticks: the first heartbeats
        started.set()
        try:
            while True:
                up = self._up.sock if self._up is not None else None
                if up is not up_sock:  # the parent's link opened or replaced: poll its FD
                    if up_sock is not None:
                        items.pop()
                    up_sock = up
                    if up is not None:
                        items.append((cast(int, up.get(zmq.FD)), _POLLIN))
                if not known:
                    pending = bool(cast(int, sock.get(_EVENTS)) & _POLLIN)
                    known = True
                up_pending = up_sock is not None and bool(cast(int, up_sock.get(_EVENTS)) & _POLLIN)
                if pending or zap_due or up_pending:
                    wait_ms = 0
                else:
                    wait = min(max(deadline - time.monotonic(), 0.0), _MAX_POLL_S)
                    wait_ms = int(wait * 1000.0) + 1
                for fd, _ in zmq.zmq_poll(items, wait_ms):
                    if fd == stop_fd:
                        return
                    if fd == zap_fd:
                        zap_due = True
                    elif fd == sock_fd and not pending:  # the ROUTER has news: perhaps a message
                        known = False
                with self._lock:  # one turn: readers of the table wait for it
                    if zap_due:
                        assert zap is not None
                        self._answer_zap(zap)
                        zap_due = False
                    if not known:
                        pending = bool(cast(int, sock.get(_EVENTS)) & _POLLIN)
                        known = True
                    if pending:
                        pending = self._drain(sock, time.monotonic())
                        known = not pending
                    if up_sock is not None and self._up is not None:
                        self._up.drain(lambda frames: self._from_parent(sock, frames), _BATCH)
                        known = False  # what the parent sent went out on the ROUTER
                    if self._inflight:
                        self._reap()
                    now = time.monotonic()
                    if now >= deadline and self._tick(sock, now):
                        known = False
                    deadline = self._table.next_deadline()
        except zmq.ContextTerminated:
            return
        except Exception:
            logger.exception("objdl broker at %s: I/O thread failed, routing stopped", self._url)
        finally:
            if self._up is not None:
                with self._lock:
                    bye = self._table.upstream_bye()
                self._up.close(bye)
            sock.close(linger=0)
            if zap is not None:
                zap.close(linger=0)

    def _drain(self, sock: zmq.Socket[Any], now: float) -> bool:
        """Handle up to ``_BATCH`` waiting messages; the common MSG takes the fast path.

        Returns False when libzmq said no message is left, after the last send of the
        batch; True when it stopped at ``_BATCH`` (more may be waiting).

        The fast path (see :meth:`RoutingTable.forward`) sends ``[to, MSG, origin,
        headers, ...]`` frame by frame with the received frames as they are; anything
        else, or a MSG ``forward`` declines, goes through :meth:`RoutingTable.handle`.
        """
        recv = sock.recv
        send = _zmq_send
        table = self._table
        forward = table.forward if self._fast else None
        curve = self._keys is not None
        inflight = self._inflight
        for i in range(_BATCH):
            if inflight and i % _REAP_EVERY == 0:
                self._reap()
            # Small batches are the common case: asking libzmq whether another message
            # is waiting costs a tenth of the zmq.Again a recv would raise (pyzmq builds
            # it in Python); in a long batch more are likely and recv is simply tried.
            if 0 < i < 8 and not cast(int, sock.get(_EVENTS)) & _POLLIN:
                return False
            try:
                peer = recv(_NOBLOCK)  # the routing id: a ROUTER always has more after it
            except zmq.Again:
                return False
            frames: list[zmq.Frame] = []
            try:
                frame = recv(_NOBLOCK, False)
                frames.append(frame)
                size = len(frame)
                while frame.more:
                    frame = recv(_NOBLOCK, False)
                    frames.append(frame)
                    size += len(frame)
                kind = frames[0]
                if (
                    forward is not None
                    and len(frames) >= 3
                    and len(kind) == 3
                    and kind.bytes == wire.KIND_MSG
                    and len(frames[1]) <= _MAX_NAME_BYTES
                ):
                    dest = frames[1].bytes
                    hit = forward(peer, dest, size, now)
                    if hit is not None:
                        to, origin = hit
                        try:
                            send(sock, to, _MORE)
                        except zmq.ZMQError as exc:
                            self._forward_failed(sock, exc, peer, dest, to, origin, frames, now)
                            continue
                        send(sock, wire.KIND_MSG, _MORE)
                        send(sock, origin, _MORE)
                        last = len(frames) - 1
                        for j in range(2, last + 1):
                            f: Any = frames[j]
                            if len(f) < _COPY_BELOW:  # copied: see _COPY_BELOW
                                f = memoryview(f)
                            send(sock, f, _MORE if j < last else _NOBLOCK)
                        continue
                identity = None
                if curve and len(frames) == 3 and len(kind) <= 4 and kind.bytes in _REG_KINDS:
                    identity = _user_id(kind)  # REG, or a relay's RREG
                frames = _unpinned(frames)  # the table may keep them a while
                if identity is None:  # the plain call, as wrappers of handle() expect
                    act = table.handle(peer, frames, now)
                else:
                    act = table.handle(peer, frames, now, identity)
                self._act(sock, act, now)
            except Exception as exc:
                self._error("message from " + peer.hex(), exc)
        return True

    def _forward_failed(
        self,
        sock: zmq.Socket[Any],
        exc: zmq.ZMQError,
        peer: bytes,
        dest: bytes,
        to: bytes,
        origin: bytes,
        frames: list[zmq.Frame],
        now: float,
    ) -> None:
        """libzmq refused a fast-path MSG: hand it to the table as the Send it stands for."""
        out: list[Any] = [wire.KIND_MSG, origin, *_unpinned(frames[2:])]
        cost = sum(len(f) for f in out) + MESSAGE_OVERHEAD
        failed: Send[Any] = Send(to, out, peer, dest, cost, False)
        if isinstance(exc, zmq.Again):
            self._refused(sock, failed, False, now)
        elif exc.errno == zmq.EHOSTUNREACH:
            self._refused(sock, failed, True, now)
        else:
            self._error("send to " + to.hex(), exc)

    def _tick(self, sock: zmq.Socket[Any], now: float) -> bool:
        """Tick the table and act on it; True if it sent anything. Nothing escapes."""
        try:
            act = self._table.tick(now)
            self._act(sock, act, now)
        except Exception as exc:
            self._error("tick", exc)
            return True  # perhaps it sent
        return bool(act.sends)

    def _error(self, where: str, exc: BaseException) -> None:
        self._errors += 1
        self._log.log(logging.ERROR, "error", "broker error on %s: %r", where, exc)

    def _act(self, sock: zmq.Socket[Any], act: Actions[Any], now: float) -> None:
        """Log the events and perform the sends of `act` (and of its follow-ups).

        ``_stalled`` collects the peers libzmq refused in this batch: later sends to
        them are handed back to the table untried, behind the refused one.
        """
        for event in act.events:
            self._log_event(event)
        if act.reconnect_upstream:
            self._replace_upstream(now)
        outer, self._acting = not self._acting, True
        try:
            for send in act.sends:
                self._send(sock, send, now)
        finally:
            if outer:
                self._acting = False
                self._stalled.clear()

    def _send(self, sock: zmq.Socket[Any], send: Send[Any], now: float) -> None:
        """Send one message of the table's, or hand it back (refused, gone)."""
        peer = send.peer
        if peer in self._stalled:
            self._refused(sock, send, False, now)
            return
        if peer == UPSTREAM and self._up is not None:  # a relay's parent
            self._send_up(sock, send, now)
            return
        frames = send.frames
        last = frames[-1]
        tracked: zmq.Frame | None = None
        if send.track:
            tracked = last = zmq.Frame(memoryview(last), track=True, copy=False)
        try:
            _zmq_send(sock, peer, _MORE)
        except zmq.ZMQError as exc:
            self._not_sent(sock, send, exc, "send to " + peer.hex(), now)
            return
        for i in range(len(frames) - 1):
            _zmq_send(sock, frames[i], _MORE)
        _zmq_send(sock, last, _NOBLOCK)
        if tracked is not None:
            queue = self._inflight.setdefault(peer, deque())
            queue.append((tracked.tracker, send))

    def _not_sent(
        self, sock: zmq.Socket[Any], send: Send[Any], exc: zmq.ZMQError, where: str, now: float
    ) -> None:
        """libzmq refused `send`: back to the table behind its peer's pipe (``Again``) or
        as gone (``EHOSTUNREACH``); any other error is counted and its bytes forgotten,
        and the other sends go on."""
        if isinstance(exc, zmq.Again):
            self._stalled.add(send.peer)
            self._refused(sock, send, False, now)
        elif exc.errno == zmq.EHOSTUNREACH:
            self._refused(sock, send, True, now)
        else:
            self._error(where, exc)
            if send.track:
                self._table.released(send)

    def _refused(self, sock: zmq.Socket[Any], send: Send[Any], gone: bool, now: float) -> None:
        follow_up = self._table.send_failed(send, gone, now)
        self._act(sock, follow_up, now)  # NACKs carry no origin: this recurses once at most

    def _reap(self) -> None:
        """Tell the table of every tracked send libzmq is done with (FIFO per peer)."""
        table = self._table
        for peer, queue in list(self._inflight.items()):
            while queue and queue[0][0].done:
                table.released(queue.popleft()[1])
            if not queue:
                del self._inflight[peer]

    def _log_event(self, event: Event) -> None:
        level = _LEVELS.get(event.kind, logging.WARNING)
        if not logger.isEnabledFor(level):
            return
        name = self._table.name_of(event.peer)
        origin = f"{event.peer.hex()} ({name})" if name else event.peer.hex()
        if event.peer == UPSTREAM:
            origin = f"to the parent {self._upstream}"
        key = event.kind if level >= logging.WARNING else f"{event.kind}:{event.peer.hex()}"
        self._log.log(level, key, "%s: %s [connection %s]", event.kind, event.detail, origin)


_REG_KINDS = (wire.KIND_REG, KIND_RREG)


def _unpinned(frames: list[Any]) -> list[Any]:
    """`frames` with each one under ``_COPY_BELOW`` bytes copied out of libzmq's buffer."""
    return [f.bytes if len(f) < _COPY_BELOW else f for f in frames]


def _track_min(max_peer_queue: int, sndhwm: int) -> int:
    """The size from which a send is tracked, so that the untracked ones fit in 1/8 of the
    per-peer bound: libzmq holds at most SNDHWM messages per peer in its pipe and one being
    written (docs/RELIABILITY.md). Without an SNDHWM (0) libzmq holds any number: all are
    tracked. With the defaults (64 MiB, 1000) it is 8380 bytes."""
    if sndhwm == 0:
        return 0
    return max_peer_queue // (_UNTRACKED_SHARE * (sndhwm + 1))


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection `frame` came on (the CURVE key), or None."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None
