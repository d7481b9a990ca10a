"""The site's side of a sized download, as a sans-I/O state machine.

How it works: a :class:`DownloadWindow` is fed events with the current time and
answers each with a :class:`Step`: the requests to send, the chunks to write, and
whether the download is over. It has no threads, sockets or clock of its own; the
driver in ``_site.py`` owns those, and the consumer, the digest and the file.

States (``start``, ``begin`` and ``on_digest`` in another state raise
:class:`WindowStateError`; any event after the end is ignored)::

    NEW --start--> DESCRIBING --first reply--> DESCRIBED --begin(start)--> RECEIVING
    RECEIVING --on_hashed(size)--> VERIFYING --on_digest--> CONFIRMING or REJECTING
    CONFIRMING --final reply--> DONE        REJECTING --final reply--> FAILED
    any other --bad reply, retries spent, deadline, abort, fail()--> FAILED
    (in CONFIRMING a failure only leaves a note: the bytes are verified, so DONE)

Rules:

- The first request asks for ``{"length": chunk}``; its reply must describe a sized
  object (``parse_descriptor``) of at most `max_size` bytes, else the download fails
  and the owner is told (a cancel). The chunk is then the smaller of ours and the
  owner's; the first reply's data is bytes ``[0, n)`` unless the consumer resumes.
- At most ``limit`` (``window``, or less while the owner is busy) chunk requests are
  in flight. A new chunk is asked for only while it starts less than ``window``
  chunks past the bytes arrived (so asks not yet answered stay under a window,
  whatever the owner does) and less than ``span`` chunks past the first byte not
  yet hashed (so what the site holds, queued for writing or for the digest, stays
  under ``span x chunk`` whatever is slow). Retries go first.
- A chunk's reply must say it ends at ``offset + n`` and carry exactly ``n`` bytes
  (``check_chunk_state``, ``chunk_pieces``); replies may come in any order.
- A reply for a request not in flight (timed out, answered already, after the end,
  never sent) is dropped.
- ``timeout``, ``target_unreachable``, ``comm_error`` and ``service_unavailable`` are
  retried up to ``retry.tries`` tries in all after ``retry.delay``; the abort and
  the overall deadline are checked first. Any other code, or a bad payload, fails.
- Busy: ``service_unavailable`` for a chunk while others are in flight, or as the
  first busy answer since a chunk was stored, shrinks ``limit`` to what is in flight
  and asks again after 50 ms without spending a try; ``limit`` grows back by one per
  ``limit`` chunks stored.
- The overall deadline fails the download unless every byte has arrived.
- Every byte hashed: the driver hands over the digest. A match sends the final
  ``ok`` request (its failure is only a note); a mismatch sends the final ``ok:
  false`` request, then fails with ``reject`` (the stored bytes must go).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

from objdl.downloader._defs import ProduceRC, RetryPolicy, _PropKey
from objdl.downloader._reply import (
    BadReply,
    Descriptor,
    check_chunk_state,
    chunk_pieces,
    parse_descriptor,
    reply_error,
    reply_payload,
    request_failed,
)
from objdl.message import Message, ReturnCode, make_reply

__all__ = [
    "BUSY_DELAY",
    "RETRYABLE",
    "ChunkRequest",
    "DownloadWindow",
    "Failed",
    "Failure",
    "Step",
    "WindowStateError",
    "Write",
]

log = logging.getLogger("objdl.downloader")

RETRYABLE = frozenset(
    {
        ReturnCode.TIMEOUT,
        ReturnCode.TARGET_UNREACHABLE,
        ReturnCode.COMM_ERROR,
        ReturnCode.SERVICE_UNAVAILABLE,
    }
)
BUSY_DELAY = 0.05  # before asking again for a chunk the owner was too busy to serve
_MIN_TIMEOUT = 0.001

NEW, DESCRIBING, DESCRIBED, RECEIVING, VERIFYING, CONFIRMING, REJECTING, DONE, FAILED = (
    "new",
    "describing",
    "described",
    "receiving",
    "verifying",
    "confirming",
    "rejecting",
    "done",
    "failed",
)
_ASKING = frozenset({DESCRIBING, RECEIVING, CONFIRMING, REJECTING})  # requests may be out
_FIRST, _CHUNK, _FINAL = "first", "chunk", "final"


class Failed(Exception):
    """Ends a download; its text is the reason given to ``download_failed``."""


class WindowStateError(RuntimeError):
    """The driver called the window in a state where that call is not legal (a bug)."""


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """A request to send now: `state` is the request's state dict, `key` names its reply.

    ``offset`` is None for the first request and ``size`` for the final one.
    """

    key: int
    kind: str  # "first", "chunk" or "final"
    offset: int | None
    length: int
    attempt: int
    timeout: float
    deadline: float
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Write:
    """Checked chunk data to store at `offset` (and hash): exactly `nbytes` bytes."""

    offset: int
    pieces: list[memoryview]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the download failed; `code` is the owner's return code when it came from one."""

    reason: str
    code: str | None = None
    cancel_owner: bool = False  # tell the owner the site gave up (a refused description)
    reject: bool = False  # the stored bytes failed the digest check: call data_rejected


@dataclass(slots=True)
class Step:
    """What the driver does next, in this order: cancel, send, write, then the rest."""

    cancel: list[int] = field(default_factory=list)  # keys no longer awaited: stop waiting
    send: list[ChunkRequest] = field(default_factory=list)
    write: list[Write] = field(default_factory=list)
    described: Descriptor | None = None  # ask the consumer where to start; call begin()
    verify: bool = False  # every byte is hashed: call on_digest() with the digest
    done: bool = False
    note: str = ""  # with done: the owner was not told of the success, and why
    failed: Failure | None = None

    @property
    def ended(self) -> bool:
        return self.done or self.failed is not None


class _Stop(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class DownloadWindow:
    """The sliding window of one sized download (see the module's text for the rules).

    Args:
        ref_id: the object's ref id (for logs).
        owner: the owner's cell name (for reasons).
        chunk: bytes asked for per request (the owner may lower it).
        window: chunk requests in flight, at most.
        retry: tries and back-off for a request that timed out or could not reach the owner.
        timeout: seconds to wait for each reply.
        deadline: the overall deadline (same clock as `now`), or None.
        started: when the download started (for the elapsed time in reasons).
        max_size: the largest object accepted, or None.
        span: chunks asked for and not yet hashed, at most (default: `window`).
        quiet: log retries at DEBUG instead of INFO (an optional download).
    """

    def __init__(
        self,
        ref_id: str,
        owner: str,
        chunk: int,
        window: int,
        retry: RetryPolicy,
        timeout: float,
        deadline: float | None,
        started: float,
        max_size: int | None = None,
        span: int | None = None,
        quiet: bool = False,
    ) -> None:
        if window < 1 or chunk < 1 or timeout <= 0 or (span is not None and span < window):
            raise ValueError("need window >= 1, chunk >= 1, timeout > 0 and span >= window")
        self.ref_id, self.owner = ref_id, owner
        self.chunk, self.window = chunk, window
        self.span = window if span is None else span
        self.retry, self.timeout, self.deadline = retry, timeout, deadline
        self.started, self.max_size, self.quiet = started, max_size, quiet
        self.state = NEW
        self.desc: Descriptor | None = None
        self.size = 0
        self.next = 0  # the first offset not yet asked for
        self.hashed = 0  # bytes hashed in order, as the driver reports
        self.received = 0  # bytes accepted (or kept from before a resume)
        self.retries = 0
        self.limit = window
        self._grow = 0
        self._stored_since_busy = False  # a chunk stored since the last busy answer
        self._inflight: dict[int, ChunkRequest] = {}
        # Requests to ask again: (when, old key, request, attempt); keys are unique, so
        # the heap never compares two requests.
        self._retry_at: list[tuple[float, int, ChunkRequest, int]] = []
        self._hold_until: float | None = None  # a direct link is being made (see hold)
        self._keys = 0
        self._first: dict | None = None  # the first reply's payload, until begin()
        self._mismatch = ""  # the digest mismatch reason, while REJECTING

    # -- what the driver reads --------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (or timed out)."""
        return len(self._inflight)

    @property
    def wants_to_send(self) -> bool:
        """Whether there is a retry waiting or a chunk not yet asked for."""
        return bool(self._retry_at) or (self.state == RECEIVING and self.next < self.size)

    @property
    def ended(self) -> bool:
        return self.state in (DONE, FAILED)

    def next_wake(self) -> float | None:
        """When :meth:`on_tick` next has something to do (None: nothing is timed)."""
        if self.state not in _ASKING:
            return None
        times = [r.deadline for r in self._inflight.values()]
        if self._hold_until is not None:
            times.append(self._hold_until)
        if self._retry_at and len(self._inflight) < self.limit:
            times.append(self._retry_at[0][0])
        if self.deadline is not None and self.state in (DESCRIBING, RECEIVING):
            times.append(self.deadline)
        return min(times, default=None)

    # -- events -----------------------------------------------------------------

    def start(self, now: float) -> Step:
        """Begin: the first request (the object's description and first chunk)."""
        self._expect(NEW, "start")
        self.state = DESCRIBING
        step = Step()
        step.send.append(self._request(_FIRST, None, self.chunk, 1, now))
        return step

    def begin(self, start: int, now: float) -> Step:
        """The consumer is ready; it already holds (and the driver hashed) ``[0, start)``."""
        self._expect(DESCRIBED, "begin")
        step = Step()
        first, self._first = self._first, None
        try:
            size = self.size
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= size:
                raise _Stop(
                    Failure(
                        "could not start the download: ValueError: resume point "
                        f"{start!r} is outside the object (size {size})"
                    )
                )
            self.state = RECEIVING
            self.next = self.hashed = self.received = start
            if not start:
                assert first is not None
                n = min(self.chunk, size)
                step.write.append(self._pieces(first, 0, n, first=True))
                self.received = self.next = n
                self._stored_since_busy = True
            if self.received >= size:
                self.state = VERIFYING
                step.verify = True
            else:
                self._fill(step, now)
        except _Stop as stop:
            self._end(step, stop.failure)
        return step

    def on_reply(self, key: int, reply: Message, now: float) -> Step:
        """The answer to request `key`: the owner's reply, or the cell's own (a NACK, a
        ``comm_error`` when the broker went away); every field is checked here."""
        step = Step()
        req = self._inflight.pop(key, None) if self.state in _ASKING else None
        if req is None:
            return step  # timed out already, answered already, never sent, or over
        try:
            self._answer(step, req, reply, now)
            self._after(step, now)
        except _Stop as stop:
            self._end(step, stop.failure)
        return step

    def hold(self, until: float) -> None:
        """Ask for nothing more until `until` or :meth:`release`: a direct link to the
        owner is being made, and what is asked for now would go through the broker."""
        self._hold_until = until

    def release(self, now: float) -> Step:
        """The link is up (or will not be): fill the window now."""
        step = Step()
        if self._hold_until is None:
            return step
        self._hold_until = None
        self._refill(step, now)
        return step

    def on_rerouted(self, key: int, now: float) -> Step:
        """Request `key` was lost with the direct link it went on (the cell says so, not
        the owner): ask again at once, through the broker, without spending a try. A
        download takes one offer (its first reply's), so a link dies under it at most
        once."""
        step = Step()
        req = self._inflight.pop(key, None) if self.state in _ASKING else None
        if req is None:
            return step
        self._later(now, req, req.attempt)
        self._refill(step, now)
        return step

    def on_tick(self, now: float) -> Step:
        """Time passed: requests past their deadline time out; due retries go out."""
        step = Step()
        if self.state not in _ASKING:
            return step
        try:
            expired = [r for r in self._inflight.values() if r.deadline <= now]
            for req in expired:
                del self._inflight[req.key]
                step.cancel.append(req.key)
                reply = make_reply(ReturnCode.TIMEOUT, f"no reply from {self.owner} in time")
                self._answer(step, req, reply, now)
            self._after(step, now)
        except _Stop as stop:
            self._end(step, stop.failure)
        return step

    def on_hashed(self, hashed: int, now: float) -> Step:
        """Every byte before `hashed` is written and hashed (more may be asked for)."""
        step = Step()
        if self.state in (NEW, DESCRIBING, DESCRIBED):
            raise WindowStateError(f"on_hashed() in state {self.state}, before begin()")
        if self.state != RECEIVING:
            return step  # (verifying or over: nothing more to ask for)
        if not self.hashed <= hashed <= self.received:
            raise WindowStateError(
                f"hashed went from {self.hashed} to {hashed} with {self.received} received"
            )
        self.hashed = hashed
        self._refill(step, now)
        return step

    def on_digest(self, hexdigest: str, now: float) -> Step:
        """The digest of every byte: compare, and tell the owner how it went."""
        self._expect(VERIFYING, "on_digest")
        assert self.desc is not None
        step = Step()
        ok = hexdigest == self.desc.digest
        reason = ""
        if ok:
            self.state = CONFIRMING
        else:
            self.state = REJECTING
            reason = self._mismatch = (
                f"digest mismatch: owner's {self.desc.algo} is {self.desc.digest}, "
                f"received bytes hash to {hexdigest}"
            )
        try:
            self._check(now)  # too late, or aborted: the owner is not asked at all
            step.send.append(self._request(_FINAL, self.size, 0, 1, now, ok=ok, reason=reason))
        except _Stop as stop:
            self._end(step, stop.failure)
        return step

    def abort(self, now: float) -> Step:
        """The caller's abort signal fired."""
        return self.fail(f"download aborted after {self._elapsed(now)}", now)

    def fail(self, reason: str, now: float) -> Step:
        """End the download for a reason found by the driver (a write, the broker, ...)."""
        step = Step()
        if not self.ended:
            self._end(step, Failure(reason))
        return step

    # -- inside -------------------------------------------------------------------

    def _expect(self, state: str, call: str) -> None:
        if self.state != state:
            raise WindowStateError(f"{call}() in state {self.state}, legal only in {state}")

    def _elapsed(self, now: float) -> str:
        return f"{now - self.started:.2f}s"

    def _check(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            raise _Stop(
                Failure(f"overall timeout: download not finished after {self._elapsed(now)}")
            )

    def _request(
        self, kind: str, offset: int | None, n: int, attempt: int, now: float, **extra: Any
    ) -> ChunkRequest:
        if kind == _FIRST:
            state: dict[str, Any] = {"length": n}
        elif kind == _CHUNK:
            state = {"offset": offset, "length": n}
        else:
            state = {"offset": offset, **extra}
        return self._issue(kind, offset, n, attempt, state, now)

    def _issue(
        self, kind: str, offset: int | None, n: int, attempt: int, state: dict, now: float
    ) -> ChunkRequest:
        """A request under a fresh key (so a late reply to an earlier try is dropped)."""
        timeout = self.timeout
        if self.deadline is not None:
            timeout = max(_MIN_TIMEOUT, min(timeout, self.deadline - now))
        self._keys += 1
        req = ChunkRequest(self._keys, kind, offset, n, attempt, timeout, now + timeout, state)
        self._inflight[req.key] = req
        return req

    def _answer(self, step: Step, req: ChunkRequest, reply: Message, now: float) -> None:
        bad = reply_error(reply)
        if bad is not None:
            rc, error = bad
            if (
                req.kind == _CHUNK
                and rc == ReturnCode.SERVICE_UNAVAILABLE
                and (self._inflight or self._stored_since_busy)
            ):
                # The owner is busy with our other requests, or still sending the chunk
                # it just served us: ask again shortly, with a smaller window, without
                # spending a try. Busy answers with no chunk stored in between do spend
                # tries, so an owner that is busy forever still ends the download.
                self.limit = max(1, len(self._inflight))
                self._stored_since_busy = False
                self._later(now + BUSY_DELAY, req, req.attempt)
                return
            self._check(now)
            if rc in RETRYABLE and req.attempt < self.retry.tries:
                self.retries += 1
                delay = self.retry.delay(req.attempt + 1)
                log.log(
                    logging.DEBUG if self.quiet else logging.INFO,
                    "download %s from %s: %s (%s); retry %d of %d in %.2fs",
                    self.ref_id, self.owner, rc, error, req.attempt, self.retry.tries - 1, delay,
                )  # fmt: skip
                self._later(now + delay, req, req.attempt + 1)
                return
            raise _Stop(
                Failure(request_failed(self.owner, req.attempt, self._elapsed(now), rc, error), rc)
            )
        try:
            payload = reply_payload(reply, self.owner, self._elapsed(now))
        except BadReply as exc:
            raise _Stop(Failure(str(exc))) from None
        if req.kind == _FIRST:
            self._describe(step, payload)
        elif req.kind == _CHUNK:
            if payload[_PropKey.STATUS] != ProduceRC.OK:
                raise _Stop(
                    Failure(f"owner {self.owner} ended the object early at offset {req.offset}")
                )
            assert req.offset is not None
            step.write.append(self._pieces(payload, req.offset, req.length))
            self.received += req.length
            self._stored_since_busy = True
            if self.limit < self.window:
                self._grow += 1
                if self._grow >= self.limit:
                    self.limit, self._grow = self.limit + 1, 0
        else:
            self._finish(step)

    def _describe(self, step: Step, first: dict) -> None:
        """Check the first reply's description (a refusal is told to the owner)."""
        try:
            if first[_PropKey.STATUS] != ProduceRC.OK:
                raise BadReply("the first reply ended the object before describing it")
            desc = parse_descriptor(first.get(_PropKey.STATE))
        except BadReply as exc:
            reason = f"owner {self.owner} did not describe a sized object for {self.ref_id}: {exc}"
            raise _Stop(Failure(reason, cancel_owner=True)) from None
        if self.max_size is not None and desc.size > self.max_size:
            reason = (
                f"object {self.ref_id} is {desc.size} bytes, more than max_size={self.max_size}; "
                "pass a larger max_size (or download it to a file) if it is expected"
            )
            raise _Stop(Failure(reason, cancel_owner=True))
        self.desc, self.size = desc, desc.size
        self.chunk = min(self.chunk, desc.chunk)  # the owner serves no more per request
        self._first = first
        self.state = DESCRIBED
        step.described = desc

    def _pieces(self, payload: Any, offset: int, n: int, first: bool = False) -> Write:
        """A reply's data as a checked write; its state must say it ends at ``offset + n``.

        (Not for the `first` reply: its state is the description, checked already.)
        """
        assert self.desc is not None
        try:
            if not first:
                check_chunk_state(payload.get(_PropKey.STATE), self.desc, offset, n)
            pieces = chunk_pieces(payload.get(_PropKey.DATA))
        except BadReply as exc:
            raise _Stop(Failure(f"owner {self.owner} sent a bad reply: {exc}")) from None
        got = sum(p.nbytes for p in pieces)
        if got != n:
            raise _Stop(Failure(f"owner sent {got} bytes at offset {offset}, expected {n}"))
        return Write(offset, pieces, n)

    def _finish(self, step: Step, note: str = "") -> None:
        """The final request is answered (or could not be): the end."""
        if self.state == REJECTING:
            self._end(step, Failure(self._mismatch, reject=True))
            return
        self.state = DONE
        step.done, step.note = True, note
        self._drop(step)

    def _refill(self, step: Step, now: float) -> None:
        """:meth:`_after`, ending the download in `step` if that says stop."""
        try:
            self._after(step, now)
        except _Stop as stop:
            self._end(step, stop.failure)

    def _later(self, when: float, req: ChunkRequest, attempt: int) -> None:
        heapq.heappush(self._retry_at, (when, req.key, req, attempt))

    def _after(self, step: Step, now: float) -> None:
        """After an event: the end if every byte is hashed, else the deadline, then refill."""
        if self.state == RECEIVING and self.hashed >= self.size:
            self.state = VERIFYING
            step.verify = True
            self._drop(step)
            return
        if self.state == DESCRIBING or (self.state == RECEIVING and self.received < self.size):
            self._check(now)
        self._fill(step, now)

    def _fill(self, step: Step, now: float) -> None:
        """Keep the window full: due retries first, then new chunks within the span."""
        if self.state not in _ASKING:
            return
        if self._hold_until is not None:
            if now < self._hold_until:
                return
            self._hold_until = None
        asked = self.window * self.chunk
        held = self.span * self.chunk
        while len(self._inflight) < self.limit:
            if self._retry_at and self._retry_at[0][0] <= now:
                _, _, old, attempt = heapq.heappop(self._retry_at)
                step.send.append(
                    self._issue(old.kind, old.offset, old.length, attempt, old.state, now)
                )
            elif (
                self.state == RECEIVING
                and self.next < self.size
                and self.next < self.received + asked
                and self.next < self.hashed + held
            ):
                # Bytes asked for and not yet here stay under a window; bytes here and
                # not yet hashed count against the span too, so a site holds at most
                # `span` chunks whatever is slow (the owner, the disk, the hashing).
                n = min(self.chunk, self.size - self.next)
                step.send.append(self._request(_CHUNK, self.next, n, 1, now))
                self.next += n
            else:
                break

    def _end(self, step: Step, failure: Failure) -> None:
        if self.state == CONFIRMING:  # verified already: the owner's trouble is only a note
            self._finish(step, failure.reason)
            return
        if self.state == REJECTING and not failure.reject:
            failure = Failure(self._mismatch, reject=True)
        self.state = FAILED
        step.failed = failure
        self._drop(step)

    def _drop(self, step: Step) -> None:
        """Stop waiting for anything: the requests in flight, the retries."""
        step.cancel.extend(self._inflight)
        self._inflight.clear()
        self._retry_at.clear()
        self._first = None
