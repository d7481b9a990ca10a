"""Reusable read buffers for serving files, shared by every file the process serves.

Why: each chunk served used to be a fresh ``os.pread`` buffer, allocated on whichever
handler thread served it and freed later on pyzmq's garbage-collector thread once
the bytes were on the wire. glibc gives each thread its own arena, so with many
sites the owner's RSS grew far beyond the data in flight. Reading into a bounded
set of buffers that are reused keeps the owner's memory flat, whatever the number
of sites, and skips the allocator.

A buffer is free again once nothing refers to it: no memoryview of it, and no zmq
frame still sending it (pyzmq keeps a reference until libzmq is done with the
bytes). The pool tells by the buffer's reference count, calibrated at import, so it
never hands out a buffer whose bytes may still be read. When every buffer is busy
the taker waits (the views it handed out say when they die), which paces the
reading to the rate the socket drains; after `wait` seconds it gets None and reads
into a one-off buffer instead, so a stuck connection never stalls the handlers.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref

__all__ = ["BufferPool"]

MIN_POOLED = 64 * 1024  # smaller reads are copied into the message anyway
DEFAULT_LIMIT = 64 * 1024 * 1024
_RECHECK = 0.05  # a view's death is only a hint (copies of it may live on): look again
_MIN_PER_SIZE = 4  # a buffer size is pooled only if this many fit within the limit


def _refcounts(bufs: list[bytearray]) -> list[int]:
    return [sys.getrefcount(b) for b in bufs]


# What _refcounts() reports for a buffer that only its list holds.
_IDLE_REFS = _refcounts([bytearray(1)])[0]


class BufferPool:
    """Buffers of power-of-two sizes, reused once nothing refers to them.

    Sizes above a quarter of the limit are not pooled (the caller reads into a
    one-off buffer at once); when a new size needs room, idle buffers of other sizes
    make way.

    Args:
        limit: the most bytes the pool keeps (busy and idle together).
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._cond = threading.Condition()  # an RLock: a view may die while we hold it
        self._classes: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self.waits = 0
        self.misses = 0

    @staticmethod
    def size_class(length: int) -> int:
        """The buffer size that serves reads of `length` bytes."""
        return max(MIN_POOLED, 1 << (length - 1).bit_length())

    def take(self, length: int, wait: float = 0.0) -> memoryview | None:
        """A writable view of `length` bytes of a buffer nobody uses, or None.

        Waits up to `wait` seconds for a buffer to come free when all are in use.
        The buffer is the caller's while the view (or anything made from it) lives;
        dropping every reference gives it back.
        """
        size = self.size_class(length)
        if length < MIN_POOLED or size > self.limit // _MIN_PER_SIZE:
            return None  # too small to matter, or too big to reuse: no wait either way
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                buf = self._free_buffer(size)
                if buf is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.misses += 1
                    return None
                self.waits += 1
                self._cond.wait(min(left, _RECHECK))
        view = memoryview(buf)[:length]
        weakref.finalize(view, self._released)
        return view

    def _free_buffer(self, size: int) -> bytearray | None:
        """An idle buffer of `size`, or a new one if the limit allows (lock held)."""
        bufs = self._classes.setdefault(size, [])
        for i, refs in enumerate(_refcounts(bufs)):
            if refs <= _IDLE_REFS:
                return bufs[i]
        if self._bytes + size > self.limit:
            self._evict_idle(size)
        if self._bytes + size > self.limit:
            return None  # every buffer is busy: worth waiting for
        buf = bytearray(size)
        bufs.append(buf)
        self._bytes += size
        return buf

    def _evict_idle(self, keep: int) -> None:
        """Free idle buffers of sizes other than `keep`, so the room goes where it is needed."""
        for size, bufs in self._classes.items():
            if size == keep:
                continue
            idle = [i for i, refs in enumerate(_refcounts(bufs)) if refs <= _IDLE_REFS]
            for i in reversed(idle):
                del bufs[i]
                self._bytes -= size

    def _released(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds now."""
        return self._bytes

    def clear(self) -> None:
        """Forget every buffer.

        Those still in use are freed when their users let go; until then the pool
        may hold up to twice its limit.
        """
        with self._cond:
            self._classes.clear()
            self._bytes = 0
            self._cond.notify_all()
