"""A cell: one named endpoint that sends and serves requests through the broker.

How it works: one I/O thread owns the cell's DEALER socket (ZeroMQ sockets are not
thread-safe). Threads that send encode their message themselves, append the frames
to an outbound queue and wake the I/O thread through a pipe; they then wait on a
per-request waiter registered *before* sending and removed in ``finally``. The I/O
thread routes replies and NACKs to waiters and hands requests to a small pool of
handler threads, so a slow handler never stalls routing. Registration and liveness
are the sans-I/O :class:`objdl._session.Session`.

Security is opt-in (docs/SECURITY.md). With ``broker_public_key`` the socket is a
CURVE client, watched by a monitor socket so a refused key fails :meth:`Cell.start`
at once. With ``peer_keys``, ``secure=True`` seals messages end to end
(:mod:`objdl.security`): a sender seals and queues under one lock per destination,
so counters reach the receiver in order; the receiver opens sealed requests on a
handler thread and sealed replies on the I/O thread, and never hands on a message
that did not authenticate.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import re
import threading
import time
from _thread import allocate_lock as _thread_lock
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from objdl import fqcn as _fqcn
from objdl import wire
from objdl._logutil import RateLimitedLog
from objdl._session import Action, Session, SessionState
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError, WireError
from objdl.message import (
    Message,
    MessageHeaderKey,
    MessageType,
    ReturnCode,
    Signal,
    make_reply,
)
from objdl.security import (
    AuthenticationError,
    KeySource,
    PeerKeySource,
    PublicKeySource,
    Rejected,
    SecureUnavailableError,
    end_to_end,
    load_keypair,
    load_public_key,
)

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = ["Cell", "PendingRequest", "RequestCallback"]

log = logging.getLogger(__name__)

RequestCallback = Callable[..., "Message | None"]

_H = MessageHeaderKey
_NACK_RC = {
    wire.NACK_UNREACHABLE: ReturnCode.TARGET_UNREACHABLE,
    wire.NACK_BUSY: ReturnCode.COMM_ERROR,
    wire.NACK_TOO_BIG: ReturnCode.MSG_TOO_BIG,
    wire.NACK_UNREGISTERED: ReturnCode.COMM_ERROR,
}
_ABORT_POLL = 0.02  # how often a waiting call looks at its abort signal
_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+")
_CLOSE_LINGER_MS = 250  # time given to the last queued replies and BYE at stop
_SECURE_MSG = (
    "secure=True needs end-to-end keys, which cell {} does not have: give it curve_keys= "
    "(its key pair) and peer_keys= (its peers' public keys); refusing rather than sending "
    "plaintext (or use secure=False on a trusted network)"
)
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class _Sealed:
    """A sealed request or fire, queued for a handler thread to open."""

    __slots__ = ("frames", "headers")

    def __init__(self, frames: list[Any], headers: dict[str, Any]) -> None:
        self.frames = frames
        self.headers = headers


class PendingRequest:
    """A request in flight, from :meth:`Cell.request_async`.

    The reply arrives on the cell's I/O thread, which stores it, wakes waiters and,
    when a ``done_queue`` was given, puts this object on it, so one thread can keep
    many requests in flight and handle replies in the order they come.
    """

    __slots__ = (
        "_cell",
        "_done",
        "_once",
        "deadline",
        "done_queue",
        "reply",
        "req_id",
        "secure",
        "target",
    )

    def __init__(
        self,
        cell: Cell | None,
        req_id: int,
        target: str,
        deadline: float,
        done_queue: queue.SimpleQueue[Any] | None = None,
        secure: bool = False,
    ) -> None:
        self._cell = cell
        self.secure = secure  # the reply must come sealed
        self.req_id = req_id
        self.target = target
        self.deadline = deadline
        self.done_queue = done_queue
        self.reply: Message | None = None
        # A lock held until the reply comes is several times cheaper than an Event
        # (no Condition), which counts on the per-request path.
        self._done = _thread_lock()
        self._done.acquire()
        self._once = _thread_lock()

    def resolve(self, reply: Message) -> None:
        """Store `reply` unless one came first; wake waiters and queue this request."""
        with self._once:
            if self.reply is not None:
                return
            self.reply = reply
        self._done.release()
        if self.done_queue is not None:
            self.done_queue.put(self)

    def done(self) -> bool:
        return self.reply is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (default: until the deadline) for the reply."""
        if self.reply is not None:
            return True
        if timeout is None:
            timeout = max(0.0, self.deadline - time.monotonic())
        if self._done.acquire(timeout=max(0.0, timeout)):
            self._done.release()  # leave it open for any other waiter
            return True
        return self.reply is not None

    def cancel(self) -> None:
        """Stop waiting: a reply that comes later is dropped."""
        if self._cell is not None:
            self._cell._forget_waiter(self.req_id)

    def result(self) -> Message:
        """The reply, or a ``timeout`` reply if none has come; stops the wait either way."""
        self.cancel()
        if self.reply is None:
            self.resolve(make_reply(ReturnCode.TIMEOUT, f"no reply from {self.target} in time"))
        assert self.reply is not None
        return self.reply


class Cell:
    """One named endpoint connected to an objdl broker.

    Args:
        fqcn: this cell's name, e.g. ``"site-1"`` or ``"site-1.w0"``.
        broker_url: the broker's address, e.g. ``"tcp://127.0.0.1:8002"``.
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

    Raises:
        KeyFileError: a key or key file is missing or malformed (a ValueError).
        SecureUnavailableError: `peer_keys` was given but ``cryptography`` is missing.
    """

    def __init__(
        self,
        fqcn: str,
        broker_url: str,
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
    ) -> None:
        self._fqcn = _fqcn.validate(fqcn)
        self._fqcn_b = self._fqcn.encode()
        if not isinstance(broker_url, str) or not _URL.fullmatch(broker_url):
            raise ValueError(
                f"broker_url must look like tcp://HOST:PORT (or ipc://PATH), got {broker_url!r}"
            )
        if max_workers < 1 or max_pending < 1:
            raise ValueError("max_workers and max_pending must be at least 1")
        self.broker_url = broker_url
        self._max_workers = max_workers
        self._max_pending = max_pending
        self._hb = heartbeat_interval
        self._broker_timeout = broker_timeout
        self._start_timeout = start_timeout
        self._ctx = context or zmq.Context.instance()
        if curve_keys is None and (broker_public_key is not None or peer_keys is not None):
            raise ValueError("broker_public_key and peer_keys need curve_keys (this cell's keys)")
        self._keys = load_keypair(curve_keys) if curve_keys is not None else None
        self._broker_key = (
            load_public_key(broker_public_key) if broker_public_key is not None else None
        )
        self._e2e: EndToEnd | None = None
        if peer_keys is not None and self._keys is not None:
            self._e2e = end_to_end(self._fqcn, self._keys, peer_keys)
        self._monitor: zmq.Socket | None = None  # handshake events (I/O thread only)
        self._auth_refused = ""  # the broker turned our key away (ZAP)
        self._handshake_failed = ""  # the last CURVE handshake failure, until one succeeds
        self._stats_lock = threading.Lock()

        self._handlers: dict[tuple[str, str], tuple[RequestCallback, tuple, dict]] = {}
        self._handlers_lock = threading.Lock()
        self._waiters: dict[int, PendingRequest] = {}
        self._lists: dict[bytes, PendingRequest] = {}
        self._waiters_lock = threading.Lock()
        self._req_ids = itertools.count(1)

        self._out: deque[list[Any]] = deque()
        self._wake_r, self._wake_w = -1, -1
        self._wake_pending = False
        self._jobs: queue.SimpleQueue[tuple[Message | _Sealed, str] | None] = queue.SimpleQueue()
        self._pending_jobs = 0
        self._pending_lock = threading.Lock()
        self._idle = threading.Condition(self._pending_lock)  # _pending_jobs fell to 0
        self._drain = drain_timeout
        self._workers: list[threading.Thread] = []
        self._io: threading.Thread | None = None
        self._sock: zmq.Socket | None = None  # owned by the I/O thread
        self._io_ident = -1
        self._closing_linger = 0  # ms; set when the I/O thread ends normally
        self._origins: dict[bytes, str] = {}  # validated origin names (I/O thread only)
        self._targets: set[str] = set()  # validated target names
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._state_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._registered = False
        self._connected = threading.Event()  # set while registered, for wait_connected
        self._refused = ""
        self._stop_cbs: list[Callable[[], None]] = []
        self._rlog = RateLimitedLog(log)
        self.stats: dict[str, int] = {
            "sent": 0,
            "received": 0,
            "dropped_malformed": 0,
            "dropped_late_reply": 0,
            "reconnects": 0,
            "rejected_secure": 0,
        }

    # ---------------------------------------------------------------- lifecycle

    @property
    def fqcn(self) -> str:
        return self._fqcn

    @property
    def is_connected(self) -> bool:
        """True while the broker has accepted this cell's registration."""
        return self._registered

    @property
    def secure_stats(self) -> dict[str, int]:
        """Counts of sealed messages opened, and rejected by kind (``auth``, ``replay``,
        ``unknown_peer``, ``malformed``); empty without ``peer_keys``."""
        return dict(self._e2e.stats) if self._e2e is not None else {}

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the broker to (re)accept this cell; True if it has.

        Retries use it so that a broker restart costs a wait, not every try at once.
        """
        if not self._started or self._stopped:
            return False
        return self._connected.wait(timeout)

    def get_fqcn(self) -> str:
        return self._fqcn

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
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for i in range(self._max_workers):
            t = threading.Thread(
                target=self._worker_loop, name=f"objdl-{self._fqcn}-handler-{i}", daemon=True
            )
            t.start()
            self._workers.append(t)
        self._io = threading.Thread(
            target=self._io_loop, name=f"objdl-{self._fqcn}-io", daemon=True
        )
        self._io.start()
        ok = self._ready.wait(timeout)
        if ok and self._registered:
            return
        refused, auth, handshake = self._refused, self._auth_refused, self._handshake_failed
        self.stop()
        if auth:
            raise AuthenticationError(self.broker_url, auth)
        if refused:
            if refused.startswith("not allowed"):
                raise AuthenticationError(self.broker_url, f"name {self._fqcn!r} {refused}")
            if "taken" in refused:
                raise NameTakenError(self._fqcn, refused)
            raise CellError(f"the broker refused cell {self._fqcn!r}: {refused}")
        if handshake:
            raise AuthenticationError(
                self.broker_url,
                f"{handshake} (is broker_public_key this broker's key, and does it use CURVE?)",
            )
        raise BrokerUnavailableError(self.broker_url, timeout)

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
        with self._idle:
            self._idle.wait_for(lambda: self._pending_jobs == 0, min(self._drain, timeout / 2))
        self._stopping.set()
        self._wake()
        if self._io is not None:
            self._io.join(max(0.0, deadline - time.monotonic()))
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            if t is threading.current_thread():
                continue  # stop() called from a handler: it ends once the handler returns
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("cell %s: handler thread %s still busy after stop", self._fqcn, t.name)
        self._fail_all_waiters(ReturnCode.COMM_ERROR, f"cell {self._fqcn} stopped")
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
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
        self, channel: str, topic: str, cb: RequestCallback, *args: Any, **kwargs: Any
    ) -> None:
        """Serve requests on (channel, topic) with ``cb(request, *args, **kwargs)``.

        The callback returns the reply :class:`Message`, or None for an empty OK
        reply. It runs on a handler thread; if it raises, the requester gets
        ``process_exception`` with the error text.
        """
        if not callable(cb):
            raise TypeError(f"cb must be callable, got {type(cb).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be str")
        with self._handlers_lock:
            self._handlers[(channel, topic)] = (cb, args, kwargs)

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
        pending = self._submit(channel, topic, targets, request, timeout, secure, optional, None)
        try:
            self._wait(pending, time.monotonic() + timeout, abort_signal)
        finally:
            for p in pending:
                p.cancel()
        result: dict[str, Message] = {}
        for p in pending:
            if p.reply is None and abort_signal is not None and abort_signal.triggered:
                p.resolve(make_reply(ReturnCode.ABORT_RUN, "aborted by the caller's signal"))
            elif p.reply is None:
                p.resolve(
                    make_reply(ReturnCode.TIMEOUT, f"no reply from {p.target} within {timeout:g}s")
                )
            reply = p.result()
            rc = reply.get_header(_H.RETURN_CODE)
            if rc != ReturnCode.OK:
                self._log_failure(
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
    ) -> PendingRequest:
        """Send `request` and return at once with its :class:`PendingRequest`.

        The reply (or a ``comm_error``/``target_unreachable`` reply from the broker
        connection) is stored on the pending request and, if `done_queue` is given,
        the request is put on that queue. Nothing resolves it at its deadline: call
        :meth:`PendingRequest.result` once the deadline has passed to get a
        ``timeout`` reply and stop waiting.
        """
        return self._submit(channel, topic, target, request, timeout, secure, optional, done_queue)[
            0
        ]

    def _submit(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        request: Message,
        timeout: float,
        secure: bool,
        optional: bool,
        done_queue: queue.SimpleQueue[Any] | None,
    ) -> list[PendingRequest]:
        tlist = self._check_send(channel, topic, targets, request, secure)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        pending: list[PendingRequest] = []
        batch = []
        encode = self._encode_secure if secure else self._encode
        for target in tlist:
            req_id = next(self._req_ids)
            batch.append(encode(request, channel, topic, target, MessageType.REQUEST, req_id))
            pending.append(PendingRequest(self, req_id, target, deadline, done_queue, secure))
        if not self._registered:
            err = f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            self._log_failure(optional, "request on %s/%s failed: %s", channel, topic, err)
            for p in pending:
                p.resolve(make_reply(ReturnCode.COMM_ERROR, err))
            return pending
        with self._waiters_lock:
            for p in pending:
                self._waiters[p.req_id] = p
        if not secure:
            self._enqueue(batch)
            return pending
        try:
            for p, frames in zip(pending, batch, strict=True):
                self._queue_sealed(p.target, frames)
        except BaseException:
            for p in pending:
                self._forget_waiter(p.req_id)
            raise
        finally:
            self._wake()
        return pending

    def _forget_waiter(self, req_id: int) -> None:
        with self._waiters_lock:
            self._waiters.pop(req_id, None)

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
        if not self._registered:
            self._log_failure(optional, "fire_and_forget on %s/%s: not connected", channel, topic)
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        encode = self._encode_secure if secure else self._encode
        batch = [encode(message, channel, topic, t, MessageType.FIRE, 0) for t in tlist]
        if not secure:
            self._enqueue(batch)
            return dict.fromkeys(tlist, ReturnCode.OK)
        try:
            for target, frames in zip(tlist, batch, strict=True):
                self._queue_sealed(target, frames)
        finally:
            self._wake()
        return dict.fromkeys(tlist, ReturnCode.OK)

    def list_cells(self, prefix: str = "", timeout: float = 5.0) -> list[str]:
        """Names of the live cells known to the broker, optionally under `prefix`.

        Raises:
            CellError: not connected, or no answer within `timeout`.
        """
        if prefix:
            _fqcn.validate(prefix)
        if not self._registered:
            raise CellError(
                f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            )
        token = str(next(self._req_ids)).encode()
        w = PendingRequest(None, 0, "broker", time.monotonic() + timeout)
        with self._waiters_lock:
            self._lists[token] = w
        try:
            self._enqueue([[wire.KIND_LIST, token, prefix.encode()]])
            if not w.wait(timeout) or w.reply is None:
                raise CellError(f"the broker did not list its cells within {timeout:g}s")
            names = w.reply.payload
            assert isinstance(names, list)
            return names
        finally:
            with self._waiters_lock:
                self._lists.pop(token, None)

    # ---------------------------------------------------------------- internals: callers' side

    def _check_send(
        self, channel: str, topic: str, targets: Iterable[str] | str, msg: Message, secure: bool
    ) -> list[str]:
        if secure and self._e2e is None:
            raise SecureUnavailableError(_SECURE_MSG.format(repr(self._fqcn)))
        if not self._started or self._stopped:
            raise CellError(f"cell {self._fqcn!r} is not running: call start() first")
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
                if len(self._targets) >= 4096:
                    self._targets.clear()
                self._targets.add(t)
        if len(set(tlist)) != len(tlist):
            raise ValueError(f"duplicate targets in {tlist}")
        if secure:
            assert self._e2e is not None
            for t in tlist:
                self._e2e.require_peer(t)  # all known, or nothing is sent
        return tlist

    def _headers(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: int
    ) -> dict[str, Any]:
        """`msg`'s headers plus the routing headers every message carries."""
        headers = dict(msg.headers)
        headers[_H.CHANNEL] = channel
        headers[_H.TOPIC] = topic
        headers[_H.MSG_TYPE] = mtype
        headers[_H.ORIGIN] = self._fqcn
        headers[_H.DESTINATION] = target
        if req_id:
            headers[_H.REQ_ID] = req_id
        return headers

    def _encode(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: int
    ) -> list[Any]:
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers.pop(_H.SECURE, None)  # e.g. a received secure message sent on in plaintext
        return [wire.KIND_MSG, target.encode(), *wire.encode(Message(headers, msg.payload))]

    def _encode_secure(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: int
    ) -> list[Any]:
        """The frames ``[headers, body, *buffers]`` of `msg`, marked secure, not yet sealed."""
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers[_H.SECURE] = True
        return wire.encode(Message(headers, msg.payload))

    def _queue_sealed(self, target: str, frames: list[Any]) -> None:
        """Seal `frames` for `target` and queue them, in the order of their counters."""
        assert self._e2e is not None
        route = [wire.KIND_MSG, target.encode()]
        self._e2e.outbound(target).seal(frames, lambda sealed: self._out.append(route + sealed))

    def _enqueue(self, batch: list[list[Any]]) -> None:
        self._out.extend(batch)
        self._wake()

    def _wake(self) -> None:
        if self._wake_pending or threading.get_ident() == self._io_ident:
            return  # already signalled, or the I/O thread itself flushes before it polls
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

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

    def _log_failure(self, optional: bool, msg: str, *args: Any) -> None:
        log.log(
            logging.DEBUG if optional else logging.WARNING, "cell %s: " + msg, self._fqcn, *args
        )

    def _fail_all_waiters(self, rc: str, error: str) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.values()) + list(self._lists.values())
        for w in waiters:
            w.resolve(make_reply(rc, error))

    # ---------------------------------------------------------------- internals: handler threads

    def _worker_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run_handler(*job)
            except Exception:  # never lose a worker thread
                log.exception("cell %s: unexpected error running a handler", self._fqcn)
            finally:
                with self._idle:
                    self._pending_jobs -= 1
                    if self._pending_jobs == 0:
                        self._idle.notify_all()

    def _run_handler(self, job: Message | _Sealed, origin: str) -> None:
        secure = isinstance(job, _Sealed)
        if isinstance(job, _Sealed):
            opened = self._open_request(job, origin)
            if opened is None:
                return
            request = opened
        else:
            request = job
        channel = request.get_header(_H.CHANNEL)
        topic = request.get_header(_H.TOPIC)
        mtype = request.get_header(_H.MSG_TYPE)
        with self._handlers_lock:
            entry = self._handlers.get((channel, topic))
        if entry is None:
            reply = make_reply(
                ReturnCode.INVALID_REQUEST,
                f"cell {self._fqcn} has no handler for channel {channel!r} topic {topic!r}",
            )
            self._rlog.log(
                logging.WARNING,
                "nohandler",
                "cell %s: no handler for %s/%s from %s",
                self._fqcn,
                channel,
                topic,
                origin,
            )
        else:
            cb, args, kwargs = entry
            try:
                result = cb(request, *args, **kwargs)
                if result is None:
                    reply = make_reply(ReturnCode.OK)
                elif isinstance(result, Message):
                    reply = result
                    if reply.get_header(_H.RETURN_CODE) is None:
                        reply.set_header(_H.RETURN_CODE, ReturnCode.OK)
                else:
                    raise TypeError(
                        f"handler for {channel}/{topic} returned {type(result).__name__}, "
                        "expected a Message or None"
                    )
            except Exception as exc:
                log.exception("cell %s: handler for %s/%s raised", self._fqcn, channel, topic)
                reply = make_reply(ReturnCode.PROCESS_EXCEPTION, f"{type(exc).__name__}: {exc}")
        if mtype == MessageType.REQUEST:
            self._send_reply(reply, request, origin, secure)

    def _send_reply(
        self, reply: Message, request: Message, origin: str, secure: bool = False
    ) -> None:
        """Send `reply` to `request`; sealed if `secure` (the request was sealed and opened)."""
        channel = request.get_header(_H.CHANNEL) or ""
        topic = request.get_header(_H.TOPIC) or ""
        req_id = request.get_header(_H.REQ_ID)
        encode = self._encode_secure if secure else self._encode
        try:
            frames = encode(reply, channel, topic, origin, MessageType.REPLY, req_id)
        except (TypeError, ValueError) as exc:
            err = f"reply could not be encoded: {exc}"
            log.error("cell %s: handler for %s/%s: %s", self._fqcn, channel, topic, err)
            frames = encode(
                make_reply(ReturnCode.PROCESS_EXCEPTION, err),
                channel,
                topic,
                origin,
                MessageType.REPLY,
                req_id,
            )
        if not secure:
            self._enqueue([frames])
            return
        try:
            self._queue_sealed(origin, frames)
        except (SecureUnavailableError, ValueError) as exc:  # its key went away meanwhile
            log.error("cell %s: sealed reply to %s not sent: %s", self._fqcn, origin, exc)
        self._wake()

    # ---------------------------------------------------------------- internals: secure receive

    def _open_request(self, job: _Sealed, origin: str) -> Message | None:
        """Open a sealed request or fire (handler thread); None if it must not run."""
        assert self._e2e is not None
        try:
            plain = self._e2e.open(origin, job.frames)
        except Rejected as exc:
            self._rejected(origin, exc.reason)
            self._answer_rejected(job.headers, origin, exc.reason)
            return None
        try:
            msg = wire.decode(plain)
        except WireError as exc:
            self._drop("decode", "undecodable secure message from %s: %s", origin, exc)
            if job.headers.get(_H.MSG_TYPE) == MessageType.REQUEST:
                err = make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}")
                self._send_reply(err, Message(job.headers), origin, secure=True)
            return None
        msg.headers[_H.ORIGIN] = origin
        return msg

    def _open_reply(self, frames: list[zmq.Frame], waiter: PendingRequest, origin: str) -> None:
        """Open a sealed reply (I/O thread) and hand it to `waiter`, or what went wrong."""
        assert self._e2e is not None
        try:
            msg = wire.decode(self._e2e.open(origin, frames[2:]))
        except Rejected as exc:
            self._rejected(origin, exc.reason)
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"the reply from {origin} was rejected: {exc}"
            )
        except WireError as exc:
            self._drop("decode", "undecodable secure reply from %s: %s", origin, exc)
            return  # as for a plaintext reply that does not decode: the request times out
        else:
            msg.headers[_H.ORIGIN] = origin
            reply = msg
        with self._waiters_lock:
            self._waiters.pop(waiter.req_id, None)
        waiter.resolve(reply)

    def _rejected(self, origin: str, reason: str) -> None:
        with self._stats_lock:
            self.stats["rejected_secure"] += 1
        self._rlog.log(
            logging.WARNING,
            "secure",
            "cell %s rejected a secure message from %s: %s",
            self._fqcn,
            origin,
            reason,
        )

    def _answer_rejected(self, headers: dict[str, Any], origin: str, reason: str) -> None:
        """Tell a requester (in plaintext: there is nothing to protect) why its request failed."""
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST and isinstance(
            headers.get(_H.REQ_ID), int
        ):
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"cell {self._fqcn} rejected the request: {reason}"
            )
            self._send_reply(reply, Message(headers), origin)

    @staticmethod
    def _unsealed(reply: Message, origin: str) -> Message:
        """What a secure request gets for a plaintext reply: its error code, nothing more."""
        rc = reply.get_header(_H.RETURN_CODE)
        if rc is None or rc == ReturnCode.OK:
            return make_reply(
                ReturnCode.AUTHENTICATION_ERROR,
                f"the reply from {origin} to a secure request was not sealed",
            )
        return Message(
            {
                _H.RETURN_CODE: rc,
                _H.ERROR: str(reply.get_header(_H.ERROR, "")),
                _H.ORIGIN: origin,
            }
        )

    # ---------------------------------------------------------------- internals: I/O thread

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
        sock.connect(self.broker_url)
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
                self._handshake_failed = ""
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"it does not allow this cell's key (ZAP status {value})"
                if not self._ready.is_set():
                    self._auth_refused = why
                    self._ready.set()
                else:  # libzmq does not retry a refused key: this cell stays offline
                    self._rlog.log(
                        logging.ERROR,
                        "auth",
                        "cell %s: the broker at %s refused this cell's key on reconnect",
                        self._fqcn,
                        self.broker_url,
                    )
            else:
                self._handshake_failed = f"the CURVE handshake failed ({zmq.Event(kind).name})"

    def _io_loop(self) -> None:
        try:
            self._sock = self._new_socket()
            session = Session(self._fqcn, time.monotonic(), self._hb, self._broker_timeout)
            self._io_run(session)
        except Exception:
            log.exception("cell %s: I/O thread failed", self._fqcn)
        finally:
            self._registered = False
            self._connected.clear()
            self._ready.set()
            if self._sock is not None:
                self._close_socket(self._sock)
                self._sock = None

    def _io_run(self, session: Session) -> None:
        assert self._sock is not None
        self._io_ident = threading.get_ident()
        sock = self._sock
        want_out = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
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
                self._out.clear()
                self.stats["reconnects"] += 1
            self._apply(act, sock)
            if self._refused or self._auth_refused:
                return
            wait = max(0.0, session.next_deadline() - time.monotonic())
            events = dict(poller.poll(int(min(wait, 0.1) * 1000)))
            if self._wake_r in events:
                self._wake_pending = False
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if sock in events:
                self._drain_socket(sock, session)
            if monitor is not None and monitor in events:
                self._on_handshake(monitor)
            if session.state is SessionState.REGISTERED:
                stalled = self._flush(sock, stalled)
                if want_out != (stalled is not None):
                    want_out = stalled is not None
                    poller.register(sock, zmq.POLLIN | zmq.POLLOUT if want_out else zmq.POLLIN)
            elif self._out:
                self._out.clear()  # requests made while unregistered already failed
        if session.state is SessionState.REGISTERED:
            self._flush(sock, stalled)  # replies the last handlers queued
        bye = session.close()
        if bye is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(bye, zmq.NOBLOCK)
        self._closing_linger = _CLOSE_LINGER_MS

    def _flush(self, sock: zmq.Socket, stalled: list[Any] | None) -> list[Any] | None:
        """Send queued messages without blocking; return the one that did not fit."""
        out = self._out
        while True:
            frames = stalled if stalled is not None else (out.popleft() if out else None)
            if frames is None:
                return None
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return frames
            stalled = None
            self.stats["sent"] += 1

    def _apply(self, act: Action, sock: zmq.Socket) -> None:
        for frames in act.send:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(frames, zmq.NOBLOCK)
        if act.registered:
            self._registered = True
            self._connected.set()
            if not self._ready.is_set():
                log.info("cell %s registered with broker %s", self._fqcn, self.broker_url)
            else:
                log.info("cell %s registered again with broker %s", self._fqcn, self.broker_url)
            self._ready.set()
        if act.lost:
            self._registered = False
            self._connected.clear()
            log.warning("cell %s lost the broker: %s; reconnecting", self._fqcn, act.lost)
            self._fail_all_waiters(
                ReturnCode.COMM_ERROR, f"connection to the broker lost: {act.lost}"
            )
        if act.refused:
            self._refused = act.refused
            self._ready.set()

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

    def _drop(self, key: str, msg: str, *args: Any) -> None:
        self.stats["dropped_malformed"] += 1
        self._rlog.log(logging.WARNING, key, "cell %s dropped a message: " + msg, self._fqcn, *args)

    def _on_msg(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 4:
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
        if self._e2e is not None:
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
            if not self._refuse_sealed(frames[2], origin):
                self._drop("decode", "undecodable message from %s: %s", origin, exc)
                self._answer_undecodable(frames, origin, exc)
            return
        if msg.headers.get(_H.SECURE):  # a sealed body that happened to decode
            self._refuse_sealed(frames[2], origin)
            return
        self.stats["received"] += 1
        msg.headers[_H.ORIGIN] = origin
        mtype = msg.headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            req_id = msg.headers.get(_H.REQ_ID)
            with self._waiters_lock:
                w = self._waiters.get(req_id) if isinstance(req_id, int) else None
                if w is not None and w.target == origin:
                    del self._waiters[w.req_id]
            if w is None or w.target != origin:
                self.stats["dropped_late_reply"] += 1
                log.debug(
                    "cell %s: dropped a reply from %s for no waiting request", self._fqcn, origin
                )
                return
            w.resolve(self._unsealed(msg, origin) if w.secure else msg)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if self._admit(mtype, msg, origin):
                self._jobs.put((msg, origin))
        else:
            self._drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _admit(self, mtype: str, request: Message, origin: str) -> bool:
        """Take a request or fire for a handler thread, or answer ``service_unavailable``."""
        with self._pending_lock:
            busy = self._pending_jobs >= self._max_pending
            if not busy:
                self._pending_jobs += 1
        if busy and mtype == MessageType.REQUEST:
            self._send_reply(
                make_reply(ReturnCode.SERVICE_UNAVAILABLE, f"cell {self._fqcn} is overloaded"),
                request,
                origin,
            )
        return not busy

    def _on_sealed(self, frames: list[zmq.Frame], headers: dict[str, Any], origin: str) -> None:
        """A message marked secure, at a cell that can open it (I/O thread)."""
        self.stats["received"] += 1
        mtype = headers.get(_H.MSG_TYPE)
        if mtype == MessageType.REPLY:
            req_id = headers.get(_H.REQ_ID)
            with self._waiters_lock:
                w = self._waiters.get(req_id) if isinstance(req_id, int) else None
            if w is None or w.target != origin:
                self.stats["dropped_late_reply"] += 1
                return
            self._open_reply(frames, w, origin)
        elif mtype in (MessageType.REQUEST, MessageType.FIRE):
            if self._admit(mtype, Message(headers), origin):
                self._jobs.put((_Sealed(frames[2:], headers), origin))
        else:
            self._drop("mtype", "unknown msg_type %r from %s", mtype, origin)

    def _refuse_sealed(self, headers_frame: zmq.Frame, origin: str) -> bool:
        """If the message is marked secure, refuse it (this cell cannot open it): True."""
        try:
            headers = wire.decode_headers(headers_frame)
        except WireError:
            return False
        if not headers.get(_H.SECURE):
            return False
        why = "this cell cannot open secure messages: it has no curve_keys and peer_keys"
        self._rejected(origin, why)
        self._answer_rejected(headers, origin, why)
        return True

    def _answer_undecodable(self, frames: list[zmq.Frame], origin: str, exc: Exception) -> None:
        try:
            headers = wire.decode_headers(frames[2])
        except WireError:
            return
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST and isinstance(
            headers.get(_H.REQ_ID), int
        ):
            req = Message(headers)
            self._send_reply(
                make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}"),
                req,
                origin,
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
        req_id = headers.get(_H.REQ_ID)
        if headers.get(_H.MSG_TYPE) != MessageType.REQUEST or not isinstance(req_id, int):
            return
        with self._waiters_lock:
            w = self._waiters.pop(req_id, None)
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
        with self._waiters_lock:
            w = self._lists.get(frames[1].bytes)
        if w is not None:
            raw = frames[2].bytes.decode("utf-8", "replace")
            w.resolve(Message(payload=[n for n in raw.split("\n") if n]))
