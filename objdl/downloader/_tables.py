"""The owner's tables of transactions and refs, with no threads and no sockets.

How it works: a transaction holds refs (objects offered for download) and a
producer. Every accepted request on any of its refs (from an allowed site, sealed if the
transaction is secure) restarts its inactivity clock; once
``timeout`` seconds pass with no request, the transaction expires. All three tables
(transactions, refs, finished downloads) are changed only under the table's lock;
callers get removed transactions back and run callbacks outside the lock.

The finished table remembers, for a short while, which requester already reached EOF
on which ref, so a retried final request gets EOF again (and no second callback)
even after its transaction is gone.
"""

from __future__ import annotations

import hashlib
import math
import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from objdl.downloader._defs import Producer
from objdl.downloader._outcome import Track, TransferOutcome

__all__ = ["Ref", "Transaction", "TransactionTable", "new_id"]

FINISHED_TTL = 120.0
FINISHED_MAX = 100_000


def new_id(prefix: str) -> str:
    """A fresh, unguessable id: `prefix` and a random UUID (122 random bits)."""
    return prefix + str(uuid.uuid4())


def _fingerprint(state: Any) -> bytes:
    """A 16-byte stand-in for a request's state, so the finished table stays small
    whatever a site puts in its final request."""
    try:
        packed = msgpack.packb(state, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = repr(state).encode()
    return hashlib.blake2b(packed, digest_size=16).digest()


class Ref:
    """One object offered for download within a transaction."""

    __slots__ = ("cb_kwargs", "obj", "obj_downloaded_cb", "rid", "tx")

    def __init__(
        self,
        tx: Transaction,
        obj: Any,
        ref_id: str | None = None,
        obj_downloaded_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> None:
        self.rid = ref_id or new_id("R")
        self.tx = tx
        self.obj = obj
        self.obj_downloaded_cb = obj_downloaded_cb
        self.cb_kwargs = cb_kwargs


class Transaction:
    """A producer, its refs, and an inactivity timeout with its callback."""

    __slots__ = (
        "cb_kwargs",
        "last_active",
        "producer",
        "refs",
        "tid",
        "timeout",
        "timeout_cb",
        "track",
    )

    def __init__(
        self,
        producer: Producer,
        timeout: float,
        now: float,
        tx_id: str | None = None,
        timeout_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> None:
        if not isinstance(producer, Producer):
            raise TypeError(f"producer must be a Producer, got {type(producer).__name__}")
        if timeout_cb is not None and not callable(timeout_cb):
            raise TypeError(f"timeout_cb must be callable, got {type(timeout_cb).__name__}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.tid = tx_id or new_id("T")
        self.producer = producer
        self.timeout = float(timeout)
        self.timeout_cb = timeout_cb
        self.cb_kwargs = cb_kwargs
        self.last_active = now
        self.refs: list[Ref] = []
        self.track = Track(TransferOutcome(self.tid))

    @property
    def deadline(self) -> float:
        return self.last_active + self.timeout


class TransactionTable:
    """Transactions, refs and finished downloads, each touched only under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._txs: dict[str, Transaction] = {}
        self._refs: dict[str, Ref] = {}
        self._withdrawn: dict[str, tuple[float, str]] = {}  # ref id -> (expiry, reason)
        self._finished: dict[tuple[str, str], tuple[float, Any]] = {}  # -> (expiry, state)

    def __len__(self) -> int:
        with self._lock:
            return len(self._txs)

    def add_transaction(self, tx: Transaction) -> None:
        with self._lock:
            if tx.tid in self._txs:
                raise ValueError(f"transaction {tx.tid!r} already exists")
            self._txs[tx.tid] = tx

    def get_transaction(self, tx_id: str) -> Transaction | None:
        with self._lock:
            return self._txs.get(tx_id)

    def add_ref(self, tx_id: str, make: Callable[[Transaction], Ref]) -> Ref:
        """Create a ref with ``make(tx)`` and add it to transaction `tx_id`.

        Raises:
            ValueError: no such transaction, or the ref id is already in use.
        """
        with self._lock:
            tx = self._txs.get(tx_id)
            if tx is None:
                raise ValueError(f"no such transaction {tx_id!r} (deleted or timed out?)")
            ref = make(tx)
            if ref.rid in self._refs:
                raise ValueError(f"ref id {ref.rid!r} is already in use")
            tx.refs.append(ref)
            self._refs[ref.rid] = ref
            tx.track.outcome.add_ref(ref.rid)
            return ref

    def get_ref(self, ref_id: str) -> Ref | None:
        """The ref, or None if unknown; its transaction's clock is left alone."""
        with self._lock:
            return self._refs.get(ref_id)

    def touch(self, ref_id: str, now: float) -> Ref | None:
        """The ref, with its transaction marked active at `now`; None if unknown.

        Call it only for a request the owner accepts (see :meth:`get_ref`).
        """
        with self._lock:
            ref = self._refs.get(ref_id)
            if ref is not None:
                ref.tx.last_active = now
            return ref

    def pop_transaction(self, tx_id: str) -> Transaction | None:
        with self._lock:
            tx = self._txs.pop(tx_id, None)
            if tx is not None:
                self._drop_refs(tx)
            return tx

    def pop_ref(self, ref_id: str, reason: str, now: float) -> Ref | None:
        """Withdraw one ref from its transaction; later requests learn `reason`."""
        with self._lock:
            ref = self._refs.pop(ref_id, None)
            if ref is not None:
                ref.tx.refs.remove(ref)
                self._withdrawn[ref_id] = (now + FINISHED_TTL, reason)
                if len(self._withdrawn) > FINISHED_MAX:
                    del self._withdrawn[next(iter(self._withdrawn))]
            return ref

    def withdrawn(self, ref_id: str, now: float) -> str | None:
        """The reason `ref_id` was withdrawn, if it was (recently)."""
        with self._lock:
            entry = self._withdrawn.get(ref_id)
            return entry[1] if entry is not None and entry[0] > now else None

    def pop_all(self) -> list[Transaction]:
        with self._lock:
            txs = list(self._txs.values())
            self._txs.clear()
            self._refs.clear()
            return txs

    def pop_expired(self, now: float) -> list[Transaction]:
        """Remove and return every transaction whose inactivity deadline has passed."""
        with self._lock:
            expired = [tx for tx in self._txs.values() if now >= tx.deadline]
            for tx in expired:
                del self._txs[tx.tid]
                self._drop_refs(tx)
            return expired

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((tx.deadline for tx in self._txs.values()), default=None)

    def record_finished(self, ref_id: str, requester: str, now: float, state: Any = None) -> bool:
        """Remember that `requester` reached EOF on `ref_id` with request `state`.

        Returns False if it already had (within the TTL), so callers call back once.
        """
        key = (ref_id, requester)
        fingerprint = _fingerprint(state)  # (the site chose the state: not under the lock)
        with self._lock:
            if key in self._finished and self._finished[key][0] > now:
                return False
            self._finished.pop(key, None)  # re-insert at the end: the dict stays oldest-first
            if len(self._finished) >= FINISHED_MAX:
                self._prune(now)
            self._finished[key] = (now + FINISHED_TTL, fingerprint)
            return True

    def finished(self, ref_id: str, requester: str, now: float, state: Any = None) -> bool:
        """True if this is a repeat of the request that reached EOF (same `state`).

        A new download of a finished ref starts with another state, so it is not
        mistaken for a retry and given an empty object.
        """
        with self._lock:
            entry = self._finished.get((ref_id, requester))
        # Hashed outside the lock: its state is whatever the site sent.
        return entry is not None and entry[0] > now and entry[1] == _fingerprint(state)

    def _prune(self, now: float) -> None:
        for key in [k for k, (t, _) in self._finished.items() if t <= now]:
            del self._finished[key]
        while len(self._finished) >= FINISHED_MAX:  # all fresh: drop the oldest
            del self._finished[next(iter(self._finished))]

    def _drop_refs(self, tx: Transaction) -> None:
        for r in tx.refs:
            self._refs.pop(r.rid, None)
