"""The request handlers of a cell: a registry and a bounded pool of threads that run them.

The I/O thread only admits a request (or answers ``service_unavailable`` when too
many wait) and queues it; a handler thread opens it if it was sealed, runs the
callback registered for its channel and topic, and sends the reply. A slow handler
therefore never stalls the routing of other messages.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from objdl._logutil import RateLimitedLog
from objdl.cell._pending import Sealed
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, make_reply

__all__ = ["HandlerPool", "RequestCallback"]

log = logging.getLogger("objdl.cell")

RequestCallback = Callable[..., "Message | None"]
"""A request handler, ``cb(request, *args, **kwargs)``: the reply, or None for an empty OK."""
SendReply = Callable[[Message, Message, str, "bytes | bool"], None]
OpenSealed = Callable[[Sealed, str], "Message | None"]

_H = MessageHeaderKey


class HandlerPool:
    """Runs the handlers registered on one cell on `workers` threads.

    Args:
        name: the cell's name (for thread names and log lines).
        workers: handler threads.
        max_pending: requests allowed to wait for a thread (beyond: refused at once).
        send_reply: ``send_reply(reply, request, origin, seal)``; `seal` is False for a
            plaintext reply, else the SEAL of the sealed request it answers.
        open_sealed: opens a sealed request (None: it must not run).
    """

    def __init__(
        self,
        name: str,
        workers: int,
        max_pending: int,
        send_reply: SendReply,
        open_sealed: OpenSealed,
    ) -> None:
        self._name = name
        self._n = workers
        self._max_pending = max_pending
        self._send_reply = send_reply
        self._open_sealed = open_sealed
        self._handlers: dict[tuple[str, str], tuple[RequestCallback, tuple, dict]] = {}
        self._handlers_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Message | Sealed, str] | None] = queue.SimpleQueue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._idle = threading.Condition(self._pending_lock)  # _pending fell to 0
        self._threads: list[threading.Thread] = []
        self._rlog = RateLimitedLog(log)

    def register(
        self, channel: str, topic: str, cb: RequestCallback, args: tuple, kwargs: dict
    ) -> None:
        with self._handlers_lock:
            self._handlers[(channel, topic)] = (cb, args, kwargs)

    def start(self) -> None:
        for i in range(self._n):
            t = threading.Thread(
                target=self._worker_loop, name=f"objdl-{self._name}-handler-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def admit(self, mtype: str, request: Message, origin: str) -> bool:
        """Take a request or fire for a handler thread, or answer ``service_unavailable``."""
        with self._pending_lock:
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

    def put(self, job: Message | Sealed, origin: str) -> None:
        """Queue an admitted request or fire."""
        self._jobs.put((job, origin))

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for the handlers already running or queued to finish."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, deadline: float, now: Callable[[], float]) -> None:
        """End every handler thread (one that is the caller ends once its handler returns)."""
        for _ in self._threads:
            self._jobs.put(None)
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
                self._run(*job)
            except Exception:  # never lose a worker thread
                log.exception("cell %s: unexpected error running a handler", self._name)
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _run(self, job: Message | Sealed, origin: str) -> None:
        seal: bytes | bool = False  # or the request's seal: the reply goes sealed, bound to it
        if isinstance(job, Sealed):
            opened = self._open_sealed(job, origin)
            if opened is None:
                return
            request, seal = opened, job.seal
        else:
            request = job
        # The one mark a handler can trust: True only for a request opened here.
        request.headers[_H.SECURE] = isinstance(job, Sealed)
        channel = request.get_header(_H.CHANNEL)
        topic = request.get_header(_H.TOPIC)
        mtype = request.get_header(_H.MSG_TYPE)
        with self._handlers_lock:
            entry = self._handlers.get((channel, topic))
        if entry is None:
            reply = make_reply(
                ReturnCode.INVALID_REQUEST,
                f"cell {self._name} has no handler for channel {channel!r} topic {topic!r}",
            )
            self._rlog.log(
                logging.WARNING,
                "nohandler",
                "cell %s: no handler for %s/%s from %s",
                self._name,
                channel,
                topic,
                origin,
            )
        else:
            reply = self._call(entry, request, channel, topic)
        if mtype == MessageType.REQUEST:
            self._send_reply(reply, request, origin, seal)

    def _call(
        self, entry: tuple[RequestCallback, tuple, dict], request: Message, channel: Any, topic: Any
    ) -> Message:
        cb, args, kwargs = entry
        try:
            result = cb(request, *args, **kwargs)
            if result is None:
                return make_reply(ReturnCode.OK)
            if isinstance(result, Message):
                if result.get_header(_H.RETURN_CODE) is None:
                    result.set_header(_H.RETURN_CODE, ReturnCode.OK)
                return result
            raise TypeError(
                f"handler for {channel}/{topic} returned {type(result).__name__}, "
                "expected a Message or None"
            )
        except Exception as exc:
            log.exception("cell %s: handler for %s/%s raised", self._name, channel, topic)
            return make_reply(ReturnCode.PROCESS_EXCEPTION, f"{type(exc).__name__}: {exc}")
