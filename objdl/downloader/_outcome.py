"""What happened to a transaction's objects, per ref and per site; waitable.

How it works: the owner's request handler reports events (a request served, EOF, a
producer error, a site's cancel, a withdrawal); the outcome records them per
(ref, site). When the transaction names the sites that must receive each object
(``sites``) or how many (``num_sites``), the outcome says when that is met, and the
owner then ends the transaction by itself with status ``finished``. Otherwise it
ends by inactivity (``timeout``) or by ``delete_transaction`` (``deleted``).

Site states: ``in_progress`` -> ``finished`` | ``failed`` | ``cancelled``; a site that
finished stays finished (a late error does not undo it).

Delivery rule: for a sized object, each site's record keeps the byte ranges the
owner served it (:class:`Ranges`, across its retries and resumes), and a site counts
as having the object only once those cover every byte; a final "ok" request without
that is recorded as a failed attempt, not a delivery.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_RANGES",
    "MAX_REFUSED",
    "Ranges",
    "RefOutcome",
    "SiteRecord",
    "Track",
    "TransferOutcome",
    "TransferStatus",
]

MAX_RANGES = 1024  # separate byte ranges kept per (ref, site); beyond, new ones are not kept
MAX_REFUSED = 1024  # refused cells remembered per ref; beyond, new names are not kept


class Ranges:
    """A small set of disjoint half-open byte ranges, merged as they are added.

    Bounded: once it holds :data:`MAX_RANGES` separate ranges, a range that touches
    none of them is not recorded, so a site that fragments its requests on purpose
    can only under-count its own coverage, never grow the owner's memory.
    """

    __slots__ = ("_r",)

    def __init__(self) -> None:
        self._r: list[tuple[int, int]] = []  # sorted, disjoint, not touching

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        r = self._r
        i = bisect.bisect_left(r, (start, start))
        if i and r[i - 1][1] >= start:
            i -= 1
        j = i
        while j < len(r) and r[j][0] <= end:
            start, end = min(start, r[j][0]), max(end, r[j][1])
            j += 1
        if i == j and len(r) >= MAX_RANGES:
            return
        r[i:j] = [(start, end)]

    def covers(self, start: int, end: int) -> bool:
        """True if every byte of ``[start, end)`` is in the set."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._r, (start, float("inf"))) - 1
        return i >= 0 and self._r[i][0] <= start and self._r[i][1] >= end

    def __len__(self) -> int:
        return len(self._r)

    @property
    def nbytes(self) -> int:
        return sum(e - s for s, e in self._r)


class TransferStatus:
    """The states of a transaction's :class:`TransferOutcome`: running, then one final state."""

    RUNNING = "running"
    FINISHED = "finished"
    TIMEOUT = "timeout"
    DELETED = "deleted"


@dataclass
class SiteRecord:
    """One site's download of one object."""

    state: str = "in_progress"  # in_progress, finished, failed, cancelled
    bytes_sent: int = 0
    reason: str = ""
    started: float = 0.0
    ended: float | None = None
    served: Ranges = field(default_factory=Ranges)  # bytes of a sized object served


@dataclass
class RefOutcome:
    """Per site, what became of one object."""

    ref_id: str
    total: int | None = None
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    # Cells turned away (not allowed, or plaintext for a secure transaction) -> the
    # return code they got; at most MAX_REFUSED, so a flood of names cannot grow it.
    refused: dict[str, str] = field(default_factory=dict)

    def with_state(self, state: str) -> list[str]:
        return sorted(s for s, r in self.sites.items() if r.state == state)

    @property
    def finished(self) -> list[str]:
        return self.with_state("finished")

    @property
    def failed(self) -> dict[str, str]:
        return {
            s: r.reason for s, r in sorted(self.sites.items()) if r.state in ("failed", "cancelled")
        }

    @property
    def in_progress(self) -> list[str]:
        return self.with_state("in_progress")


class TransferOutcome:
    """The outcome of one transaction: read it any time, or :meth:`wait` for its end.

    Args:
        tx_id: the transaction.
        sites: the sites that must each receive every object (None: any sites).
        num_sites: how many distinct sites must receive each object (None: not set).
        min_sites: the fewest sites per object that count as success for
            :attr:`min_met` (default: all named sites, or `num_sites`).
    """

    def __init__(
        self,
        tx_id: str,
        sites: Iterable[str] | None = None,
        num_sites: int | None = None,
        min_sites: int | None = None,
    ) -> None:
        self.tx_id = tx_id
        self.expected: frozenset[str] | None = frozenset(sites) if sites is not None else None
        if num_sites is not None and num_sites < 1:
            raise ValueError(f"num_sites must be at least 1, got {num_sites}")
        self.num_sites = num_sites
        need = len(self.expected) if self.expected is not None else num_sites
        self.min_sites = min_sites if min_sites is not None else need
        self.status = TransferStatus.RUNNING
        self.refs: dict[str, RefOutcome] = {}
        self._lock = threading.Lock()
        self._ended = threading.Event()

    # -- events from the owner ------------------------------------------------

    def add_ref(self, ref_id: str, total: int | None = None) -> None:
        with self._lock:
            self.refs.setdefault(ref_id, RefOutcome(ref_id, total))

    def set_total(self, ref_id: str, total: int) -> None:
        with self._lock:
            ref = self.refs.get(ref_id)
            if ref is not None:
                ref.total = total

    def served(
        self, ref_id: str, site: str, nbytes: int, now: float, offset: int | None = None
    ) -> SiteRecord | None:
        """A request from `site` was answered with `nbytes` of data (at `offset`, if sized)."""
        with self._lock:
            ref = self.refs.get(ref_id)
            if ref is None:
                return None
            rec = ref.sites.get(site)
            if rec is None:
                rec = ref.sites[site] = SiteRecord(started=now)
            elif rec.state != "in_progress" and rec.state != "finished":
                rec.state, rec.reason, rec.ended = "in_progress", "", None  # trying again
            rec.bytes_sent += nbytes
            if offset is not None:
                rec.served.add(offset, offset + nbytes)
            return rec

    def refused(self, ref_id: str, site: str, code: str) -> None:
        """`site` asked for `ref_id` and was turned away with return code `code`."""
        with self._lock:
            ref = self.refs.get(ref_id)
            if ref is not None and (site in ref.refused or len(ref.refused) < MAX_REFUSED):
                ref.refused[site] = code

    def covered(self, ref_id: str, site: str, size: int) -> bool:
        """Whether `site` was served every byte of `ref_id` (of `size` bytes)."""
        with self._lock:
            ref = self.refs.get(ref_id)
            rec = ref.sites.get(site) if ref is not None else None
            if rec is None:
                return size == 0
            return rec.served.covers(0, size)

    def ended(self, ref_id: str, site: str, state: str, reason: str, now: float) -> bool:
        """`site` finished, failed or cancelled `ref_id`; True if every goal is now met."""
        with self._lock:
            ref = self.refs.get(ref_id)
            if ref is None:
                return False
            rec = ref.sites.setdefault(site, SiteRecord(started=now))
            if rec.state != "finished":
                rec.state, rec.reason, rec.ended = state, reason, now
            return self._complete()

    def close(self, status: str) -> bool:
        """End the outcome with `status`; False if it had ended already."""
        with self._lock:
            if self.status != TransferStatus.RUNNING:
                return False
            self.status = status
            for ref in self.refs.values():
                for rec in ref.sites.values():
                    if rec.state == "in_progress":
                        rec.state, rec.reason = "failed", f"transaction ended ({status})"
        self._ended.set()
        return True

    # -- reading ------------------------------------------------------------

    def _complete(self) -> bool:
        if self.expected is None and self.num_sites is None:
            return False
        for ref in self.refs.values():
            done = set(ref.finished)
            if self.expected is not None and not self.expected <= done:
                return False
            if self.num_sites is not None and len(done) < self.num_sites:
                return False
        return bool(self.refs)

    @property
    def complete(self) -> bool:
        """Every object reached every named site (or `num_sites` sites)."""
        with self._lock:
            return self._complete()

    @property
    def min_met(self) -> bool:
        """Every object reached at least `min_sites` sites (True if no minimum was set)."""
        with self._lock:
            if self.min_sites is None:
                return True
            return all(len(r.finished) >= self.min_sites for r in self.refs.values())

    def never_came(self, ref_id: str) -> list[str]:
        """Named sites that never asked for `ref_id` (empty if no sites were named)."""
        with self._lock:
            ref = self.refs.get(ref_id)
            if self.expected is None or ref is None:
                return []
            return sorted(self.expected - set(ref.sites))

    def wait(self, timeout: float | None = None) -> TransferOutcome:
        """Block until the transaction ends or `timeout` seconds pass; return self.

        Check :attr:`status`: still ``running`` if the wait timed out.
        """
        self._ended.wait(timeout)
        return self

    def summary(self) -> dict[str, dict[str, list[str] | dict[str, str]]]:
        """Per ref: finished, failed (with reasons), in progress, never came, and the
        cells refused (with the return code they got)."""
        with self._lock:
            refs = list(self.refs.values())
            expected = self.expected
        return {
            r.ref_id: {
                "finished": r.finished,
                "failed": r.failed,
                "in_progress": r.in_progress,
                "never_came": sorted(expected - set(r.sites)) if expected is not None else [],
                "refused": dict(sorted(r.refused.items())),
            }
            for r in refs
        }

    def __repr__(self) -> str:
        return f"TransferOutcome({self.tx_id!r}, status={self.status!r}, refs={len(self.refs)})"


class Track:
    """A transaction's goals and observers: outcome, allowed sites, callbacks.

    Args:
        outcome: where events are recorded.
        allowed: the only sites that may download (None: any cell).
        done_cb: ``done_cb(tx_id, status, outcome)`` once, when the transaction ends.
        progress_cb: ``progress_cb(ref_id, site, bytes_done, bytes_total, rate)`` at
            most every `progress_interval` seconds per (ref, site), and at the end.
        secure: serve only requests that came sealed end to end (``secure=True``).
    """

    def __init__(
        self,
        outcome: TransferOutcome,
        allowed: Iterable[str] | None = None,
        done_cb: Callable[..., Any] | None = None,
        progress_cb: Callable[..., Any] | None = None,
        progress_interval: float = 0.5,
        secure: bool = False,
    ) -> None:
        if not isinstance(secure, bool):
            raise TypeError(f"secure must be a bool, got {type(secure).__name__}")
        for name, cb in (("done_cb", done_cb), ("progress_cb", progress_cb)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable, got {type(cb).__name__}")
        self.outcome = outcome
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.secure = secure
        self.done_cb = done_cb
        self.progress_cb = progress_cb
        self.progress_interval = progress_interval
        self._next: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def allows(self, site: str) -> bool:
        return self.allowed is None or site in self.allowed

    def progress_due(self, ref_id: str, site: str, now: float, final: bool = False) -> bool:
        """Whether to report progress now (rate-limited per ref and site)."""
        if self.progress_cb is None:
            return False
        key = (ref_id, site)
        with self._lock:
            if not final and now < self._next.get(key, float("-inf")):
                return False
            self._next[key] = now + self.progress_interval
            return True
