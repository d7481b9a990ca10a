"""How much chunk data the owner holds for each site until it has left the process.

How it works: every chunk a producer returns is charged to the site that asked for
it before the reply is sent. Each bulk piece of the chunk is handed on as a fresh
memoryview with a ``weakref.finalize`` attached; the reply's frames (in the cell's
outbox, then in libzmq, which pyzmq keeps a reference for while ``copy=False``
sends it) hold that view, so the finalizer runs, and the bytes are released, only
once nothing in the process can still send them. Pieces smaller than the wire's
bulk threshold are copied into the reply's body anyway; runs of them that add up
to more are joined into one tracked buffer so they count too.

A site whose data in flight is at its cap (``per_site``), or an owner at its total
cap (``total``), gets ``service_unavailable`` instead of more data: memory follows
what we allow, never the window a site asks for. A single chunk larger than a cap
is still served when nothing else is in flight for that site (or at all).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any

from objdl.wire import BULK_THRESHOLD

__all__ = ["MAX_INFLIGHT_PER_SITE", "MAX_INFLIGHT_TOTAL", "InFlight"]

MAX_INFLIGHT_PER_SITE = 64 * 1024 * 1024
MAX_INFLIGHT_TOTAL = 256 * 1024 * 1024


def _check(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int of bytes, got {value!r}")
    return value


class InFlight:
    """Bytes of chunk data produced per site and not yet released by the I/O path.

    Args:
        per_site: the most bytes held for any one site.
        total: the most bytes held for all sites together.
    """

    def __init__(
        self, per_site: int = MAX_INFLIGHT_PER_SITE, total: int = MAX_INFLIGHT_TOTAL
    ) -> None:
        self.per_site = _check("per_site", per_site)
        self.total = _check("total", total)
        self._lock = threading.Lock()
        self._by_site: dict[str, int] = {}
        self._all = 0
        self.peak = 0
        self.peak_site = 0
        self.rejected = 0
        # Releases by the finalizers, applied under the lock by the next call. A
        # finalizer runs wherever the last reference goes: on any thread, and even
        # inside one of our locked sections (a garbage collection there), so it must
        # not take the lock itself.
        self._freed: deque[tuple[str, int]] = deque()

    def set_limits(self, per_site: int | None = None, total: int | None = None) -> None:
        with self._lock:
            if per_site is not None:
                self.per_site = _check("per_site", per_site)
            if total is not None:
                self.total = _check("total", total)

    def held(self, site: str | None = None) -> int:
        """Bytes held now for `site` (None: for all sites)."""
        with self._lock:
            self._apply_freed()
            return self._all if site is None else self._by_site.get(site, 0)

    def _refusal(self, site: str, nbytes: int = 0) -> str | None:
        """Why one more chunk of `nbytes` for `site` is refused now; None if it is not
        (lock held)."""
        self._apply_freed()
        held = self._by_site.get(site, 0)
        if held and held + nbytes > self.per_site:
            return (
                f"{held} bytes of chunk data for {site} are still waiting to be sent, at the "
                f"per-site cap of {self.per_site} bytes (max_inflight_per_site); retry later "
                "or use a smaller window"
            )
        if self._all and self._all + nbytes > self.total:
            return (
                f"{self._all} bytes of chunk data for all sites are still waiting to be sent, "
                f"at the total cap of {self.total} bytes (max_inflight_total); retry later"
            )
        return None

    def full(self, site: str) -> str | None:
        """Why `site` can get no data now (before producing any); None if it can."""
        with self._lock:
            reason = self._refusal(site)
            if reason is not None:
                self.rejected += 1
            return reason

    def charge(self, site: str, data: Any) -> tuple[Any, str | None]:
        """`data` with its bulk pieces tracked and charged to `site`, or why not.

        Returns ``(data, None)`` when charged (the data to send instead of the
        original) or ``(None, reason)`` when over a cap.
        """
        single = not isinstance(data, (list, tuple))
        pieces = [data] if single else list(data)
        if not all(isinstance(p, (bytes, bytearray, memoryview)) for p in pieces):
            return data, None  # a generic producer's own values: nothing we can track
        out: list[Any] = []
        run: list[memoryview] = []
        tracked: list[memoryview] = []

        def flush() -> None:
            if sum(v.nbytes for v in run) >= BULK_THRESHOLD:
                joined = memoryview(bytearray().join(run))
                out.append(joined)
                tracked.append(joined)
            else:
                out.extend(run)
            run.clear()

        for p in pieces:
            view = memoryview(p)
            if view.nbytes < BULK_THRESHOLD or not view.c_contiguous:
                run.append(view)
                continue
            flush()
            view = view.cast("B") if view.ndim != 1 or view.format != "B" else memoryview(view)
            out.append(view)
            tracked.append(view)
        flush()
        if not tracked:
            return data, None  # all small: copied into the reply's body at once
        nbytes = sum(v.nbytes for v in tracked)
        with self._lock:
            reason = self._refusal(site, nbytes)
            if reason is not None:
                self.rejected += 1
                return None, reason
            held = self._by_site.get(site, 0) + nbytes
            self._by_site[site] = held
            self._all += nbytes
            self.peak = max(self.peak, self._all)
            self.peak_site = max(self.peak_site, held)
        for v in tracked:
            weakref.finalize(v, self._release, site, v.nbytes)
        return (out[0] if single and len(out) == 1 else out), None

    def _release(self, site: str, nbytes: int) -> None:
        self._freed.append((site, nbytes))  # atomic, takes no lock (see __init__)

    def _apply_freed(self) -> None:
        """Take the finalizers' releases off the counts (lock held)."""
        freed = self._freed
        while freed:
            site, nbytes = freed.popleft()
            left = self._by_site.get(site, 0) - nbytes
            if left > 0:
                self._by_site[site] = left
            else:
                self._by_site.pop(site, None)
            self._all -= nbytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._apply_freed()
            return {
                "held": self._all,
                "by_site": dict(self._by_site),
                "peak": self.peak,
                "peak_site": self.peak_site,
                "rejected": self.rejected,
                "per_site": self.per_site,
                "total": self.total,
            }
