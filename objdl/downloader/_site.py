"""The site's side: ``download_object``, with retries and, for sized objects, a window.

How it works: every request goes through :func:`_Requester`, which retries a request
that timed out or could not reach the owner (same state, growing back-off, never
past the overall deadline) and turns everything else into a failure reason. A plain
:class:`Consumer` gets the seed's exchange, one request at a time, and the seed's
types: ``bytes``, not views of the received frames, unless it sets ``accepts_views``. A
:class:`SizedConsumer` gets a sliding window of chunk requests in flight, chunks
written where they belong as they arrive and hashed in order: its rules live in the
sans-I/O :class:`~objdl.downloader._window.DownloadWindow`, and the shell that sends,
writes and waits for it in :mod:`objdl.downloader._windowed`. Every download ends in
exactly one call of ``download_completed`` or ``download_failed``.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from collections.abc import Callable
from typing import Any

from objdl.cell import CellLike, PendingRequest, check_cell
from objdl.downloader._defs import (
    OBJ_DOWNLOADER_CHANNEL,
    OBJ_DOWNLOADER_TOPIC,
    Consumer,
    ProduceRC,
    RetryPolicy,
    _PropKey,
)
from objdl.downloader._reply import BadReply, reply_error, reply_payload, request_failed
from objdl.downloader._window import RETRYABLE
from objdl.downloader._window import Failed as _Failed
from objdl.downloader._windowed import run_window
from objdl.downloader.sized import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_WINDOW,
    MAX_CHUNK_SIZE,
    SizedConsumer,
)
from objdl.message import Message, Signal

__all__ = ["download_object"]

log = logging.getLogger("objdl.downloader")

_ABORT_POLL = 0.05


class _Progress:
    """Rate-limited progress reports for one download."""

    def __init__(self, ref_id: str, cb: Callable[..., Any] | None, interval: float) -> None:
        self.ref_id = ref_id
        self.cb = cb
        self.interval = interval
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._next = 0.0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.cb is not None and time.monotonic() >= self._next:
            self.report()

    def report(self, final: bool = False) -> None:
        if self.cb is None:
            return
        now = time.monotonic()
        self._next = now + self.interval
        rate = self.done / (now - self.started) if now > self.started else 0.0
        try:
            self.cb(self.ref_id, self.done, self.total, rate)
        except Exception:
            log.exception("progress callback raised; ignored")


class _Requester:
    """Sends download requests for one ref, with retries and deadlines."""

    def __init__(
        self,
        cell: CellLike,
        owner: str,
        ref_id: str,
        per_request_timeout: float,
        retry: RetryPolicy,
        deadline: float | None,
        abort: Signal | None,
        secure: bool,
        optional: bool,
    ) -> None:
        self.cell = cell
        self.owner = owner
        self.ref_id = ref_id
        self.timeout = per_request_timeout
        self.retry = retry
        self.deadline = deadline
        self.abort = abort
        self.secure = secure
        self.optional = optional
        self.started = time.monotonic()
        self.retries = 0
        self.progress = _Progress(ref_id, None, 1.0)

    def cancel(self, reason: str) -> None:
        """Tell the owner this site gave up (no reply expected; best effort)."""
        msg = Message({}, {_PropKey.REF_ID: self.ref_id, _PropKey.CANCEL: reason})
        try:
            self.cell.fire_and_forget(
                OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, self.owner, msg, optional=True
            )
        except Exception as exc:  # the cell may be stopping; the owner times out instead
            log.debug("could not tell %s about the cancel: %s", self.owner, exc)

    def check(self) -> None:
        """Raise _Failed if the caller aborted or the overall deadline passed."""
        if self.abort is not None and self.abort.triggered:
            raise _Failed(f"download aborted after {self.elapsed()}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Failed(f"overall timeout: download not finished after {self.elapsed()}")

    def await_broker(self) -> None:
        """If the cell lost the broker, wait for it to reconnect, within the retry budget.

        A broker restart then costs a wait instead of burning every try at once. The
        budget for an outage is ``tries x per_request_timeout`` (and the overall
        deadline, and the abort signal). A direct link up to the owner needs no broker.
        """
        if self.reachable():
            return
        budget = self.retry.tries * self.timeout
        end = time.monotonic() + budget
        if self.deadline is not None:
            end = min(end, self.deadline)
        log.info(
            "download %s: waiting up to %.1fs for the broker to come back", self.ref_id, budget
        )
        while not self.cell.wait_connected(min(_ABORT_POLL, max(0.0, end - time.monotonic()))):
            if self.reachable():
                return
            self.check()
            if time.monotonic() >= end:
                raise _Failed(
                    f"comm_error: no broker connection for {budget:g}s (longer than the retry "
                    f"budget of tries x per_request_timeout) after {self.elapsed()}"
                )

    def reachable(self) -> bool:
        """The owner can be asked now: through the broker, or over a direct link."""
        if self.cell.is_connected:
            return True
        link_state = getattr(self.cell, "link_state", None)  # (a Cell; CellLike may lack it)
        return link_state is not None and link_state(self.owner) == "up"

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.2f}s"

    def message(self, state: dict | None) -> Message:
        payload: dict[str, Any] = {_PropKey.REF_ID: self.ref_id}
        if state is not None:
            payload[_PropKey.STATE] = state
        return Message({}, payload)

    def request_timeout(self) -> float:
        if self.deadline is None:
            return self.timeout
        return max(0.001, min(self.timeout, self.deadline - time.monotonic()))

    def submit(
        self, state: dict | None, done: queue.SimpleQueue[Any], timeout: float
    ) -> PendingRequest:
        return self.cell.request_async(
            OBJ_DOWNLOADER_CHANNEL,
            self.owner,
            OBJ_DOWNLOADER_TOPIC,
            self.message(state),
            timeout,
            done_queue=done,
            secure=self.secure,
            optional=self.optional,
        )

    def call(self, state: dict | None) -> dict:
        """One request, retried as the policy allows; the reply payload (status checked)."""
        attempt = 1
        while True:
            self.check()
            self.await_broker()
            reply = self.cell.send_request(
                OBJ_DOWNLOADER_CHANNEL,
                self.owner,
                OBJ_DOWNLOADER_TOPIC,
                self.message(state),
                self.request_timeout(),
                secure=self.secure,
                optional=self.optional,
                abort_signal=self.abort,
            )
            delay = self.judge(reply, attempt)
            if delay is None:
                return self.payload(reply)
            self.sleep(delay)
            attempt += 1

    def judge(self, reply: Message, attempt: int) -> float | None:
        """None if the reply is an answer; else the delay before retrying it."""
        bad = reply_error(reply)
        if bad is None:
            return None
        self.check()
        rc, error = bad
        if rc in RETRYABLE and attempt < self.retry.tries:
            self.retries += 1
            delay = self.retry.delay(attempt + 1)
            log.log(
                logging.DEBUG if self.optional else logging.INFO,
                "download %s from %s: %s (%s); retry %d of %d in %.2fs",
                self.ref_id, self.owner, rc, error, attempt, self.retry.tries - 1, delay,
            )  # fmt: skip
            return delay
        raise _Failed(request_failed(self.owner, attempt, self.elapsed(), rc, error))

    def payload(self, reply: Message) -> dict:
        try:
            return reply_payload(reply, self.owner, self.elapsed())
        except BadReply as exc:
            raise _Failed(str(exc)) from None

    def sleep(self, delay: float) -> None:
        end = time.monotonic() + delay
        if self.deadline is not None:
            end = min(end, self.deadline)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.abort is not None:
                if self.abort.wait(min(left, _ABORT_POLL)):
                    self.check()
            else:
                time.sleep(left)


def download_object(
    from_fqcn: str,
    ref_id: str,
    per_request_timeout: float,
    cell: CellLike,
    consumer: Consumer,
    secure: bool = False,
    optional: bool = False,
    abort_signal: Signal | None = None,
    *,
    tries: int = RetryPolicy.tries,
    backoff: float = RetryPolicy.backoff,
    backoff_max: float = RetryPolicy.backoff_max,
    overall_timeout: float | None = None,
    window: int = DEFAULT_WINDOW,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress_cb: Callable[[str, int, int | None, float], Any] | None = None,
    progress_interval: float = 0.5,
    max_size: int | None = None,
) -> None:
    """Download a large object from its owner into `consumer`.

    Returns when the download has ended, after exactly one call of
    ``consumer.download_completed(ref_id)`` or ``consumer.download_failed(ref_id,
    reason)``; remote trouble never raises.

    Args:
        from_fqcn: the owner's cell name.
        ref_id: the object's ref id, as the owner handed it out.
        per_request_timeout: seconds to wait for each reply.
        cell: the (started) cell to talk through.
        consumer: takes the data; a :class:`SizedConsumer` gets a window of requests.
            A plain Consumer's ``consume`` gets ``bytes``, as in the seed, unless its
            class sets ``accepts_views = True`` (read-only memoryviews, no copy).
        secure: as for :meth:`Cell.send_request`.
        optional: as for :meth:`Cell.send_request`.
        abort_signal: as for :meth:`Cell.send_request`.
        tries: tries of a request that timed out or could not reach the owner (see
            :class:`RetryPolicy`).
        backoff: seconds before the first retry; doubled for each further one.
        backoff_max: the most any single wait grows to.
        overall_timeout: seconds for the whole download (None: no limit), so a peer
            that trickles data cannot keep it going forever.
        window: chunk requests kept in flight (sized objects only).
        chunk_size: bytes asked for per request (sized objects only).
        progress_cb: ``progress_cb(ref_id, bytes_done, bytes_total, rate)``, at most
            every `progress_interval` seconds and once at the end (bytes_total is
            None when the object's size is not known up front).
        max_size: the largest object accepted, in bytes (None: no limit; sized
            objects only). An object the owner describes as larger fails at once,
            after the first reply and before any other chunk is asked for.

    Every field of the owner's replies is checked (see ``objdl.downloader._reply``):
    a reply of the wrong type or value ends the download in ``download_failed``
    with a reason, never in an exception.

    If `abort_signal` fires, the owner is told the site cancelled (best effort).
    """
    if not isinstance(consumer, Consumer):
        raise TypeError(f"consumer must be a Consumer, got {type(consumer).__name__}")
    cell = check_cell(cell)  # an asyncio cell: its blocking face
    if not isinstance(ref_id, str) or not ref_id:
        raise ValueError(f"ref_id must be a non-empty str, got {ref_id!r}")
    if per_request_timeout <= 0:
        raise ValueError(f"per_request_timeout must be positive, got {per_request_timeout!r}")
    if window < 1 or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"need window >= 1 and 1 <= chunk_size <= {MAX_CHUNK_SIZE}")
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
    ):
        raise ValueError(f"max_size must be None or an int >= 0, got {max_size!r}")
    retry = RetryPolicy(tries, backoff, backoff_max)
    deadline = None if overall_timeout is None else time.monotonic() + overall_timeout
    req = _Requester(
        cell,
        from_fqcn,
        ref_id,
        per_request_timeout,
        retry,
        deadline,
        abort_signal,
        secure,
        optional,
    )
    req.progress = _Progress(ref_id, progress_cb, progress_interval)
    try:
        if isinstance(consumer, SizedConsumer):
            _sized(req, consumer, window, chunk_size, max_size)
        else:
            _seed_exchange(req, consumer)
    except _Failed as exc:
        if abort_signal is not None and abort_signal.triggered:
            req.cancel(str(exc))
        _end(consumer.download_failed, ref_id, str(exc))
    else:
        req.progress.report(final=True)
        _end(consumer.download_completed, ref_id)


def _sized(
    req: _Requester, consumer: SizedConsumer, window: int, chunk: int, max_size: int | None
) -> None:
    """The windowed download of a sized object; raise _Failed if it failed."""
    end = run_window(req, consumer, window, chunk, max_size)
    if end.failed is not None:
        if end.failed.cancel_owner:  # (a description refused: the owner learns it at once)
            req.cancel(end.failed.reason)
        if end.failed.reject:
            _end(consumer.data_rejected, req.ref_id)
        raise _Failed(end.failed.reason)
    if end.note:
        log.warning("download %s complete, but the owner was not told: %s", req.ref_id, end.note)


def _end(cb: Any, *args: Any) -> None:
    try:
        cb(*args)
    except Exception:
        log.exception("consumer's %s raised; ignored", getattr(cb, "__name__", cb))


def _consume(consumer: Consumer, ref_id: str, state: Any, data: Any) -> dict:
    try:
        new_state = consumer.consume(ref_id, state, data)
    except Exception as exc:
        raise _Failed(f"exception when consuming data: {type(exc).__name__}: {exc}") from exc
    if not isinstance(new_state, dict):
        raise _Failed(
            f"consumer error: new_state should be dict but got {type(new_state).__name__}"
        )
    return new_state


def _seed_exchange(req: _Requester, consumer: Consumer) -> None:
    """The seed's exchange: one request, one reply, consume, repeat until EOF.

    Unless the consumer sets ``accepts_views``, the reply's data and state are first
    turned into what the seed handed a consumer (see :func:`_as_seed_values`).
    """
    views = bool(consumer.accepts_views)
    state: dict | None = None
    while True:
        payload = req.call(state)
        if payload[_PropKey.STATUS] == ProduceRC.EOF:
            return
        data, got_state = payload.get(_PropKey.DATA), payload.get(_PropKey.STATE)
        if not views:
            data, got_state = _as_seed_values(data), _as_seed_values(got_state)
        state = _consume(consumer, req.ref_id, got_state, data)
        req.check()


_PLAIN = frozenset({bytes, str, int, float, bool, type(None)})


def _as_seed_values(value: Any) -> Any:
    """`value` as the seed's consumers got it: ``bytes`` where the wire gave a view.

    The wire hands out bytes-likes of 64 KiB or more as read-only memoryviews over
    the received frames, and numpy arrays as read-only views; seed-era code expects
    ``bytes`` (``isinstance(data, bytes)``, libraries that take only bytes) and
    writable arrays. Each is copied once. Decoded dicts and lists are fresh objects
    of our own, so they are changed in place; the walk uses a stack of its own, as
    an owner may nest a payload deeper than Python's recursion limit.
    """
    kind = type(value)
    if kind is memoryview:
        return value.tobytes()
    if kind is not dict and kind is not list:
        return _as_seed_leaf(value)
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        items = node.items() if type(node) is dict else enumerate(node)
        for key, item in items:  # values are replaced, never added: safe while iterating
            kind = type(item)
            if kind in _PLAIN:
                continue
            if kind is memoryview:
                node[key] = item.tobytes()
            elif kind is dict or kind is list:
                stack.append(item)
            else:
                node[key] = _as_seed_leaf(item)
    return value


def _as_seed_leaf(value: Any) -> Any:
    np = sys.modules.get("numpy")  # an array in a payload means numpy is imported
    if np is not None and isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value
