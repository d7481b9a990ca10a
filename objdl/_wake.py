"""Wake a thread that sleeps in ``zmq.Poller.poll``: one mechanism for cells and the broker.

How it works: a non-blocking pipe whose read end the owning thread polls beside its
sockets. :meth:`Waker.wake` writes one byte unless a wake is already pending or the
caller *is* the owning thread (which looks at its queues before it polls again, so a
byte would only cost it a spurious wake-up). :meth:`Waker.woken` empties the pipe and
only then clears the pending flag, so no wake is lost (tests/test_races.py).
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["Waker"]


class Waker:
    """The pipe that wakes one polling thread; safe to call from any thread."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = -1, -1
        self._pending = False
        self.owner_ident = -1  # set by the owning thread: it never wakes itself
        # Held while writing to and closing the pipe: a thread still running after
        # close() must not write into whatever file reuses the closed descriptor.
        self._fd_lock = threading.Lock()

    def open(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def close(self) -> None:
        with self._fd_lock:
            fds, (self.read_fd, self._write_fd) = (self.read_fd, self._write_fd), (-1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def wake(self) -> None:
        if self._pending or threading.get_ident() == self.owner_ident:
            return  # already signalled, or the owner itself looks before it polls
        self._pending = True
        with self._fd_lock, contextlib.suppress(BlockingIOError, OSError):
            if self._write_fd >= 0:
                os.write(self._write_fd, b"x")

    def woken(self) -> None:
        """The owner saw the pipe: empty it, then let the next wake() signal again.

        In this order no wake is lost. A wake() before the flag is cleared returns
        early, but whatever it queued is already there and the owner looks at it
        right after this. A wake() after it writes a byte that stays in the pipe for
        the next poll. (Cleared first, a wake() between the two lines wrote a byte
        the read swallowed, leaving the flag set and the pipe empty for good.)
        """
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.read_fd, 4096)
        self._pending = False
