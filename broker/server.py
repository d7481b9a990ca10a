"""The broker's I/O shell: one thread owns a ROUTER socket and drives a RoutingTable.

Every decision (who is registered, where a MSG goes, what to NACK) is made by
:class:`broker.routing.RoutingTable`; this module only moves frames. Received
frames are kept as ``zmq.Frame`` objects and forwarded as they are (``copy=False``),
so payload bytes are never copied or parsed here. Every send is non-blocking.

What the broker holds for one peer is bounded in bytes by the table (``max_peer_queue``;
docs/RELIABILITY.md). libzmq counts its per-peer queue in messages and says nothing of
when it is done with one, so every send the table marks ``track`` goes out with its last
frame wrapped in a tracked zero-copy ``zmq.Frame``: when libzmq lets go of the message
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
import itertools
import logging
import os
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

import zmq
from zmq.utils import z85

from broker._relay import KIND_RREG
from broker._tree import DEFAULT_MAX_RELAY_QUEUE
from broker._upstream import UpstreamSocket, check_upstream
from broker.metrics import MetricsServer, RelayLink
from broker.routing import (
    DEFAULT_MAX_PEER_QUEUE,
    UPSTREAM,
    Actions,
    Event,
    RoutingTable,
    Send,
)
from objdl import wire
from objdl._logutil import RateLimitedLog
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
        self._wake: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()  # guards _table between the I/O thread and readers
        self._errors = 0
        self._zap_counts = {"zap_ok": 0, "zap_denied": 0}
        # Tracked sends libzmq may still hold, oldest first, per peer (I/O thread only).
        self._inflight: dict[bytes, deque[tuple[zmq.MessageTracker, Send[Any]]]] = {}
        self._stalled: set[bytes] = set()  # peers libzmq refused in the current batch
        self._acting = False
        self._log = RateLimitedLog(logger)
        self._up = (  # the DEALER to the parent, for a relay (I/O thread only)
            UpstreamSocket(upstream, up_keys, self._hwm) if upstream is not None else None
        )
        self._poller: zmq.Poller | None = None
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
                pipe = f"inproc://objdl-broker-wake-{next(_pipe_ids)}"
                wake_rx = context.socket(zmq.PAIR)
                sockets.append(wake_rx)
                wake_rx.linger = 0
                wake_rx.bind(pipe)
                wake_tx = context.socket(zmq.PAIR)
                sockets.append(wake_tx)
                wake_tx.linger = 0
                wake_tx.connect(pipe)
                if self._up is not None:
                    sockets.append(self._open_upstream(context))
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
                self._inflight = {}
                self._errors = 0
                self._zap_counts = dict.fromkeys(self._zap_counts, 0)
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(sock, wake_rx, zap, started),
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
            with self._lock:
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
        """Handle one message from the parent; nothing it sends may escape."""
        try:
            now = time.monotonic()
            with self._lock:
                act = self._table.handle_upstream(frames, now)
            self._act(sock, act, now)
        except Exception as exc:
            self._error("message from the parent", exc)

    def _replace_upstream(self, now: float) -> None:
        """The table gave up on the parent's connection: a new socket, registered afresh."""
        context, poller = self._context, self._poller
        if self._up is None or context is None or poller is None:
            return
        queue = self._inflight.pop(UPSTREAM, None)  # closed with the socket: libzmq let go
        try:
            self._up.replace(context, poller)
        except zmq.ZMQError as exc:
            self._error("reconnect to the parent", exc)
        with self._lock:
            for _, send in queue or ():
                self._table.released(send)
            self._table.upstream_replaced(now)
        logger.info("objdl broker at %s: connecting to its parent afresh", self._url)

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

    def _run(
        self,
        sock: zmq.Socket[Any],
        wake: zmq.Socket[Any],
        zap: zmq.Socket[Any] | None,
        started: threading.Event,
    ) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if self._up is not None and self._up.sock is not None:
            poller.register(self._up.sock, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
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
                if zap is not None and zap in ready:
                    self._answer_zap(zap)
                if sock in ready:
                    self._drain(sock)
                if self._up is not None and self._up.sock in ready:
                    self._up.drain(lambda frames: self._from_parent(sock, frames), _BATCH)
                self._reap()
                self._guarded(sock, None, [])
        except Exception:
            logger.exception("objdl broker at %s: I/O thread failed, routing stopped", self._url)
        finally:
            if self._up is not None:
                with self._lock:
                    bye = self._table.upstream_bye()
                self._up.close(bye)
            sock.close(linger=0)
            wake.close(linger=0)
            if zap is not None:
                zap.close(linger=0)

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        for i in range(_BATCH):
            if i % _REAP_EVERY == 0:
                self._reap()
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = None
            if self._keys is not None and len(frames) == 4 and frames[1].bytes in _REG_KINDS:
                identity = _user_id(frames[1])
            self._guarded(sock, frames[0].bytes, frames[1:], identity)

    def _guarded(
        self,
        sock: zmq.Socket[Any],
        peer: bytes | None,
        frames: list[Any],
        identity: str | None = None,
    ) -> None:
        """Handle one message (or tick, when `peer` is None); nothing a peer sends may escape."""
        act: Actions[Any]
        try:
            now = time.monotonic()
            with self._lock:
                if peer is None:
                    act = self._table.tick(now)
                elif identity is None:  # the plain call, as wrappers of handle() expect
                    act = self._table.handle(peer, frames, now)
                else:
                    act = self._table.handle(peer, frames, now, identity)
            self._act(sock, act, now)
        except Exception as exc:
            self._error("message from " + peer.hex() if peer is not None else "tick", exc)

    def _error(self, where: str, exc: BaseException) -> None:
        with self._lock:
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
        stalled = self._stalled
        if send.peer in stalled:
            gone = False
        else:
            frames = list(send.frames)
            tracked: zmq.Frame | None = None
            if send.track:
                tracked = zmq.Frame(memoryview(frames[-1]), track=True, copy=False)
                frames[-1] = tracked
            try:
                if send.peer == UPSTREAM and self._up is not None:  # a relay's parent
                    self._up.send(frames)
                else:
                    sock.send_multipart([send.peer, *frames], zmq.NOBLOCK, copy=False)
                if tracked is not None:
                    queue = self._inflight.setdefault(send.peer, deque())
                    queue.append((tracked.tracker, send))
                return
            except zmq.Again:
                gone = False
                stalled.add(send.peer)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    self._error("send to " + send.peer.hex(), exc)  # the other sends go on
                    if send.track:
                        with self._lock:
                            self._table.released(send)
                    return
                gone = True
        with self._lock:
            follow_up = self._table.send_failed(send, gone, now)
        self._act(sock, follow_up, now)  # NACKs carry no origin: this recurses once at most

    def _reap(self) -> None:
        """Tell the table of every tracked send libzmq is done with (FIFO per peer)."""
        if not self._inflight:
            return
        done: list[Send[Any]] = []
        for peer, queue in list(self._inflight.items()):
            while queue and queue[0][0].done:
                done.append(queue.popleft()[1])
            if not queue:
                del self._inflight[peer]
        if done:
            with self._lock:
                for send in done:
                    self._table.released(send)

    def _log_event(self, event: Event) -> None:
        level = _LEVELS.get(event.kind, logging.WARNING)
        if not logger.isEnabledFor(level):
            return
        with self._lock:
            name = self._table.name_of(event.peer)
        origin = f"{event.peer.hex()} ({name})" if name else event.peer.hex()
        if event.peer == UPSTREAM:
            origin = f"to the parent {self._upstream}"
        key = event.kind if level >= logging.WARNING else f"{event.kind}:{event.peer.hex()}"
        self._log.log(level, key, "%s: %s [connection %s]", event.kind, event.detail, origin)


_REG_KINDS = (wire.KIND_REG, KIND_RREG)


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection `frame` came on (the CURVE key), or None."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None
