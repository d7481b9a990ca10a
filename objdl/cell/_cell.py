"""The :class:`Cell`: a named endpoint's public face (lifecycle, sending, handlers).

The protocol lives in a sans-I/O :class:`~objdl.cell._core.CellCore` (correlation,
admission, session, sealing decisions). This module is the threaded shell around it:
an :class:`~objdl.cell._io.IOThread` owns the socket and feeds the core, a
:class:`~objdl.cell._handlers.HandlerPool` runs the handlers that are not inline, and
callers' threads submit to the core and wait on their request's lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from objdl import fqcn as _fqcn
from objdl._wake import Waker
from objdl.cell._core import CellCore
from objdl.cell._dealer import settings, start_error
from objdl.cell._handlers import HandlerPool, RequestCallback
from objdl.cell._io import IOThread
from objdl.cell._linkapi import DirectLinks, data_config
from objdl.cell._linkio import LinkSockets
from objdl.cell._links import LinkTable
from objdl.cell._pending import OnDone, PendingRequest
from objdl.errors import CellError
from objdl.message import (
    Message,
    MessageHeaderKey,
    ReturnCode,
    Signal,
)
from objdl.security import (
    KeySource,
    PeerKeySource,
    PublicKeySource,
)

if TYPE_CHECKING:
    pass

__all__ = ["Cell"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
_ABORT_POLL = 0.02  # how often a waiting call looks at its abort signal
_E2E_CHANNEL = "objdl__e2e"  # reserved: requests objdl itself answers
_E2E_HELLO = "hello"
_HELLO_TIMEOUT = 5.0  # a first sealed fire to a peer waits at most this for its session


def _hello(request: Message) -> None:
    """Answer a session handshake: the sealed OK reply is what teaches the sender."""
    return None


class Cell(DirectLinks):
    """One named endpoint connected to an objdl broker.

    Args:
        fqcn: this cell's name, e.g. ``"site-1"`` or ``"site-1.w0"``.
        broker_url: the broker's address, e.g. ``"tcp://127.0.0.1:8002"``; or several,
            a list or a comma-separated string: the first, then its standbys. The cell
            registers with the first that answers (:meth:`start` gives each a share
            of its timeout), and when the broker it is on goes silent for
            `broker_timeout` it moves to the next one, round the list, and registers
            there (docs/RELIABILITY.md, "Standby brokers").
        max_workers: threads that run request handlers.
        max_pending: requests allowed to wait for a handler thread; beyond that a
            request is answered ``service_unavailable`` at once.
        heartbeat_interval: seconds between heartbeats to the broker.
        broker_timeout: seconds of silence after which the broker is taken for dead
            and the cell reconnects.
        start_timeout: default bound for :meth:`start`.
        drain_timeout: at :meth:`stop`, how long handlers already running may take
            to finish, so their replies still go out.
        context: a ZeroMQ context to use (default: the process-wide one).
        curve_keys: this cell's key pair: a ``NAME.key_secret`` file (``objdl keys
            new``), a ``(public, secret)`` Z85 pair or a
            :class:`~objdl.security.KeyPair`. Needed by the two options below.
        broker_public_key: the broker's public key (Z85 text or a ``.key`` file):
            connect with CURVE, authenticated as `curve_keys`. Default: plain.
        peer_keys: the public keys of the cells this one exchanges ``secure=True``
            messages with: a directory (``<name>.key`` files, or the broker's
            allow-list directory with its ``allowed.json``), or a mapping name ->
            key. Makes ``secure=True`` work (it needs the ``cryptography`` package).
        data_bind: open a *data socket* on this address (e.g. ``"tcp://0.0.0.0:*"``, a
            port chosen at start) so that sites downloading from this cell pull the
            chunks directly from it instead of through the broker; the broker still
            carries the first reply, which offers the socket (docs/PROTOCOL.md,
            "Direct links"). Default: none, everything goes through the broker.
        data_advertise: the address sites are told to connect to: a host (the bound
            port is added) or a full ``tcp://HOST:PORT``. Needed when `data_bind`
            listens on every interface; default: the bound address.
        data_allowed_keys: the public keys that may connect to the data socket and
            the names each may use, as for the broker (an allow-list directory, a
            mapping name -> key, or a :class:`~objdl.security.KeyPolicy`). A cell that
            talks CURVE to its broker makes its data socket a CURVE server too, with
            these keys (default: `peer_keys`); giving them turns CURVE on.
        direct_links: accept the direct links that owners offer (default True);
            False keeps every message on the broker.

    Raises:
        KeyFileError: a key or key file is missing or malformed (a ValueError).
        SecureUnavailableError: `peer_keys` was given but ``cryptography`` is missing.
    """

    def __init__(
        self,
        fqcn: str,
        broker_url: str | Sequence[str],
        *,
        max_workers: int = 8,
        max_pending: int = 1024,
        heartbeat_interval: float = 0.5,
        broker_timeout: float = 2.0,
        start_timeout: float = 5.0,
        context: zmq.Context | None = None,
        curve_keys: KeySource | None = None,
        broker_public_key: PublicKeySource | None = None,
        peer_keys: PeerKeySource | None = None,
        drain_timeout: float = 1.0,
        data_bind: str | None = None,
        data_advertise: str | None = None,
        data_allowed_keys: PeerKeySource | None = None,
        direct_links: bool = True,
    ) -> None:
        conf = settings(
            fqcn, broker_url, max_workers, max_pending, curve_keys, broker_public_key, peer_keys
        )
        data = data_config(conf, data_bind, data_advertise, data_allowed_keys, peer_keys)
        self._fqcn = conf.fqcn
        self.broker_urls = conf.broker_urls
        self._start_timeout = start_timeout
        self._ctx = context or zmq.Context.instance()
        self._keys, self._broker_key, self._e2e = conf.keys, conf.broker_key, conf.e2e
        self._waker = Waker()
        self._core = core = CellCore(
            self._fqcn,
            time.monotonic(),
            self._waker.wake,
            max_pending=max_pending,
            heartbeat_interval=heartbeat_interval,
            broker_timeout=broker_timeout,
            e2e=self._e2e,
            switch_after=conf.switch_after(broker_timeout, start_timeout),
        )
        core.broker_url = ",".join(conf.broker_urls)
        self.stats = core.stats
        self._drain = drain_timeout
        self._state_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._stop_cbs: list[Callable[[], None]] = []
        self._pool = HandlerPool(self._fqcn, max_workers, core.handlers)
        core.dispatch = self._pool.put
        self._heartbeat, self._broker_timeout = heartbeat_interval, broker_timeout
        if direct_links:
            core.link_table = LinkTable(
                self._fqcn,
                heartbeat_interval,
                broker_timeout,
                core.fail_link_requests,
                core.waiters.waiting,
                core.out,
            )
        self._links = LinkSockets(self._fqcn, self._ctx, core, self._keys, data)
        self._io = IOThread(
            self._fqcn,
            conf.broker_urls,
            self._ctx,
            core,
            self._waker,
            keys=self._keys,
            broker_key=self._broker_key,
            links=self._links,
        )
        if self._e2e is not None:  # the handshake a first sealed fire waits for
            core.handlers.register(_E2E_CHANNEL, _E2E_HELLO, _hello, (), {})

    clock = staticmethod(time.monotonic)
    """The clock request deadlines are measured on (``objdl.testing`` cells have a fake one)."""

    # ---------------------------------------------------------------- lifecycle

    @property
    def fqcn(self) -> str:
        return self._fqcn

    @property
    def broker_url(self) -> str:
        """The broker this cell is on (or tries next)."""
        return self._io.url

    @property
    def is_connected(self) -> bool:
        """True while the broker has accepted this cell's registration."""
        return self._io.registered

    @property
    def secure_stats(self) -> dict[str, int]:
        """Counts of sealed messages opened, and rejected by kind (``auth``, ``replay``,
        ``unknown_peer``, ``malformed``, ``unknown_session``); empty without ``peer_keys``."""
        return dict(self._e2e.stats) if self._e2e is not None else {}

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the broker to (re)accept this cell; True if it has.

        Retries use it so that a broker restart costs a wait, not every try at once.
        """
        if not self._started or self._stopped:
            return False
        return self._io.connected.wait(timeout)

    def get_fqcn(self) -> str:
        return self._fqcn

    def _running(self) -> bool:
        return self._started and not self._stopped

    def start(self, timeout: float | None = None) -> None:
        """Connect and register; return once the broker has accepted this cell.

        Raises:
            BrokerUnavailableError: no broker answered within `timeout` seconds.
            NameTakenError: a live cell already has this name.
            AuthenticationError: the broker refused this cell's key, or the name is not
                one the key may use, or the CURVE handshake failed (check the keys).
        """
        timeout = self._start_timeout if timeout is None else timeout
        with self._state_lock:
            if self._started:
                raise CellError(f"cell {self._fqcn!r} was already started; make a new Cell")
            self._started = True
        self._waker.open()
        try:  # bound here, so that a port in use fails the start with a clear error
            self._core.link_server = self._links.bind(2 * self._broker_timeout)
        except Exception:
            self._stopped = True
            self._waker.close()
            raise
        self._pool.start()
        self._io.start()
        ok = self._io.ready.wait(timeout)
        if ok and self._io.registered:
            return
        error = start_error(
            ", ".join(self.broker_urls), self._fqcn, timeout, self._io.refused, self._io.handshake
        )
        self.stop()
        raise error

    def stop(self, timeout: float = 5.0) -> None:
        """Unregister, end every thread and close the socket. Idempotent."""
        with self._state_lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        deadline = time.monotonic() + timeout
        # Let handlers already running finish, so their replies are queued and go out
        # with the last flush (a site waiting on them would otherwise wait its timeout).
        self._core.handlers.drain(min(self._drain, timeout / 2))
        self._io.stop(max(0.0, deadline - time.monotonic()))
        self._pool.stop(deadline, time.monotonic)
        self._core.waiters.fail_all(ReturnCode.COMM_ERROR, f"cell {self._fqcn} stopped")
        self._waker.close()
        for cb in self._stop_cbs:
            try:
                cb()
            except Exception:
                log.exception("cell %s: stop callback failed", self._fqcn)

    def __enter__(self) -> Cell:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- handlers

    def register_request_cb(
        self,
        channel: str,
        topic: str,
        cb: RequestCallback,
        *args: Any,
        inline: bool = False,
        **kwargs: Any,
    ) -> None:
        """Serve requests on (channel, topic) with ``cb(request, *args, **kwargs)``.

        The callback returns the reply :class:`Message`, or None for an empty OK
        reply; if it raises, the requester gets ``process_exception`` with the error
        text. It runs on one of the cell's handler threads, so a slow handler never
        stalls the cell.

        With ``inline=True`` it runs on the cell's I/O thread as soon as the request
        arrives, which saves two thread hops per request: for quick handlers only
        (no blocking, no waiting for another reply; :meth:`send_request` from an
        inline handler raises), since while it runs the cell receives and sends
        nothing. A sealed (``secure``) request always runs on a handler thread,
        because opening it is work. ``inline`` is therefore not passed on to `cb`.
        """
        if not callable(cb):
            raise TypeError(f"cb must be callable, got {type(cb).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be str")
        self._core.handlers.register(channel, topic, cb, args, kwargs, inline=bool(inline))

    # ---------------------------------------------------------------- sending

    def send_request(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        secure: bool = False,
        optional: bool = False,
        abort_signal: Signal | None = None,
    ) -> Message:
        """Send `request` to `target` and return its reply, within `timeout` seconds.

        Remote trouble never raises: the reply's ``RETURN_CODE`` header says
        ``timeout``, ``target_unreachable``, ``comm_error``, ``process_exception``,
        ``invalid_request``, ``msg_too_big`` or ``abort_run``.

        With `secure`, the request is sealed end to end for `target` (the broker sees
        only ciphertext) and so must the reply be: a reply that does not authenticate
        comes back as ``authentication_error``, so does a request the target could not
        open; a plaintext error reply is passed on without its payload.

        Raises:
            SecureUnavailableError: `secure` is True but this cell has no end-to-end
                keys or no public key for `target` (also a NotImplementedError);
                nothing was sent.
            ValueError / TypeError: a bad argument.
        """
        return self.broadcast_request(
            channel, topic, [target], request, timeout, secure, optional, abort_signal
        )[target]

    def broadcast_request(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        request: Message,
        timeout: float,
        secure: bool = False,
        optional: bool = False,
        abort_signal: Signal | None = None,
    ) -> dict[str, Message]:
        """Send `request` to every target at once; wait for all replies up to `timeout`.

        Ten slow targets cost one timeout, not ten. Return codes as in :meth:`send_request`.
        """
        if threading.get_ident() == self._io.ident:
            raise CellError(
                f"cell {self._fqcn}: a request cannot wait for its reply on the cell's I/O "
                "thread (from an inline handler or an on_done hook); use request_async, "
                "or register the handler without inline=True"
            )
        pending = self._submit(channel, topic, targets, request, timeout, secure, optional)
        try:
            self._wait(pending, time.monotonic() + timeout, abort_signal)
        finally:
            for p in pending:
                p.cancel()
        aborted = abort_signal is not None and abort_signal.triggered
        return self._core.collect(pending, timeout, aborted, optional, channel, topic)

    def request_async(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        done_queue: queue.SimpleQueue[Any] | None = None,
        secure: bool = False,
        optional: bool = False,
        on_done: OnDone | None = None,
    ) -> PendingRequest:
        """Send `request` and return at once with its :class:`PendingRequest`.

        The reply (or a ``comm_error``/``target_unreachable`` reply from the broker
        connection) is stored on the pending request; then `on_done`, if given, is
        called with it on the thread that stored it (the cell's I/O thread for replies
        and NACKs: it must be quick and never block; a request_async from inside it
        leaves with no extra wake-up), and the request is put on `done_queue`, if
        given. Nothing resolves it at its deadline: call :meth:`PendingRequest.result`
        once the deadline has passed to get a ``timeout`` reply and stop waiting.
        """
        return self._submit(
            channel, topic, target, request, timeout, secure, optional, done_queue, on_done
        )[0]

    def _submit(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        request: Message,
        timeout: float,
        secure: bool,
        optional: bool,
        done_queue: queue.SimpleQueue[Any] | None = None,
        on_done: OnDone | None = None,
    ) -> list[PendingRequest]:
        tlist = self._check_send(channel, topic, targets, request, secure)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        pending = self._core.submit(
            channel,
            topic,
            tlist,
            request,
            time.monotonic() + timeout,
            secure,
            done_queue,
            on_done,
        )
        if not self._core.registered and pending[0].reply is not None:
            err = pending[0].reply.get_header(_H.ERROR, "")
            self._core.log_failure(optional, "request on %s/%s failed: %s", channel, topic, err)
        return pending

    def add_stop_callback(self, cb: Callable[[], None]) -> None:
        """Call `cb()` when the cell stops (after its threads ended), e.g. to free state."""
        with self._state_lock:
            self._stop_cbs.append(cb)

    def fire_and_forget(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        message: Message,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, str]:
        """Send `message` to every target without waiting; return a return code per target.

        ``ok`` means the message was handed to the broker connection, not that it
        arrived; ``comm_error`` means there is no broker connection now.
        """
        tlist = self._check_send(channel, topic, targets, message, secure)
        if not self._core.registered:
            self._core.log_failure(
                optional, "fire_and_forget on %s/%s: not connected", channel, topic
            )
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        failed: dict[str, str] = {}
        if secure:
            failed = self._handshake(tlist, optional)
            tlist = [t for t in tlist if t not in failed]
        self._core.fire(channel, topic, tlist, message, secure)
        return {**dict.fromkeys(tlist, ReturnCode.OK), **failed}

    def list_cells(self, prefix: str = "", timeout: float = 5.0) -> list[str]:
        """Names of the live cells known to the broker, optionally under `prefix`.

        Raises:
            CellError: not connected, or no answer within `timeout`.
        """
        if prefix:
            _fqcn.validate(prefix)
        if not self._core.registered:
            raise CellError(
                f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            )
        token, w = self._core.list_query(prefix, time.monotonic() + timeout)
        try:
            if not w.wait(timeout) or w.reply is None:
                raise CellError(f"the broker did not list its cells within {timeout:g}s")
            names = w.reply.payload
            assert isinstance(names, list)
            return names
        finally:
            self._core.waiters.forget_list(token)

    # ---------------------------------------------------------------- internals: callers' side

    def _check_send(
        self, channel: str, topic: str, targets: Iterable[str] | str, msg: Message, secure: bool
    ) -> list[str]:
        if secure and self._e2e is None:
            self._core.check_send(channel, topic, targets, msg, secure)  # raises: no keys
        if not self._started or self._stopped:
            raise CellError(f"cell {self._fqcn!r} is not running: call start() first")
        return self._core.check_send(channel, topic, targets, msg, secure)

    def _handshake(self, targets: list[str], optional: bool) -> dict[str, str]:
        """Learn the session of every target this cell has none for; return the failures."""
        assert self._e2e is not None
        unknown = [t for t in targets if not self._e2e.knows_session(t)]
        if not unknown:
            return {}
        replies = self.broadcast_request(
            _E2E_CHANNEL, _E2E_HELLO, unknown, Message(), _HELLO_TIMEOUT, True, optional
        )
        return {
            t: str(r.get_header(_H.RETURN_CODE))
            for t, r in replies.items()
            if r.get_header(_H.RETURN_CODE) != ReturnCode.OK
        }

    def _wait(
        self, waiters: Iterable[PendingRequest], deadline: float, abort: Signal | None
    ) -> None:
        for w in waiters:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if abort is None:
                    if w.wait(left):
                        break
                    return
                if abort.triggered:
                    return
                if w.wait(min(left, _ABORT_POLL)):
                    break
