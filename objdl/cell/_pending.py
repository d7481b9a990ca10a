"""Requests in flight: :class:`PendingRequest` and the registry the I/O thread routes by."""

from __future__ import annotations

import logging
import queue
import threading
import time
from _thread import allocate_lock as _thread_lock
from collections.abc import Callable
from typing import Any

from objdl.message import Message, ReturnCode, make_reply
from objdl.security._seal import seal_of

__all__ = ["OnDone", "PendingRequest", "Sealed", "Waiters"]

OnDone = Callable[["PendingRequest"], None]
"""Called once with a request when its answer is stored, on the thread that stored it
(the cell's I/O thread for replies and NACKs): it must be quick and never block."""


class PendingRequest:
    """A request in flight, from :meth:`Cell.request_async`.

    The reply arrives on the cell's I/O thread, which stores it, wakes waiters and,
    when a ``done_queue`` was given, puts this object on it, so one thread can keep
    many requests in flight and handle replies in the order they come.
    """

    __slots__ = (
        "_done",
        "_forget",
        "_once",
        "deadline",
        "done_queue",
        "first_seal",
        "on_done",
        "plain",
        "reply",
        "req_id",
        "resent",
        "seal",
        "secure",
        "target",
    )

    def __init__(
        self,
        forget: Callable[[int], None] | None,
        req_id: int,
        target: str,
        deadline: float,
        done_queue: queue.SimpleQueue[Any] | None = None,
        secure: bool = False,
        on_done: OnDone | None = None,
    ) -> None:
        self._forget = forget  # stops the routing of a late reply to this request
        self.secure = secure  # the reply must come sealed
        self.seal = b""  # the SEAL the request went out with: its reply must be bound to it
        self.plain: list[Any] | None = None  # the unsealed frames, to resend to a new session
        self.resent = False
        self.first_seal = b""  # after a resend: the seal of the try that was refused
        self.req_id = req_id
        self.target = target
        self.deadline = deadline
        self.done_queue = done_queue
        self.on_done = on_done
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
        self.plain = None
        self._done.release()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # a caller's hook must not break the thread that resolved
                logging.getLogger("objdl.cell").exception("on_done hook of a request failed")
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
        if self._forget is not None:
            self._forget(self.req_id)

    def result(self) -> Message:
        """The reply, or a ``timeout`` reply if none has come; stops the wait either way."""
        self.cancel()
        if self.reply is None:
            self.resolve(make_reply(ReturnCode.TIMEOUT, f"no reply from {self.target} in time"))
        assert self.reply is not None
        return self.reply


class Waiters:
    """The requests (and broker list queries) of one cell that wait for an answer.

    Callers register a waiter *before* sending and forget it in ``finally``; the I/O
    thread takes it out when the answer comes, so each is resolved at most once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[int, PendingRequest] = {}
        self._lists: dict[bytes, PendingRequest] = {}

    def add(self, pending: list[PendingRequest]) -> None:
        with self._lock:
            for p in pending:
                self._requests[p.req_id] = p

    def forget(self, req_id: int) -> None:
        with self._lock:
            self._requests.pop(req_id, None)

    def waiting(self, req_id: int) -> bool:
        """True while request `req_id` waits for its reply."""
        return req_id in self._requests

    def pop(self, req_id: Any) -> PendingRequest | None:
        """Take out the request `req_id` (any value from the network), if it waits."""
        if not isinstance(req_id, int):
            return None
        with self._lock:
            return self._requests.pop(req_id, None)

    def pop_from(self, req_id: Any, origin: str) -> PendingRequest | None:
        """Take out the request `req_id` if it waits for a reply from `origin`."""
        if not isinstance(req_id, int):
            return None
        with self._lock:
            w = self._requests.get(req_id)
            if w is None or w.target != origin:
                return None
            del self._requests[req_id]
            return w

    def get_from(self, req_id: Any, origin: str) -> PendingRequest | None:
        """The request `req_id` if it waits for `origin`, left in place."""
        if not isinstance(req_id, int):
            return None
        with self._lock:
            w = self._requests.get(req_id)
        return w if w is not None and w.target == origin else None

    def add_list(self, token: bytes, w: PendingRequest) -> None:
        with self._lock:
            self._lists[token] = w

    def get_list(self, token: bytes) -> PendingRequest | None:
        with self._lock:
            return self._lists.get(token)

    def forget_list(self, token: bytes) -> None:
        with self._lock:
            self._lists.pop(token, None)

    def fail_all(self, rc: str, error: str, keep: frozenset[int] | set[int] = frozenset()) -> None:
        """Answer every waiter with `rc` (the connection was lost, or the cell stopped),
        except the requests in `keep` (sent another way: over a direct link)."""
        with self._lock:
            waiters = [w for k, w in self._requests.items() if k not in keep]
            waiters += self._lists.values()
        for w in waiters:
            w.resolve(make_reply(rc, error))


class Sealed:
    """A sealed request or fire, queued for a handler thread to open."""

    __slots__ = ("frames", "headers")

    def __init__(self, frames: list[Any], headers: dict[str, Any]) -> None:
        self.frames = frames
        self.headers = headers

    @property
    def seal(self) -> bytes:
        """The SEAL it came with (what a sealed reply to it is bound to); b"" if none."""
        return seal_of(self.frames)
