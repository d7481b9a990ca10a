"""The :class:`Cell`: a named endpoint's public face (lifecycle, sending, handlers).

The work is done by parts it owns: an :class:`~objdl.cell._io.IOThread` (the socket),
a :class:`~objdl.cell._handlers.HandlerPool` (request handlers), the
:class:`~objdl.cell._pending.Waiters` its requests wait in, and an
:class:`~objdl.cell._secure.Opener` for sealed messages. Sending threads encode their
message themselves and queue the frames in the shared
:class:`~objdl.cell._io.Outbox`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq

from objdl import fqcn as _fqcn
from objdl import wire
from objdl._logutil import RateLimitedLog
from objdl.cell._handlers import HandlerPool, RequestCallback
from objdl.cell._io import IOThread, Outbox
from objdl.cell._pending import PendingRequest, Waiters
from objdl.cell._secure import Opener
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError
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
    SecureUnavailableError,
    end_to_end,
    load_keypair,
    load_public_key,
)
from objdl.security._seal import seal_of

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = ["Cell"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
_ABORT_POLL = 0.02  # how often a waiting call looks at its abort signal
_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+")
_E2E_CHANNEL = "objdl__e2e"  # reserved: requests objdl itself answers
_E2E_HELLO = "hello"
_HELLO_TIMEOUT = 5.0  # a first sealed fire to a peer waits at most this for its session


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


def _hello(request: Message) -> None:
    """Answer a session handshake: the sealed OK reply is what teaches the sender."""
    return None


_SECURE_MSG = (
    "secure=True needs end-to-end keys, which cell {} does not have: give it curve_keys= "
    "(its key pair) and peer_keys= (its peers' public keys); refusing rather than sending "
    "plaintext (or use secure=False on a trusted network)"
)


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
        if not isinstance(broker_url, str) or not _URL.fullmatch(broker_url):
            raise ValueError(
                f"broker_url must look like tcp://HOST:PORT (or ipc://PATH), got {broker_url!r}"
            )
        if max_workers < 1 or max_pending < 1:
            raise ValueError("max_workers and max_pending must be at least 1")
        self.broker_url = broker_url
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
        self._stats_lock = threading.Lock()

        self._waiters = Waiters()
        self._req_ids = itertools.count(1)
        self._outbox = Outbox()
        self._drain = drain_timeout
        self._targets: set[str] = set()  # validated target names
        self._state_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._stop_cbs: list[Callable[[], None]] = []
        self._rlog = RateLimitedLog(log)
        self.stats: dict[str, int] = {
            "sent": 0,
            "received": 0,
            "dropped_malformed": 0,
            "dropped_late_reply": 0,
            "reconnects": 0,
            "rejected_secure": 0,
            "resent_secure": 0,
        }
        self._opener = Opener(
            self._fqcn,
            self._e2e,
            self.stats,
            self._stats_lock,
            self._waiters,
            self._send_reply,
            self._drop,
            self._resend,
        )
        self._pool = HandlerPool(
            self._fqcn, max_workers, max_pending, self._send_reply, self._opener.open_request
        )
        self._io = IOThread(
            self._fqcn,
            broker_url,
            self._ctx,
            keys=self._keys,
            broker_key=self._broker_key,
            heartbeat=heartbeat_interval,
            broker_timeout=broker_timeout,
            outbox=self._outbox,
            waiters=self._waiters,
            pool=self._pool,
            opener=self._opener,
            stats=self.stats,
            send_reply=self._send_reply,
            drop=self._drop,
        )
        if self._e2e is not None:  # the handshake a first sealed fire waits for
            self._pool.register(_E2E_CHANNEL, _E2E_HELLO, _hello, (), {})

    # ---------------------------------------------------------------- lifecycle

    @property
    def fqcn(self) -> str:
        return self._fqcn

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
        self._outbox.open()
        self._pool.start()
        self._io.start()
        ok = self._io.ready.wait(timeout)
        if ok and self._io.registered:
            return
        refused, auth, handshake = (
            self._io.refused,
            self._io.auth_refused,
            self._io.handshake_failed,
        )
        self.stop()
        if auth:
            raise AuthenticationError(self.broker_url, auth)
        if refused:
            if refused.startswith("not allowed"):
                raise AuthenticationError(
                    self.broker_url, f"name {self._fqcn!r} {refused}", kind="name"
                )
            if refused == "taken":  # PROTOCOL.md: exactly this reason
                raise NameTakenError(self._fqcn, refused)
            raise CellError(f"the broker refused cell {self._fqcn!r}: {refused}")
        if handshake:
            raise AuthenticationError(
                self.broker_url,
                f"{handshake} (is broker_public_key this broker's key, and does it use CURVE?)",
                kind="handshake",
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
        self._pool.drain(min(self._drain, timeout / 2))
        self._io.stop(max(0.0, deadline - time.monotonic()))
        self._pool.stop(deadline, time.monotonic)
        self._waiters.fail_all(ReturnCode.COMM_ERROR, f"cell {self._fqcn} stopped")
        self._outbox.close()
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
        self._pool.register(channel, topic, cb, args, kwargs)

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
            pending.append(
                PendingRequest(self._waiters.forget, req_id, target, deadline, done_queue, secure)
            )
        if not self._io.registered:
            err = f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            self._log_failure(optional, "request on %s/%s failed: %s", channel, topic, err)
            for p in pending:
                p.resolve(make_reply(ReturnCode.COMM_ERROR, err))
            return pending
        self._waiters.add(pending)
        if not secure:
            self._outbox.put(batch)
            return pending
        try:
            for p, frames in zip(pending, batch, strict=True):
                p.plain = frames  # kept until the reply, to resend if the target restarted
                self._queue_sealed(p.target, frames, pending=p)
        except BaseException:
            for p in pending:
                self._waiters.forget(p.req_id)
            raise
        finally:
            self._outbox.wake()
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
        if not self._io.registered:
            self._log_failure(optional, "fire_and_forget on %s/%s: not connected", channel, topic)
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        failed: dict[str, str] = {}
        if secure:
            failed = self._handshake(tlist, optional)
            tlist = [t for t in tlist if t not in failed]
        encode = self._encode_secure if secure else self._encode
        batch = [encode(message, channel, topic, t, MessageType.FIRE, None) for t in tlist]
        if not secure:
            self._outbox.put(batch)
            return dict.fromkeys(tlist, ReturnCode.OK)
        try:
            for target, frames in zip(tlist, batch, strict=True):
                self._queue_sealed(target, frames)
        finally:
            self._outbox.wake()
        return {**dict.fromkeys(tlist, ReturnCode.OK), **failed}

    def list_cells(self, prefix: str = "", timeout: float = 5.0) -> list[str]:
        """Names of the live cells known to the broker, optionally under `prefix`.

        Raises:
            CellError: not connected, or no answer within `timeout`.
        """
        if prefix:
            _fqcn.validate(prefix)
        if not self._io.registered:
            raise CellError(
                f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            )
        token = str(next(self._req_ids)).encode()
        w = PendingRequest(None, 0, "broker", time.monotonic() + timeout)
        self._waiters.add_list(token, w)
        try:
            self._outbox.put([[wire.KIND_LIST, token, prefix.encode()]])
            if not w.wait(timeout) or w.reply is None:
                raise CellError(f"the broker did not list its cells within {timeout:g}s")
            names = w.reply.payload
            assert isinstance(names, list)
            return names
        finally:
            self._waiters.forget_list(token)

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
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> dict[str, Any]:
        """`msg`'s headers plus the routing headers every message carries."""
        headers = dict(msg.headers)
        headers[_H.CHANNEL] = channel
        headers[_H.TOPIC] = topic
        headers[_H.MSG_TYPE] = mtype
        headers[_H.ORIGIN] = self._fqcn
        headers[_H.DESTINATION] = target
        if req_id is not None:  # a reply echoes the request's req_id, whatever its type
            headers[_H.REQ_ID] = req_id
        return headers

    def _encode(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> list[Any]:
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers.pop(_H.SECURE, None)  # e.g. a received secure message sent on in plaintext
        return [wire.KIND_MSG, target.encode(), *wire.encode(Message(headers, msg.payload))]

    def _encode_secure(
        self, msg: Message, channel: str, topic: str, target: str, mtype: str, req_id: Any
    ) -> list[Any]:
        """The frames ``[headers, body, *buffers]`` of `msg`, marked secure, not yet sealed."""
        headers = self._headers(msg, channel, topic, target, mtype, req_id)
        headers[_H.SECURE] = True
        return wire.encode(Message(headers, msg.payload))

    def _queue_sealed(
        self,
        target: str,
        frames: list[Any],
        in_reply_to: bytes = b"",
        pending: PendingRequest | None = None,
    ) -> None:
        """Seal `frames` for `target` and queue them, in the order of their counters.

        A reply is bound to `in_reply_to` (the request's seal); a request records its
        own seal on `pending` before it can leave, so its reply is checked against it.
        """
        assert self._e2e is not None
        route = [wire.KIND_MSG, target.encode()]
        queue = self._outbox.queue

        def deliver(sealed: list[Any]) -> None:
            if pending is not None:
                pending.seal = seal_of(sealed)
            _hold_plain(sealed, frames)
            queue.append(route + sealed)

        self._e2e.outbound(target).seal(frames, deliver, in_reply_to=in_reply_to)

    def _resend(self, pending: PendingRequest) -> None:
        """Seal a waiting request again, for the session its target now has (I/O thread)."""
        frames = pending.plain
        if frames is None:
            return
        try:
            self._queue_sealed(pending.target, frames, pending=pending)
        except (SecureUnavailableError, ValueError) as exc:  # its key went away meanwhile
            self._waiters.forget(pending.req_id)
            pending.resolve(make_reply(ReturnCode.AUTHENTICATION_ERROR, f"not resent: {exc}"))
        self._outbox.wake()

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

    def _log_failure(self, optional: bool, msg: str, *args: Any) -> None:
        log.log(
            logging.DEBUG if optional else logging.WARNING, "cell %s: " + msg, self._fqcn, *args
        )

    def _drop(self, key: str, msg: str, *args: Any) -> None:
        """Count and log (rate-limited) a malformed message."""
        self.stats["dropped_malformed"] += 1
        self._rlog.log(logging.WARNING, key, "cell %s dropped a message: " + msg, self._fqcn, *args)

    def _send_reply(
        self, reply: Message, request: Message, origin: str, secure: bytes | bool
    ) -> None:
        """Send `reply` to `request`: in plaintext if `secure` is False, else sealed and
        bound to `secure`, the seal of the sealed request it answers."""
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
            self._outbox.put([frames])
            return
        try:
            self._queue_sealed(origin, frames, secure if isinstance(secure, bytes) else b"")
        except (SecureUnavailableError, ValueError) as exc:  # its key went away meanwhile
            log.error("cell %s: sealed reply to %s not sent: %s", self._fqcn, origin, exc)
        self._outbox.wake()

    # ---------------------------------------------------------------- internals: secure receive
