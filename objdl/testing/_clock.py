"""A clock a test controls: time moves only when the test (or autojump) moves it.

How it works: the clock holds the current time, a heap of timers and the callbacks
registered with :meth:`FakeClock.on_advance`. :meth:`FakeClock.advance` walks the
timers in time order; at each one it sets the time to the timer's, runs the advance
callbacks, then the timer, all on the calling thread and outside the clock's lock (a
timer may send messages, which may schedule more timers). One advance runs at a time.

Threads that wait on the clock (:meth:`FakeClock.wait_for`: a fake cell's
``send_request``, ``wait_connected``) sleep on a condition that every change
notifies. With ``autojump``, a waiting thread that finds nothing running on the fake
network for ``autojump_threshold`` seconds of real time moves the clock itself, to
the next timer or its own deadline, whichever is first (trio's ``MockClock`` does the
same for tasks). A wait that sees the clock stand still for ``stall_timeout`` real
seconds raises :class:`ClockStalled`, so a test that forgot to advance fails with a
message instead of hanging.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ClockStalled", "FakeClock", "Timer"]

_POLL = 0.02  # real seconds between looks at what cannot notify (an abort signal)


class ClockStalled(RuntimeError):
    """A wait on a :class:`FakeClock` saw no time pass for its ``stall_timeout``."""


class Timer:
    """A callback scheduled on a :class:`FakeClock`; :meth:`cancel` stops it."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], Any]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A monotonic clock that moves only when told to.

    Call it (or :meth:`now`) for the time in seconds. It is what the cells of a
    :class:`~objdl.testing.FakeNetwork` measure deadlines and delays on, and what the
    owner side of the downloader keeps time by when its cell is one of them.

    Args:
        start: the time it reads at first. Default: the real ``time.monotonic()``,
            so code that still reads the real clock (the site's download window,
            today) sees the cells' deadlines as lying in the near future, not in
            the past.
        autojump: let a thread waiting on the clock move it once the network is idle.
        autojump_threshold: real seconds the network must be idle before that jump
            (0: at once; raise it when threads outside the network take part).
        stall_timeout: real seconds a wait may see the clock stand still before it
            raises :class:`ClockStalled`.
    """

    def __init__(
        self,
        start: float | None = None,
        *,
        autojump: bool = False,
        autojump_threshold: float = 0.0,
        stall_timeout: float = 30.0,
    ) -> None:
        if autojump_threshold < 0 or stall_timeout <= 0:
            raise ValueError("autojump_threshold must be >= 0 and stall_timeout > 0")
        self._now = time.monotonic() if start is None else float(start)
        self.autojump = autojump
        self.autojump_threshold = autojump_threshold
        self.stall_timeout = stall_timeout
        self._cond = threading.Condition(threading.Lock())
        self._advancing = threading.RLock()  # one advance at a time; a timer may advance
        self._advance_depth = 0
        self._advancer = 0  # the thread advancing, while _advance_depth > 0
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._watchers: dict[int, Callable[[], Any]] = {}
        self._busy = 0  # network operations running (not waiting) on any thread
        self._waiters = 0
        self._mine = threading.local()  # this thread's share of _busy
        self._activity = time.monotonic()  # real time of the last network operation

    # ---------------------------------------------------------------- reading

    def now(self) -> float:
        """The current time, in seconds."""
        return self._now

    def __call__(self) -> float:
        return self._now

    @property
    def waiting(self) -> int:
        """How many threads wait on the clock now (a test waits for its thread to get
        there before it advances the clock past that thread's deadline)."""
        return self._waiters

    def next_timer(self) -> float | None:
        """When the earliest pending timer is due, or None."""
        with self._cond:
            self._prune()
            return self._timers[0][0] if self._timers else None

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now:.6f}, timers={len(self._timers)})"

    # ---------------------------------------------------------------- moving

    def advance(self, seconds: float) -> None:
        """Move the time forward by `seconds`, running every timer due on the way.

        Timers run in time order, each at its own time; the advance callbacks run at
        each step, before the timer. Returns once the time reads ``now + seconds``.
        """
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got {seconds!r} seconds")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move the time forward to `when` (no-op if it is already later)."""
        with self._advancing:
            self._advance_depth += 1
            self._advancer = threading.get_ident()
            try:
                self._walk(when)
            finally:
                self._advance_depth -= 1
                with self._cond:
                    self._cond.notify_all()

    def _walk(self, target: float) -> None:
        while True:
            with self._cond:
                self._prune()
                timer = None
                if self._timers and self._timers[0][0] <= target:
                    timer = heapq.heappop(self._timers)[2]
                    moved = self._set(timer.when)
                else:
                    moved = self._set(target)
                watchers = list(self._watchers.values()) if moved else []
            for cb in watchers:
                cb()
            if timer is None:
                return
            timer.fn()

    def _set(self, when: float) -> bool:
        """Set the time (lock held); True if it moved."""
        self._activity = time.monotonic()
        if when <= self._now:
            return False
        self._now = when
        self._cond.notify_all()
        return True

    def _prune(self) -> None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)

    # ---------------------------------------------------------------- scheduling

    def call_at(self, when: float, fn: Callable[[], Any]) -> Timer:
        """Run `fn()` when the clock reaches `when` (on the thread that moves it there)."""
        timer = Timer(when, fn)
        with self._cond:
            heapq.heappush(self._timers, (when, next(self._seq), timer))
            self._activity = time.monotonic()
            self._cond.notify_all()
        return timer

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        """Run `fn()` `delay` seconds from now."""
        return self.call_at(self._now + delay, fn)

    def on_advance(self, cb: Callable[[], Any]) -> Callable[[], None]:
        """Call `cb()` each time the clock moves, on the moving thread; returns the
        function that unregisters it. (The downloader's owner side expires its
        transactions this way.)"""
        key = next(self._seq)
        with self._cond:
            self._watchers[key] = cb

        def remove() -> None:
            with self._cond:
                self._watchers.pop(key, None)

        return remove

    # ---------------------------------------------------------------- waiting

    def sleep(self, seconds: float) -> None:
        """Block until the clock has moved `seconds` on (another thread, or autojump,
        must move it)."""
        end = self._now + seconds
        self.wait_for(lambda: False, end)

    def wait_for(
        self, predicate: Callable[[], bool], deadline: float | None, poll: bool = False
    ) -> bool:
        """Block until `predicate()` is true or the clock reaches `deadline`.

        Returns the predicate's last value. Whoever makes the predicate true must
        call :meth:`notify`, unless `poll` is set (then it is looked at every few
        real milliseconds too, for an abort signal say).

        Raises:
            ClockStalled: the clock stood still for ``stall_timeout`` real seconds.
        """
        mine = getattr(self._mine, "depth", 0)
        with self._cond:
            self._busy -= mine  # a waiting thread does not keep the network busy
            self._waiters += 1
            try:
                return self._wait_locked(predicate, deadline, poll)
            finally:
                self._waiters -= 1
                self._busy += mine

    def _wait_locked(
        self, predicate: Callable[[], bool], deadline: float | None, poll: bool
    ) -> bool:
        seen, stall_end = self._now, time.monotonic() + self.stall_timeout
        while True:
            if predicate():
                return True
            if deadline is not None and self._now >= deadline:
                return False
            real = time.monotonic()
            if self._now != seen:
                seen, stall_end = self._now, real + self.stall_timeout
            elif real >= stall_end:
                raise ClockStalled(
                    f"the fake clock stood at {self._now:.3f} for {self.stall_timeout:g}s of "
                    f"real time while a thread waited for {deadline}: advance it "
                    "(clock.advance) from the test, or make it FakeClock(autojump=True)"
                )
            wait = stall_end - real
            if poll:
                wait = min(wait, _POLL)
            # (A timer that waits, on the advancing thread, may move the clock on too.)
            free = self._advance_depth == 0 or self._advancer == threading.get_ident()
            if self.autojump and self._busy <= 0 and free:
                idle = real - self._activity
                if idle >= self.autojump_threshold:
                    self._prune()
                    target = self._timers[0][0] if self._timers else None
                    if deadline is not None and (target is None or deadline < target):
                        target = deadline
                    if target is not None:
                        self._cond.release()
                        try:
                            self.advance_to(target)
                        finally:
                            self._cond.acquire()
                        continue
                else:
                    wait = min(wait, self.autojump_threshold - idle)
            self._cond.wait(max(wait, 0.0))

    def notify(self) -> None:
        """Wake the threads waiting on the clock, to look at their predicates again."""
        with self._cond:
            self._activity = time.monotonic()
            self._cond.notify_all()

    # ---------------------------------------------------------------- network activity

    def busy(self) -> _Busy:
        """A context in which the network is doing something (autojump waits for it)."""
        return _Busy(self)


class _Busy:
    __slots__ = ("_clock",)

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def __enter__(self) -> None:
        c = self._clock
        c._mine.depth = getattr(c._mine, "depth", 0) + 1
        with c._cond:
            c._busy += 1
            c._activity = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        c = self._clock
        c._mine.depth -= 1
        with c._cond:
            c._busy -= 1
            c._activity = time.monotonic()
            c._cond.notify_all()
