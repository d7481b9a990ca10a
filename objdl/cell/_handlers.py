"""A cell's request handlers: the registry, admission, running one request, and the pool.

How it works: :class:`Handlers` is protocol logic with no threads. The core looks up
the handler of each request it receives: an *inline* handler runs at once on the
thread that received it (the I/O thread); any other request is admitted (or answered
``service_unavailable`` when ``max_pending`` already wait) and queued for a
:class:`HandlerPool` thread. Either way :meth:`Handlers.run` opens it if it was
sealed, marks whether it was, calls the callback and sends the reply. So a slow pool
handler never stalls routing; an inline one, meant for cheap handlers, saves the two
thread hops of the pool.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from objdl._logutil import RateLimitedLog
from objdl.cell._pending import Sealed
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, make_reply

__all__ = ["HandlerPool", "Handlers", "RequestCallback"]

log = logging.getLogger("objdl.cell")

RequestCallback = Callable[..., "Message | None"]
"""A request handler, ``cb(request, *args, **kwargs)``: the reply, or None for an empty OK."""
SendReply = Callable[[Message, Message, str, "bytes | bool"], None]
OpenSealed = Callable[[Sealed, str], "Message | None"]

_H = MessageHeaderKey


class _Entry(NamedTuple):
    cb: RequestCallback
    args: tuple
    kwargs: dict
    inline: bool


class Handlers:
    """The callbacks registered on one cell, and the bound on requests waiting for them.

    Args:
        name: the cell's name (for log lines and error texts).
        max_pending: requests allowed to wait for a pool thread (beyond: refused at once).
        send_reply: ``send_reply(reply, request, origin, seal)``; `seal` is False for a
            plaintext reply, else the SEAL of the sealed request it answers.
        open_sealed: opens a sealed request (None: it must not run).
    """

    def __init__(
        self, name: str, max_pending: int, send_reply: SendReply, open_sealed: OpenSealed
    ) -> None:
        self._name = name
        self._max_pending = max_pending
        self._send_reply = send_reply
        self._open_sealed = open_sealed
        self._table: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)  # _pending fell to 0
        self._rlog = RateLimitedLog(log)

    def register(
        self,
        channel: str,
        topic: str,
        cb: RequestCallback,
        args: tuple,
        kwargs: dict,
        inline: bool = False,
    ) -> None:
        with self._lock:
            self._table[(channel, topic)] = _Entry(cb, args, kwargs, inline)

    def inline(self, channel: Any, topic: Any) -> bool:
        """True if (channel, topic) has a handler registered to run inline."""
        entry = self._table.get((channel, topic))  # one dict read: atomic under the GIL
        return entry is not None and entry.inline

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self, mtype: str, request: Message, origin: str) -> bool:
        """Take a request or fire for a pool thread, or answer ``service_unavailable``."""
        with self._lock:
            busy = self._pending >= self._max_pending
            if not busy:
                self._pending += 1
        if busy and mtype == MessageType.REQUEST:
            self._send_reply(
                make_reply(ReturnCode.SERVICE_UNAVAILABLE, f"cell {self._name} is overloaded"),
                request,
                origin,
                False,
            )
        return not busy

    def finished(self) -> None:
        """An admitted request has been run (or dropped): make room for the next one."""
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for the admitted requests to finish."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)

    def entry(self, channel: Any, topic: Any) -> _Entry | None:
        """The handler registered for (channel, topic), if any."""
        return self._table.get((channel, topic))

    def begin(
        self, job: Message | Sealed, origin: str
    ) -> tuple[Message, bytes | bool, _Entry | None] | None:
        """Open `job` if sealed and mark whether it was; None if it must not run.

        Returns the request, the seal its reply is bound to (False: plaintext) and its
        handler (None: there is none; :meth:`end` with :meth:`no_handler` answers it).
        """
        seal: bytes | bool = False
        if isinstance(job, Sealed):
            opened = self._open_sealed(job, origin)
            if opened is None:
                return None
            request, seal = opened, job.seal
        else:
            request = job
        # The one mark a handler can trust: True only for a request opened here.
        request.headers[_H.SECURE] = isinstance(job, Sealed)
        return (
            request,
            seal,
            self.entry(request.get_header(_H.CHANNEL), request.get_header(_H.TOPIC)),
        )

    def no_handler(self, request: Message, origin: str) -> Message:
        channel, topic = request.get_header(_H.CHANNEL), request.get_header(_H.TOPIC)
        self._rlog.log(
            logging.WARNING,
            "nohandler",
            "cell %s: no handler for %s/%s from %s",
            self._name,
            channel,
            topic,
            origin,
        )
        return make_reply(
            ReturnCode.INVALID_REQUEST,
            f"cell {self._name} has no handler for channel {channel!r} topic {topic!r}",
        )

    def reply_of(self, result: Any, request: Message) -> Message:
        """What a handler returned, as the reply (a wrong type is a ``process_exception``)."""
        if result is None:
            return make_reply(ReturnCode.OK)
        if isinstance(result, Message):
            if result.get_header(_H.RETURN_CODE) is None:
                result.set_header(_H.RETURN_CODE, ReturnCode.OK)
            return result
        channel, topic = request.get_header(_H.CHANNEL), request.get_header(_H.TOPIC)
        return self.raised(
            TypeError(
                f"handler for {channel}/{topic} returned {type(result).__name__}, "
                "expected a Message or None"
            ),
            request,
        )

    def raised(self, exc: BaseException, request: Message) -> Message:
        """The reply to a request whose handler raised `exc`."""
        channel, topic = request.get_header(_H.CHANNEL), request.get_header(_H.TOPIC)
        log.error("cell %s: handler for %s/%s raised", self._name, channel, topic, exc_info=exc)
        return make_reply(ReturnCode.PROCESS_EXCEPTION, f"{type(exc).__name__}: {exc}")

    def end(self, request: Message, origin: str, seal: bytes | bool, reply: Message) -> None:
        """Send `reply` if `request` was a request (a fire gets none)."""
        if request.get_header(_H.MSG_TYPE) == MessageType.REQUEST:
            self._send_reply(reply, request, origin, seal)

    def run(self, job: Message | Sealed, origin: str) -> None:
        """Open `job` if sealed, call its handler here and send the reply (if a request)."""
        begun = self.begin(job, origin)
        if begun is None:
            return
        request, seal, entry = begun
        if entry is None:
            reply = self.no_handler(request, origin)
        else:
            try:
                reply = self.reply_of(entry.cb(request, *entry.args, **entry.kwargs), request)
            except Exception as exc:
                reply = self.raised(exc, request)
        self.end(request, origin, seal, reply)


class HandlerPool:
    """`workers` threads that run the requests :class:`Handlers` admitted."""

    def __init__(self, name: str, workers: int, handlers: Handlers) -> None:
        self._name = name
        self._n = workers
        self._handlers = handlers
        self._jobs: queue.SimpleQueue[tuple[Message | Sealed, str] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._n):
            t = threading.Thread(
                target=self._worker_loop, name=f"objdl-{self._name}-handler-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def put(self, job: Message | Sealed, origin: str) -> None:
        """Queue an admitted request or fire."""
        self._jobs.put((job, origin))

    def signal_stop(self) -> None:
        """Tell every handler thread to end once the jobs queued before are done."""
        for _ in self._threads:
            self._jobs.put(None)

    def alive(self) -> bool:
        """True while a handler thread (other than the caller) still runs."""
        me = threading.current_thread()
        return any(t.is_alive() and t is not me for t in self._threads)

    def stop(self, deadline: float, now: Callable[[], float]) -> None:
        """End every handler thread (one that is the caller ends once its handler returns)."""
        self.signal_stop()
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(max(0.0, deadline - now()))
            if t.is_alive():
                log.warning("cell %s: handler thread %s still busy after stop", self._name, t.name)

    def _worker_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._handlers.run(*job)
            except Exception:  # never lose a worker thread
                log.exception("cell %s: unexpected error running a handler", self._name)
            finally:
                self._handlers.finished()
