"""A cell of a :class:`~objdl.testing.FakeNetwork`: the real cell's API and codes, no sockets.

How it works: sending checks its arguments as :class:`~objdl.cell.Cell` does, builds
the routing headers the real cell builds, encodes with :func:`objdl.wire.encode` and
routes the frames through the network. A request waits in this cell's table of
:class:`~objdl.cell.PendingRequest` (registered before it is sent, removed by the
reply, a NACK, ``cancel()`` or ``result()``); blocking calls wait on the network's
clock. A request that arrives runs its handler at once, on the delivering thread,
and the reply is routed back the same way; the ``SECURE`` header a handler sees is
True only when the request was sent with ``secure=True``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from objdl import fqcn as _fqcn
from objdl import wire
from objdl.cell import PendingRequest, RequestCallback
from objdl.cell._core import new_request_id
from objdl.cell._pending import OnDone
from objdl.errors import CellError, NameTakenError
from objdl.message import (
    Message,
    MessageHeaderKey,
    MessageType,
    ReturnCode,
    Signal,
    make_reply,
)
from objdl.security import SecureUnavailableError
from objdl.testing._handlers import Handlers, no_keys_reply, unsealed

if TYPE_CHECKING:
    from objdl.testing._clock import FakeClock
    from objdl.testing._network import Envelope, FakeNetwork

__all__ = ["FakeCell"]

log = logging.getLogger("objdl.testing")

_H = MessageHeaderKey
_NACK_RC = {
    wire.NACK_UNREACHABLE: ReturnCode.TARGET_UNREACHABLE,
    wire.NACK_TOO_BIG: ReturnCode.MSG_TOO_BIG,
}


class FakeCell:
    """A cell on a :class:`~objdl.testing.FakeNetwork`; make it with ``net.cell(name)``.

    It has the methods of :class:`~objdl.cell.Cell` (so it is a
    :class:`~objdl.cell.CellLike`) and a ``clock`` attribute, the network's clock,
    which the downloader's owner side keeps time by.

    Args:
        net: its network.
        name: its name, validated as a real cell's is.
        max_pending: handlers allowed to run on it at once; a request beyond that is
            answered ``service_unavailable`` (the real cell counts queued requests
            too; here nothing queues).
        keys: whether it has end-to-end keys: without, ``secure=True`` sends raise
            SecureUnavailableError and secure requests to it are refused with
            ``authentication_error`` (``auth_reason`` ``no_keys``), as a real cell
            without ``peer_keys`` does.
        drain_timeout: at :meth:`stop`, real seconds to wait for handlers running on
            other threads to finish, so their replies still go out.
    """

    def __init__(
        self,
        net: FakeNetwork,
        name: str,
        *,
        max_pending: int = 1024,
        keys: bool = True,
        drain_timeout: float = 1.0,
    ) -> None:
        self._fqcn = _fqcn.validate(name)
        self.network = net
        self.clock: FakeClock = net.clock
        self._handlers = Handlers(self._fqcn, max_pending)
        self._keys = keys
        self._drain = drain_timeout
        self._lock = threading.Lock()
        self._waiting: dict[int, PendingRequest] = {}
        self._started = False
        self._stopped = False
        self._killed = False
        self._connected = False
        self._stop_cbs: list[Callable[[], None]] = []
        self.stats: dict[str, int] = dict.fromkeys(
            ("sent", "received", "dropped_late_reply", "rejected_secure"), 0
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def fqcn(self) -> str:
        return self._fqcn

    def get_fqcn(self) -> str:
        return self._fqcn

    @property
    def is_connected(self) -> bool:
        """True while started, not stopped, killed or partitioned."""
        return self._connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds of the network's clock to be connected."""
        if not self._started or self._stopped:
            return False
        return self.clock.wait_for(lambda: self._connected, self.clock() + timeout)

    def start(self, timeout: float | None = None) -> None:
        """Join the network.

        Raises:
            CellError: already started (make a new cell, as with the real one).
            NameTakenError: a live cell already has this name.
        """
        with self._lock:
            if self._started:
                raise CellError(f"cell {self._fqcn!r} was already started; make a new cell")
            self._started = True
        if not self.network._register(self):
            self._stopped = True
            raise NameTakenError(self._fqcn, "taken")
        self._set_connected(True, "")

    def stop(self, timeout: float = 5.0) -> None:
        """Leave the network: requests waiting get ``comm_error``, stop callbacks run.

        Idempotent. Handlers running on other threads get `drain_timeout` to finish.
        """
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        self._handlers.drain(min(self._drain, timeout / 2))
        self.network._unregister(self)
        self._set_connected(False, f"cell {self._fqcn} stopped")
        with self._lock:
            cbs, self._stop_cbs = self._stop_cbs, []
        for cb in cbs:
            try:
                cb()
            except Exception:
                log.exception("cell %s: stop callback failed", self._fqcn)

    def __enter__(self) -> FakeCell:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_stop_callback(self, cb: Callable[[], None]) -> None:
        """Call `cb()` when the cell stops (a kill does not; a later stop() does)."""
        with self._lock:
            self._stop_cbs.append(cb)

    def _set_connected(self, up: bool, why: str) -> None:
        with self._lock:
            if up and (self._stopped or self._killed):
                return
            self._connected = up
            waiting = [] if up else list(self._waiting.values())
            if not up:
                self._waiting.clear()
        for p in waiting:
            p.resolve(make_reply(ReturnCode.COMM_ERROR, why))
        self.clock.notify()

    def _kill(self) -> None:
        self._killed = True
        self._set_connected(False, f"cell {self._fqcn} was killed")

    def __repr__(self) -> str:
        state = "connected" if self._connected else "not connected"
        return f"FakeCell({self._fqcn!r}, {state})"

    # ---------------------------------------------------------------- handlers

    def register_request_cb(
        self, channel: str, topic: str, cb: RequestCallback, *args: Any, **kwargs: Any
    ) -> None:
        """Serve requests on (channel, topic) with ``cb(request, *args, **kwargs)``."""
        if not callable(cb):
            raise TypeError(f"cb must be callable, got {type(cb).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be str")
        self._handlers.register(channel, topic, cb, args, kwargs)

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
        """Send `request` and wait (on the clock) for its reply; codes as the real cell's."""
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
        """Send `request` to every target; wait up to `timeout` clock seconds for all."""
        pending = self._submit(channel, topic, targets, request, timeout, secure, optional, None)
        deadline = self.clock() + timeout
        try:
            self.clock.wait_for(
                lambda: (
                    all(p.done() for p in pending)
                    or (abort_signal is not None and abort_signal.triggered)
                ),
                deadline,
                poll=abort_signal is not None,
            )
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
                self._log_failure(optional, "request %s/%s to %s: %s", channel, topic, p.target, rc)
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
        on_done: OnDone | None = None,
    ) -> PendingRequest:
        """Send `request` and return its pending request at once (the reply may already
        be on it: delivery is synchronous, and so is `on_done`). As with the real cell,
        nothing resolves it at its deadline; its ``deadline`` is on the network's clock."""
        return self._submit(
            channel, topic, target, request, timeout, secure, optional, done_queue, on_done
        )[0]

    def fire_and_forget(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        message: Message,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, str]:
        """Send `message` without waiting; ``ok`` per target handed to the network.

        As with the real cell, ``ok`` does not mean it arrived. A secure fire to a
        cell that is not connected returns ``target_unreachable``, to one without
        keys ``authentication_error`` (the real cell learns both from its
        first-contact handshake).
        """
        tlist = self._check_send(channel, topic, targets, message, secure)
        if not self._connected:
            self._log_failure(optional, "fire_and_forget on %s/%s: not connected", channel, topic)
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        out: dict[str, str] = {}
        for t in tlist:
            frames = self._encode(message, channel, topic, t, MessageType.FIRE, None, secure)
            peer = self.network.get(t) if secure else None
            if secure and (peer is None or not peer.is_connected):
                out[t] = ReturnCode.TARGET_UNREACHABLE
                continue
            if peer is not None and not peer._keys:
                out[t] = ReturnCode.AUTHENTICATION_ERROR
                continue
            self.stats["sent"] += 1
            self.network._route(self, MessageType.FIRE, t, frames, secure, None)
            out[t] = ReturnCode.OK
        return out

    def list_cells(self, prefix: str = "", timeout: float = 5.0) -> list[str]:
        """Names of the connected cells, optionally under `prefix`.

        Raises:
            CellError: this cell is not connected.
        """
        if prefix:
            _fqcn.validate(prefix)
        if not self._connected:
            raise CellError(f"cell {self._fqcn} is not connected to the fake network")
        return self.network.cells(prefix)

    # ---------------------------------------------------------------- internals: sending

    def _check_send(
        self, channel: str, topic: str, targets: Iterable[str] | str, msg: Message, secure: bool
    ) -> list[str]:
        if secure and not self._keys:
            raise SecureUnavailableError(
                f"secure=True needs end-to-end keys, which cell {self._fqcn!r} does not have "
                "(it was made with keys=False); refusing rather than sending plaintext"
            )
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
            _fqcn.validate(t)
        if len(set(tlist)) != len(tlist):
            raise ValueError(f"duplicate targets in {tlist}")
        return tlist

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
        on_done: OnDone | None = None,
    ) -> list[PendingRequest]:
        tlist = self._check_send(channel, topic, targets, request, secure)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        deadline = self.clock() + timeout
        batch = []
        for target in tlist:
            req_id = new_request_id()  # random, as the real cell's
            frames = self._encode(
                request, channel, topic, target, MessageType.REQUEST, req_id, secure
            )
            p = PendingRequest(self._forget, req_id, target, deadline, done_queue, secure, on_done)
            batch.append((p, frames))
        pending = [p for p, _ in batch]
        with self._lock:
            connected = self._connected
            if connected:
                for p in pending:  # before sending: a reply may come back at once
                    self._waiting[p.req_id] = p
        if not connected:
            err = f"cell {self._fqcn} is not connected to the fake network"
            self._log_failure(optional, "request on %s/%s failed: %s", channel, topic, err)
            for p in pending:
                p.resolve(make_reply(ReturnCode.COMM_ERROR, err))
            return pending
        for p, frames in batch:
            self.stats["sent"] += 1
            nack = self._nacker(p.req_id, p.target)
            self.network._route(self, MessageType.REQUEST, p.target, frames, secure, nack)
        return pending

    def _encode(
        self,
        msg: Message,
        channel: str,
        topic: str,
        target: str,
        mtype: str,
        req_id: Any,
        secure: bool,
    ) -> list[Any]:
        """`msg` with the routing headers the real cell adds, as ``wire.encode`` frames."""
        headers = dict(msg.headers)
        headers[_H.CHANNEL] = channel
        headers[_H.TOPIC] = topic
        headers[_H.MSG_TYPE] = mtype
        headers[_H.ORIGIN] = self._fqcn
        headers[_H.DESTINATION] = target
        if req_id is not None:
            headers[_H.REQ_ID] = req_id
        if secure:
            headers[_H.SECURE] = True
        else:
            headers.pop(_H.SECURE, None)
        return wire.encode(Message(headers, msg.payload))

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._waiting.pop(req_id, None)

    def _nacker(self, req_id: int, target: str) -> Callable[[bytes], None]:
        def nack(reason: bytes) -> None:
            with self._lock:
                p = self._waiting.pop(req_id, None)
            if p is not None:
                text = reason.decode("ascii", "replace")
                rc = _NACK_RC.get(reason, ReturnCode.COMM_ERROR)
                p.resolve(make_reply(rc, f"broker could not deliver to {target}: {text}"))
                self.clock.notify()

        return nack

    def _log_failure(self, optional: bool, msg: str, *args: Any) -> None:
        log.log(
            logging.DEBUG if optional else logging.WARNING, "cell %s: " + msg, self._fqcn, *args
        )

    # ---------------------------------------------------------------- internals: receiving

    def _receive(self, env: Envelope) -> None:
        """A message the network delivers to this cell (on the delivering thread)."""
        self.stats["received"] += 1
        if env.kind == MessageType.REPLY:
            self._on_reply(env)
        elif env.secure and not self._keys:
            self.stats["rejected_secure"] += 1
            if env.kind == MessageType.REQUEST:
                self._send_reply(no_keys_reply(self._fqcn), env.message, env.origin, False)
        else:
            self._on_request(env)

    def _on_reply(self, env: Envelope) -> None:
        req_id = env.req_id
        p = None
        if isinstance(req_id, int):
            with self._lock:
                p = self._waiting.get(req_id)
                if p is not None and p.target == env.origin:
                    del self._waiting[req_id]
                else:
                    p = None
        if p is None:
            self.stats["dropped_late_reply"] += 1
            return
        # A plaintext answer to a sealed request passes on its error code only.
        p.resolve(unsealed(env.message, env.origin) if p.secure and not env.secure else env.message)

    def _on_request(self, env: Envelope) -> None:
        request = env.message
        if not self._handlers.admit():
            if env.kind == MessageType.REQUEST:
                busy = make_reply(
                    ReturnCode.SERVICE_UNAVAILABLE, f"cell {self._fqcn} is overloaded"
                )
                self._send_reply(busy, request, env.origin, False)
            return
        try:
            # The one mark a handler can trust: True only for a request sent secure.
            request.headers[_H.SECURE] = env.secure
            reply = self._handlers.run(request, env.channel, env.topic, env.origin)
        finally:
            self._handlers.done()
        if env.kind == MessageType.REQUEST:
            self._send_reply(reply, request, env.origin, env.secure)

    def _send_reply(self, reply: Message, request: Message, origin: str, secure: bool) -> None:
        if not self._connected:
            return  # stopped, killed or cut off while the handler ran: the reply is lost
        channel = request.get_header(_H.CHANNEL) or ""
        topic = request.get_header(_H.TOPIC) or ""
        req_id = request.get_header(_H.REQ_ID)
        try:
            frames = self._encode(reply, channel, topic, origin, MessageType.REPLY, req_id, secure)
        except (TypeError, ValueError) as exc:
            err = f"reply could not be encoded: {exc}"
            log.error("cell %s: handler for %s/%s: %s", self._fqcn, channel, topic, err)
            frames = self._encode(
                make_reply(ReturnCode.PROCESS_EXCEPTION, err),
                channel, topic, origin, MessageType.REPLY, req_id, secure,
            )  # fmt: skip
        self.stats["sent"] += 1
        self.network._route(self, MessageType.REPLY, origin, frames, secure, None)
