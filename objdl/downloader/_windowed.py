"""The shell around a site's :class:`DownloadWindow`: sends, writes, hashes, waits.

How it works: the window (``_window.py``) decides everything about a sized
download; this shell does what each of its steps says, and feeds it what happens.
Two shapes, chosen once per cell class:

- the cell's ``request_async`` takes ``on_done`` (called as each reply is stored, on
  the cell's I/O thread): the reply is fed to the window there, under a lock, and
  the next requests leave at once; the chunks to write go to the download's thread
  through a queue;
- otherwise each request's ``done_queue`` brings its reply to the download's thread,
  which feeds the window and sends.

Either way only the download's thread writes, hashes and calls the consumer, so a
slow disk never stalls the I/O thread; the window's span bounds what waits to be
written (if the writer falls behind, no new chunk is asked for). The download's
thread also times the window (deadlines, retries), polls the abort signal and waits
for a lost broker before asking again.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from objdl.cell import PendingRequest
from objdl.downloader._defs import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, _PropKey
from objdl.downloader._reply import Descriptor
from objdl.downloader._window import ChunkRequest, DownloadWindow, Failed, Step, Write
from objdl.downloader.sized import INLINE_DIGESTS, OrderedDigest, SizedConsumer
from objdl.message import Message

if TYPE_CHECKING:
    from objdl.downloader._site import _Requester

__all__ = ["run_window"]

log = logging.getLogger("objdl.downloader")

_ABORT_POLL = 0.05


def run_window(
    req: _Requester, consumer: SizedConsumer, window: int, chunk: int, max_size: int | None
) -> Step:
    """Run the windowed download of one sized object; its last step (done or failed).

    Raises Failed only if the download could not start (no broker, aborted, too late).
    """
    return _Window(req, consumer, window, chunk, max_size).run()


def _takes_on_done(cell: Any) -> bool:
    """Whether `cell`'s ``request_async`` takes an ``on_done`` hook (asked once per class)."""
    kind = type(cell)
    known = _ON_DONE.get(kind)
    if known is None:
        try:
            known = "on_done" in inspect.signature(cell.request_async).parameters
        except (TypeError, ValueError):
            known = False
        _ON_DONE[kind] = known
    return known


_ON_DONE: dict[type, bool] = {}
# With replies fed to the window on the cell's I/O thread, chunks wait for the
# download's thread to write them while the next requests are already out: the span
# (chunks asked for and not yet hashed) is this many windows, so `window` requests
# stay in flight while up to a window of chunks waits to be written.
_HOOKED_SPAN = 2
_LINK_WAIT = 0.5  # the longest the window waits for an offered direct link to come up


class _Window:
    """Drives the :class:`DownloadWindow` of one sized object: sends, writes, waits.

    The window decides; this shell does what it says. Two shapes:

    - the cell's ``request_async`` takes ``on_done``: each reply is fed to the window
      (under :attr:`lock`) on the thread that stored it, the cell's I/O thread, and
      the requests it returns leave from there at once; the chunks to write go to
      the download's thread through :attr:`events`;
    - otherwise replies come to the download's thread through :attr:`events` (the
      requests' ``done_queue``), which feeds the window and sends.

    Either way only the download's thread writes, hashes and calls the consumer, so
    a slow disk never stalls the I/O thread, and the window's span bounds what waits.
    """

    def __init__(
        self,
        req: _Requester,
        consumer: SizedConsumer,
        window: int,
        chunk: int,
        max_size: int | None = None,
    ) -> None:
        self.req = req
        self.consumer = consumer
        self.hooked = _takes_on_done(req.cell)
        self.win = DownloadWindow(
            req.ref_id,
            req.owner,
            chunk,
            window,
            req.retry,
            req.timeout,
            req.deadline,
            req.started,
            max_size,
            span=window * _HOOKED_SPAN if self.hooked else window,
            quiet=req.optional,
        )
        self.lock = threading.Lock()
        # Replies (done_queue shape) or steps (on_done shape) for the download's
        # thread, and None each time the background hashing has moved on.
        self.events: queue.SimpleQueue[PendingRequest | Step | None] = queue.SimpleQueue()
        self.pending: dict[int, PendingRequest] = {}  # window key -> request in flight
        self.keys: dict[int, int] = {}  # req_id -> window key (done_queue shape)
        self.closed = False
        self.digest: OrderedDigest | None = None
        self.verified = 0
        self.planned = 0.0  # when the download's thread wakes next, unless nudged
        self.outcome: Step | None = None
        self._local = threading.local()  # per thread: requests waiting to be sent
        self.offer_seen = False  # the first reply (which may offer a direct link) came

    def run(self) -> Step:
        """Download; the last step, once verified and the owner told, or failed."""
        req = self.req
        try:
            req.check()
            # This thread will block waiting for replies that another thread delivers:
            # a cell that may not be waited on from here (an asyncio cell on its own
            # loop's thread) refuses this blocking call, rather than freeze its loop.
            req.cell.wait_connected(0.0)
            req.await_broker()
            self.apply(self.feed(self.win.start))
            while self.outcome is None:
                self.wait()
        finally:
            with self.lock:
                self.closed = True
                left = list(self.pending.values())
                self.pending.clear()
            for p in left:
                p.cancel()
            if self.digest is not None:
                self.digest.close()
        assert self.outcome is not None
        return self.outcome

    def feed(self, event: Callable[..., Step], *args: Any) -> Step:
        """Call the window (any thread): `event(*args, now)` under the lock."""
        with self.lock:
            return event(*args, time.monotonic())

    # -- the download's thread ------------------------------------------------------

    def wait(self) -> None:
        """Wait for a reply, a step, the hashing, a deadline or the abort; handle it."""
        req = self.req
        now = time.monotonic()
        with self.lock:
            wake = self.win.next_wake()
            wait = 1.0 if wake is None else wake - now
            if req.abort is not None:
                wait = min(wait, _ABORT_POLL)
            self.planned = now + wait  # an earlier wake found on the I/O thread nudges us
        try:
            item = self.events.get(timeout=max(0.0, wait))
            while True:
                if isinstance(item, Step):
                    self.apply(item, sent=True)
                elif item is not None:
                    key = self.keys.pop(item.req_id, None)
                    if key is not None:
                        assert item.reply is not None
                        self.pending.pop(key, None)
                        if not self.offer_seen:
                            self.take_offer(item.reply)
                        if getattr(item, "link_lost", False):
                            self.apply(self.feed(self.win.on_rerouted, key))
                        else:
                            self.apply(self.feed(self.win.on_reply, key, item.reply))
                if self.outcome is not None:
                    return
                item = self.events.get_nowait()
        except queue.Empty:
            pass
        self.apply(Step())  # the background hashing may have moved on
        if self.outcome is None and req.abort is not None and req.abort.triggered:
            self.apply(self.feed(self.win.abort))
        if self.outcome is not None:
            return
        with self.lock:
            idle = self.win.in_flight == 0 and self.win.wants_to_send
        if idle:  # (not when all is here and only the hashing is left)
            try:
                req.await_broker()
            except Failed as exc:
                self.apply(self.feed(self.win.fail, str(exc)))
                return
        self.apply(self.feed(self.win.on_tick))

    def apply(self, step: Step, sent: bool = False) -> None:
        """Do what `step` says, then what the window answers to that, until nothing is left.

        `sent`: its cancels and requests were done already (on the I/O thread).
        """
        todo = collections.deque([(step, sent)])
        while todo and self.outcome is None:
            step, sent = todo.popleft()
            if not sent:
                self.stop_waiting(step.cancel)
                self.send(step.send)
            if step.ended:
                self.outcome = step
                return
            try:
                todo.extend((after, False) for after in self.act(step))
            except Failed as exc:
                todo.append((self.feed(self.win.fail, str(exc)), False))

    def act(self, step: Step) -> list[Step]:
        """The download thread's part of `step`: writes, hashing, the consumer's calls.

        Returns the window's answers to what was done.
        """
        for w in step.write:
            self.store(w)
        if step.described is not None:
            return [self.describe(step.described)]
        answers = []
        digest = self.digest
        if digest is not None:
            if digest.error is not None:
                raise Failed(f"could not hash the received bytes: {digest.error!r}")
            hashed = digest.hashed
            if hashed != self.verified:
                self.verified = hashed
                try:  # written and hashed: a point to resume from
                    self.consumer.verified(hashed)
                except Exception as exc:
                    raise Failed(f"could not record progress: {type(exc).__name__}: {exc}") from exc
                answers.append(self.feed(self.win.on_hashed, hashed))
        if step.verify:
            assert digest is not None
            try:
                got = digest.hexdigest(self.req.timeout)
            except (RuntimeError, TimeoutError) as exc:
                raise Failed(f"could not hash the received bytes: {exc}") from exc
            answers.append(self.feed(self.win.on_digest, got))
        return answers

    def describe(self, desc: Descriptor) -> Step:
        """The owner described the object: get the consumer (and the digest) ready."""
        req, win = self.req, self.win
        try:
            # A costly digest of an object bigger than the window is computed on
            # a thread of its own, in parallel with writing.
            self.digest = OrderedDigest(
                desc.algo,
                background=desc.algo not in INLINE_DIGESTS and desc.size > win.window * win.chunk,
                on_hashed=self.wake,
            )
            start = self.consumer.resume_from(req.ref_id, desc.as_state())
            size = desc.size
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= size:
                raise ValueError(f"resume point {start!r} is outside the object (size {size})")
            if start:
                self.rehash(start)
            else:
                self.consumer.begin(req.ref_id, size, desc.meta)
        except Exception as exc:
            raise Failed(f"could not start the download: {type(exc).__name__}: {exc}") from exc
        req.progress.total = desc.size
        self.verified = self.digest.hashed
        return self.feed(win.begin, start)

    def store(self, w: Write) -> None:
        try:
            self.consumer.write(w.offset, w.pieces)
        except Exception as exc:
            raise Failed(
                f"could not write at offset {w.offset}: {type(exc).__name__}: {exc}"
            ) from exc
        assert self.digest is not None
        self.digest.add(w.offset, w.pieces)
        self.req.progress.add(w.nbytes)

    def rehash(self, upto: int) -> None:
        """Hash the bytes a resumed download already has, so the full digest is checked."""
        assert self.digest is not None
        step = 8 * self.win.chunk
        for off in range(0, upto, step):
            data = self.consumer.read(off, min(step, upto - off))
            # At most one block waits for the hashing thread: memory stays bounded.
            if not self.digest.wait(self.req.timeout):
                raise TimeoutError(f"hashing the kept bytes stalled for {self.req.timeout:g}s")
            self.digest.add(off, [memoryview(data)])
        self.req.progress.done = upto
        log.info("download %s resumes at byte %d", self.req.ref_id, upto)

    def wake(self) -> None:
        """Wake the download's thread: hashing made progress (on the hashing thread)."""
        self.events.put(None)

    # -- any thread -------------------------------------------------------------------

    def take_offer(self, reply: Message) -> None:
        """The first reply: if it offers a direct link to the owner, have the cell open it.

        The chunks then skip the broker once the link is up; until then, and if it
        cannot be made or goes down, they go through the broker (the cell decides).
        """
        self.offer_seen = True
        payload = reply.payload
        offer = payload.get(_PropKey.DIRECT) if isinstance(payload, dict) else None
        open_link = getattr(self.req.cell, "open_link", None)
        if offer is None or open_link is None:
            return
        # What is asked for before the link is up goes through the broker: wait for
        # it (a few ms on a LAN), within a bound.
        with self.lock:
            self.win.hold(time.monotonic() + _LINK_WAIT)
        try:
            why = open_link(self.req.owner, offer, self.on_link_ready)
        except Exception as exc:  # never let a link end a download
            why = f"{type(exc).__name__}: {exc}"
        if why:
            log.debug("download %s: no direct link to %s: %s", self.req.ref_id, self.req.owner, why)
            self.on_link_ready(False)

    def on_link_ready(self, up: bool) -> None:
        """The link is up, or will not be (often on the cell's I/O thread): fill the window."""
        if not self.send_from_hook(self.feed(self.win.release)):
            self.events.put(None)  # the window's next wake moved: let the download's thread look

    def send_from_hook(self, step: Step) -> bool:
        """Send what `step` asks for now (on the cell's I/O thread); pass the rest of
        it to the download's thread. True if anything was passed on."""
        try:
            self.send(step.send)
        except Exception as exc:  # the cell stopped under us: end, on the download's thread
            step = self.feed(
                self.win.fail, f"could not send a request: {type(exc).__name__}: {exc}"
            )
            self.stop_waiting(step.cancel)
        step.cancel, step.send = [], []
        if step.write or step.described is not None or step.verify or step.ended:
            self.events.put(step)
            return True
        return False

    def send(self, reqs: list[ChunkRequest]) -> None:
        """Send `reqs`; on a thread already sending (a reply came back inside
        ``request_async``), queue them for that outer call instead of nesting."""
        if not reqs:
            return
        local = self._local
        backlog: collections.deque[ChunkRequest] | None = getattr(local, "backlog", None)
        if backlog is not None:
            backlog.extend(reqs)
            return
        local.backlog = backlog = collections.deque(reqs)
        try:
            while backlog:
                self.send_one(backlog.popleft())
        finally:
            local.backlog = None

    def send_one(self, r: ChunkRequest) -> None:
        req = self.req
        if self.hooked:
            p = req.cell.request_async(
                OBJ_DOWNLOADER_CHANNEL,
                req.owner,
                OBJ_DOWNLOADER_TOPIC,
                req.message(r.state),
                r.timeout,
                secure=req.secure,
                optional=req.optional,
                on_done=functools.partial(self.on_done, r.key),
            )
        else:
            p = req.submit(r.state, self.events, r.timeout)
            self.keys[p.req_id] = r.key
        with self.lock:
            if self.closed:
                p.cancel()
            elif not p.done():
                self.pending[r.key] = p

    def stop_waiting(self, keys: list[int]) -> None:
        if not keys:
            return
        with self.lock:
            stale = [self.pending.pop(k) for k in keys if k in self.pending]
        for p in stale:
            p.cancel()
            self.keys.pop(p.req_id, None)

    def on_done(self, key: int, p: PendingRequest) -> None:
        """A reply is stored (on the cell's I/O thread, or inside ``request_async``).

        Feeds the window and sends what it asks at once; the rest of the step goes
        to the download's thread. Cheap, never blocks, never raises.
        """
        abort = self.req.abort
        now = time.monotonic()
        if not self.offer_seen and p.reply is not None:
            self.take_offer(p.reply)
        with self.lock:
            if self.closed:
                return
            self.pending.pop(key, None)
            assert p.reply is not None
            if abort is not None and abort.triggered:
                step = self.win.abort(now)
            elif getattr(p, "link_lost", False):
                step = self.win.on_rerouted(key, now)
            else:
                step = self.win.on_reply(key, p.reply, now)
            stale = [self.pending.pop(k) for k in step.cancel if k in self.pending]
            wake = self.win.next_wake()
            nudge = wake is not None and wake < self.planned
            if wake is not None and nudge:
                self.planned = wake  # (one nudge per earlier time, not one per reply)
        for s in stale:
            s.cancel()
        if nudge:
            self.events.put(None)
        self.send_from_hook(step)
