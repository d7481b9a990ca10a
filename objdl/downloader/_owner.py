"""The owner's side: ObjDownloader, its request handler and its timeout monitor.

How it works: each cell that offers objects gets one ``_OwnerState``: a
:class:`TransactionTable`, the request handler registered on the cell, and a monitor
thread that sleeps until the earliest transaction deadline (at most a second at a
time) and expires what is due. ``ObjDownloader``'s classmethods keep the seed's
signatures and find the right cell's state through a process-wide index of
transaction ids; the tables themselves are per cell. Callbacks always run outside
every lock, and their exceptions are logged, never raised into the handler.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from objdl import fqcn as _fqcn
from objdl._logutil import RateLimitedLog, peer_text
from objdl.cell import CellLike, check_cell, clock_of
from objdl.downloader._budget import MAX_INFLIGHT_PER_SITE, MAX_INFLIGHT_TOTAL, InFlight
from objdl.downloader._defs import (
    OBJ_DOWNLOADER_CHANNEL,
    OBJ_DOWNLOADER_TOPIC,
    DownloadStatus,
    InvalidStateError,
    Producer,
    ProduceRC,
    _PropKey,
)
from objdl.downloader._outcome import Track, TransferOutcome, TransferStatus
from objdl.downloader._tables import Ref, Transaction, TransactionTable
from objdl.downloader.sized import SizedProducer
from objdl.message import Message, MessageHeaderKey, ReturnCode, make_reply

__all__ = [
    "MAX_INFLIGHT_PER_SITE",
    "MAX_INFLIGHT_TOTAL",
    "MAX_REF_ID",
    "ObjDownloader",
    "is_secure",
    "producer_of",
]

log = logging.getLogger("objdl.downloader")
_rlog = RateLimitedLog(log)

_registry_lock = threading.Lock()
_create_lock = threading.Lock()  # held while a cell's _OwnerState is made
_states: dict[int, _OwnerState] = {}  # id(cell) -> its state
_tx_index: dict[str, _OwnerState] = {}  # tx id -> the state that holds it

_MONITOR_MAX_SLEEP = 1.0
MAX_REF_ID = 256  # longer ref ids are refused unread (ours are 37 characters)


def _run_cb(what: str, cb: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        cb(*args, **kwargs)
    except Exception:
        log.exception("%s callback %r raised; ignored", what, cb)


class _OwnerState:
    """One cell's transactions, handler and monitor."""

    def __init__(self, cell: CellLike, clock: Callable[[], float] | None = None) -> None:
        self.cell = cell
        self.clock = clock_of(cell) if clock is None else clock
        # A cell with a data socket (Cell(data_bind=...)) offers sites a direct link.
        self.link_offer: Callable[[str], dict | None] | None = getattr(cell, "link_offer", None)
        self.table = TransactionTable()
        self.inflight = InFlight(MAX_INFLIGHT_PER_SITE, MAX_INFLIGHT_TOTAL)
        self._cond = threading.Condition()
        self._monitor: threading.Thread | None = None
        self._closing = False
        # A test clock (objdl.testing.FakeClock) moves when the test says: expire on the
        # thread that moves it, so the timeouts it passes have happened when it returns.
        on_advance = getattr(self.clock, "on_advance", None)
        self._unwatch = on_advance(self.expire_due) if callable(on_advance) else None
        cell.register_request_cb(OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, self.handle)
        cell.add_stop_callback(self.close)

    # -- monitor ------------------------------------------------------------

    def wake_monitor(self) -> None:
        with self._cond:
            if self._closing:
                return
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = threading.Thread(
                    target=self._monitor_loop, name=f"objdl-{self.cell.fqcn}-txmonitor", daemon=True
                )
                self._monitor.start()
            self._cond.notify_all()

    def _monitor_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    deadline = self.table.next_deadline()
                    wait = _MONITOR_MAX_SLEEP if deadline is None else deadline - self.clock()
                    if wait <= 0:
                        break
                    self._cond.wait(min(wait, _MONITOR_MAX_SLEEP))
            self.expire_due()

    def expire_due(self) -> None:
        """End the transactions whose deadline has passed, with their callbacks."""
        self.finish(self.table.pop_expired(self.clock()), True, TransferStatus.TIMEOUT)

    def stop_monitor(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout)
        with self._cond:
            self._closing = False
            self._monitor = None

    def close(self) -> None:
        """The cell stopped: end the monitor, end every transaction (with callbacks)."""
        if self._unwatch is not None:
            self._unwatch()
        self.stop_monitor()
        self.finish(self.table.pop_all(), True, TransferStatus.DELETED)
        with _registry_lock:
            if _states.get(id(self.cell)) is self:
                del _states[id(self.cell)]

    # -- transactions -------------------------------------------------------

    def finish(
        self, txs: list[Transaction], call_cb: bool, status: str = TransferStatus.DELETED
    ) -> None:
        """Transactions already removed from the table: unindex, release, call back."""
        with _registry_lock:
            for tx in txs:
                if _tx_index.get(tx.tid) is self:
                    del _tx_index[tx.tid]
        for tx in txs:
            for ref in tx.refs:
                _run_cb("producer release", tx.producer.release, ref.rid, ref.obj)
            if call_cb and tx.timeout_cb is not None:
                objs = [r.obj for r in tx.refs]
                _run_cb("timeout", tx.timeout_cb, tx.tid, objs, **tx.cb_kwargs)
            track = tx.track
            if track.outcome.close(status) and track.done_cb is not None:
                _run_cb("done", track.done_cb, tx.tid, status, track.outcome)

    # -- the request handler --------------------------------------------------

    def handle(self, request: Message) -> Message:
        requester = request.get_header(MessageHeaderKey.ORIGIN)
        payload = request.payload
        rid = payload.get(_PropKey.REF_ID) if isinstance(payload, dict) else None
        if not isinstance(rid, str) or not rid or len(rid) > MAX_REF_ID:
            _rlog.log(
                logging.WARNING, "badreq", "download request without a ref id from %s", requester
            )
            return make_reply(
                ReturnCode.INVALID_REQUEST,
                f"download request needs a dict payload with a 'ref_id' str of 1 to "
                f"{MAX_REF_ID} characters",
            )
        state = payload.get(_PropKey.STATE)
        if state is not None and not isinstance(state, dict):
            return make_reply(ReturnCode.INVALID_REQUEST, "download request 'state' must be a dict")
        now = self.clock()
        ref = self.table.get_ref(rid)
        if ref is None:
            return self._no_ref(rid, requester, state, now)
        refused = self._refuse(ref, requester, request)
        if refused is not None:
            return refused  # not activity: a refused cell cannot keep a transaction alive
        if self.table.touch(rid, now) is None:  # withdrawn or ended meanwhile
            return self._no_ref(rid, requester, state, now)
        cancel = payload.get(_PropKey.CANCEL)
        if cancel is not None:
            why = (
                peer_text(cancel, 200) if isinstance(cancel, str) else f"({type(cancel).__name__})"
            )
            self._ended(ref, requester, "cancelled", f"cancelled by the site: {why}", now)
            return make_reply(ReturnCode.OK, body={_PropKey.STATUS: ProduceRC.EOF})
        if state is None or "ok" not in state:  # a final request carries no data: never held up
            busy = self.inflight.full(requester)
            if busy is not None:
                return self._busy(rid, requester, busy)
        producer = ref.tx.producer
        try:
            rc, data, new_state = producer.produce(rid, ref.obj, state, requester)  # type: ignore[arg-type]
        except InvalidStateError as exc:
            if self.table.withdrawn(rid, now) is not None:  # withdrawn while we served it
                return self._no_ref(rid, requester, state, now)
            _rlog.log(
                logging.WARNING, "badstate", "bad request for %s from %s: %s", rid, requester, exc
            )
            return make_reply(ReturnCode.INVALID_REQUEST, str(exc))
        except Exception as exc:
            log.exception(
                "producer %s failed on ref %s for %s", type(producer).__name__, rid, requester
            )
            return make_reply(
                ReturnCode.PROCESS_EXCEPTION,
                f"producer {type(producer).__name__} raised {type(exc).__name__}: {exc}",
            )
        if rc == ProduceRC.OK:
            data, busy = self.inflight.charge(requester, data)
            if busy is not None:
                return self._busy(rid, requester, busy)
            self._served(ref, requester, state, data, new_state, now)
            body = {_PropKey.STATUS: rc, _PropKey.STATE: new_state, _PropKey.DATA: data}
            if state is None or "offset" not in state:  # a first request: offer a link
                offer = self.link_offer(requester) if self.link_offer is not None else None
                if offer is not None:
                    body[_PropKey.DIRECT] = offer
            return make_reply(ReturnCode.OK, body=body)
        if rc == ProduceRC.EOF:
            short = self._not_delivered(ref, requester)
            if short is not None:
                track = ref.tx.track
                track.outcome.ended(rid, requester, "failed", short, now)
                _rlog.log(logging.WARNING, "undelivered", "%s", short)
                return make_reply(ReturnCode.INVALID_REQUEST, short)
            if self.table.record_finished(rid, requester, now, state):
                self._ended(ref, requester, "finished", "", now)
            return make_reply(ReturnCode.OK, body={_PropKey.STATUS: rc})
        if rc == ProduceRC.ERROR:
            error = data[:500] if isinstance(data, str) else ""
            self._ended(ref, requester, "failed", error or "producer error", now)
            return make_reply(ReturnCode.OK, body={_PropKey.STATUS: rc, _PropKey.ERROR: error})
        log.error("producer %s returned unknown code %r", type(producer).__name__, rc)
        return make_reply(
            ReturnCode.PROCESS_EXCEPTION, f"producer returned unknown return code {rc!r}"
        )

    def _refuse(self, ref: Ref, requester: str, request: Message) -> Message | None:
        """The reply for a request the transaction does not accept, or None."""
        track = ref.tx.track
        if not track.allows(requester):
            track.outcome.refused(ref.rid, requester, ReturnCode.UNAUTHENTICATED)
            _rlog.log(
                logging.WARNING, "denied", "%s may not download %s; refused", requester, ref.rid
            )
            return make_reply(
                ReturnCode.UNAUTHENTICATED,
                f"cell {requester} is not allowed to download {ref.rid} from {self.cell.fqcn}",
            )
        # The cell sets SECURE on every request it hands a handler: True only for one
        # that arrived sealed and was opened and authenticated (a sender cannot forge it).
        if track.secure and request.get_header(MessageHeaderKey.SECURE) is not True:
            track.outcome.refused(ref.rid, requester, ReturnCode.AUTHENTICATION_ERROR)
            _rlog.log(
                logging.WARNING,
                "plaintext",
                "plaintext request for %s from %s refused: its transaction is secure",
                ref.rid,
                requester,
            )
            return make_reply(
                ReturnCode.AUTHENTICATION_ERROR,
                f"{self.cell.fqcn} serves {ref.rid} only to sealed requests: download it "
                "with secure=True (with end-to-end keys)",
            )
        return None

    def _busy(self, rid: str, requester: str, reason: str) -> Message:
        _rlog.log(
            logging.INFO, "busy", "request for %s from %s held back: %s", rid, requester, reason
        )
        return make_reply(
            ReturnCode.SERVICE_UNAVAILABLE, f"owner {self.cell.fqcn} is busy: {reason}"
        )

    def _not_delivered(self, ref: Ref, requester: str) -> str | None:
        """Why `requester` may not count `ref` as delivered (not served every byte), or None."""
        producer = ref.tx.producer
        if not isinstance(producer, SizedProducer):
            return None  # the generic exchange: the producer decides when it is done
        try:
            size = producer.prepare(ref.rid, ref.obj)["size"]
        except Exception as exc:
            return f"ref {ref.rid} cannot be checked for delivery to {requester}: {exc}"
        if ref.tx.track.outcome.covered(ref.rid, requester, size):
            return None
        return (
            f"{requester} claimed to have ref {ref.rid} ({size} bytes) but {self.cell.fqcn} "
            "has not served it every byte; not counted as delivered"
        )

    def _no_ref(self, rid: str, requester: str, state: Any, now: float) -> Message:
        if self.table.finished(rid, requester, now, state):
            return make_reply(ReturnCode.OK, body={_PropKey.STATUS: ProduceRC.EOF})
        reason = self.table.withdrawn(rid, now)
        if reason is not None:
            return make_reply(
                ReturnCode.INVALID_REQUEST, f"ref {rid} was withdrawn by {self.cell.fqcn}: {reason}"
            )
        shown = peer_text(rid, 64)
        _rlog.log(logging.WARNING, "noref", "no ref %s (asked by %s)", shown, requester)
        return make_reply(
            ReturnCode.INVALID_REQUEST,
            f"no such ref {rid[:64]!r} at {self.cell.fqcn}: never offered, or its "
            "transaction ended (timed out or deleted)",
        )

    def _served(
        self, ref: Ref, site: str, state: Any, data: Any, new_state: Any, now: float
    ) -> None:
        track = ref.tx.track
        if isinstance(new_state, dict) and (state is None or "offset" not in state):
            size = new_state.get("size")
            if isinstance(size, int) and "digest" in new_state:  # a sized object's description
                track.outcome.set_total(ref.rid, size)
        offset = None
        if isinstance(ref.tx.producer, SizedProducer):  # its producer checked the offset
            offset = state.get("offset", 0) if state is not None else 0
        rec = track.outcome.served(ref.rid, site, _nbytes(data), now, offset)
        if rec is not None and track.progress_due(ref.rid, site, now):
            self._progress(ref, site, rec.bytes_sent, rec.started, now)

    def _progress(self, ref: Ref, site: str, done: int, started: float, now: float) -> None:
        track = ref.tx.track
        total = track.outcome.refs[ref.rid].total
        rate = done / (now - started) if now > started else 0.0
        _run_cb("progress", track.progress_cb, ref.rid, site, done, total, rate)  # type: ignore[arg-type]

    def _ended(self, ref: Ref, site: str, state: str, reason: str, now: float) -> None:
        track = ref.tx.track
        status = DownloadStatus.SUCCESS if state == "finished" else DownloadStatus.FAILED
        self._downloaded(ref, site, status)
        complete = track.outcome.ended(ref.rid, site, state, reason, now)
        if track.progress_due(ref.rid, site, now, final=True):
            rec = track.outcome.refs[ref.rid].sites[site]
            self._progress(ref, site, rec.bytes_sent, rec.started, now)
        if complete:
            tx = self.table.pop_transaction(ref.tx.tid)
            if tx is not None:
                self.finish([tx], False, TransferStatus.FINISHED)

    def withdraw(self, ref_id: str, reason: str) -> bool:
        ref = self.table.pop_ref(ref_id, reason, self.clock())
        if ref is None:
            return False
        outcome = ref.tx.track.outcome
        for site in outcome.refs[ref_id].in_progress if ref_id in outcome.refs else []:
            outcome.ended(ref_id, site, "failed", f"withdrawn: {reason}", self.clock())
        _run_cb("producer release", ref.tx.producer.release, ref.rid, ref.obj)
        return True

    @staticmethod
    def _downloaded(ref: Ref, requester: str, status: str) -> None:
        if ref.obj_downloaded_cb is not None:
            _run_cb(
                "obj_downloaded",
                ref.obj_downloaded_cb,
                ref.rid,
                requester,
                status,
                ref.obj,
                **ref.cb_kwargs,
            )


def _nbytes(data: Any) -> int:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).nbytes
    if isinstance(data, (list, tuple)):
        return sum(_nbytes(d) for d in data)
    return 0


def _state_for(cell: CellLike) -> _OwnerState:
    """The one state of `cell`, made (and its handler registered) on first use.

    Making a state registers its handler on the cell, replacing any other: two states
    made at once for one cell would leave the cell serving one table while the
    registry kept the other. So states are made one at a time, under `_create_lock`
    (not `_registry_lock`, which the handler and stop callbacks take). An asyncio
    cell is served through its blocking face (:func:`objdl.cell.check_cell`).
    """
    cell = check_cell(cell)
    with _registry_lock:
        state = _states.get(id(cell))
        if state is not None and state.cell is cell:
            return state
    with _create_lock:
        with _registry_lock:
            state = _states.get(id(cell))
            if state is not None and state.cell is cell:
                return state
        state = _OwnerState(cell)
        with _registry_lock:
            _states[id(cell)] = state
        return state


def _state_of_tx(tx_id: str) -> _OwnerState | None:
    with _registry_lock:
        return _tx_index.get(tx_id)


def is_secure(tx_id: str) -> bool:
    """Whether a live transaction serves only sealed requests."""
    state = _state_of_tx(tx_id)
    tx = state.table.get_transaction(tx_id) if state is not None else None
    return tx is not None and tx.track.secure


def producer_of(tx_id: str) -> Producer | None:
    """The producer of a live transaction, or None."""
    state = _state_of_tx(tx_id)
    tx = state.table.get_transaction(tx_id) if state is not None else None
    return tx.producer if tx is not None else None


class ObjDownloader:
    """Offer large objects for download; the seed's API, with state kept per cell."""

    @classmethod
    def new_transaction(
        cls,
        cell: CellLike,
        producer: Producer,
        timeout: float,
        tx_id: str | None = None,
        timeout_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> str:
        """Start a transaction whose objects `producer` serves; return its id.

        After `timeout` seconds with no download request on any of its objects, the
        transaction ends and ``timeout_cb(tx_id, objs, **cb_kwargs)`` runs once.

        Raises:
            TypeError / ValueError: a bad argument, or `tx_id` already in use.
        """
        state = _state_for(cell)
        tx = Transaction(producer, timeout, state.clock(), tx_id, timeout_cb, **cb_kwargs)
        with _registry_lock:
            if tx.tid in _tx_index:
                raise ValueError(f"transaction {tx.tid!r} already exists")
            _tx_index[tx.tid] = state
        state.table.add_transaction(tx)
        state.wake_monitor()
        return tx.tid

    @classmethod
    def add_download_object(
        cls,
        transaction_id: str,
        obj: Any,
        ref_id: str | None = None,
        obj_downloaded_cb: Callable[..., Any] | None = None,
        **cb_kwargs: Any,
    ) -> str:
        """Offer `obj` within a transaction; return the ref id sites download it by.

        ``obj_downloaded_cb(ref_id, to_site, status, obj, **cb_kwargs)`` runs each
        time a site reaches the end (SUCCESS) or the producer reports an error (FAILED).

        Raises:
            ValueError: no such transaction, or `ref_id` already in use.
        """
        if obj_downloaded_cb is not None and not callable(obj_downloaded_cb):
            raise TypeError(
                f"obj_downloaded_cb must be callable, got {type(obj_downloaded_cb).__name__}"
            )
        state = _state_of_tx(transaction_id)
        if state is None:
            raise ValueError(f"no such transaction {transaction_id!r} (deleted or timed out?)")
        ref = state.table.add_ref(
            transaction_id, lambda tx: Ref(tx, obj, ref_id, obj_downloaded_cb, **cb_kwargs)
        )
        return ref.rid

    @classmethod
    def delete_transaction(cls, transaction_id: str, call_cb: bool = False) -> None:
        """End a transaction now; with `call_cb`, its timeout callback has run on return."""
        state = _state_of_tx(transaction_id)
        if state is None:
            return
        tx = state.table.pop_transaction(transaction_id)
        if tx is not None:
            state.finish([tx], call_cb, TransferStatus.DELETED)

    @classmethod
    def shutdown(cls) -> None:
        """End every transaction of every cell, calling their timeout callbacks.

        Cells can start new transactions afterwards.
        """
        with _registry_lock:
            states = list(_states.values())
        for state in states:
            state.stop_monitor()
            state.finish(state.table.pop_all(), True, TransferStatus.DELETED)

    @classmethod
    def track_transaction(
        cls,
        transaction_id: str,
        *,
        sites: Iterable[str] | None = None,
        num_sites: int | None = None,
        min_sites: int | None = None,
        allowed_sites: Iterable[str] | None = None,
        done_cb: Callable[..., Any] | None = None,
        progress_cb: Callable[..., Any] | None = None,
        progress_interval: float = 0.5,
        secure: bool = False,
    ) -> TransferOutcome:
        """Give a transaction goals and observers (not in the seed); return its outcome.

        Args:
            transaction_id: a live transaction.
            sites: cells that must each receive every object; once they all have,
                the transaction ends by itself with status ``finished``.
            num_sites: or: how many distinct cells must receive every object.
            min_sites: the fewest per object for :attr:`TransferOutcome.min_met`.
            allowed_sites: the only cells allowed to download (others get
                ``unauthenticated``); None allows any cell.
            done_cb: ``done_cb(tx_id, status, outcome)`` once when it ends
                (``finished``, ``timeout`` or ``deleted``).
            progress_cb: ``progress_cb(ref_id, site, bytes_done, bytes_total, rate)``,
                at most every `progress_interval` s per (ref, site) and at the end.
            secure: serve this transaction's objects only to requests that arrived
                sealed end to end (the site's ``download_object(..., secure=True)``);
                any other request gets ``authentication_error``. Needs the owner
                cell's ``curve_keys`` and ``peer_keys``.

        A sized object counts as delivered to a site (``finished``, SUCCESS
        callbacks, `sites`/`num_sites` goals) only once this owner served that site
        every byte of it; a final request without that is recorded as ``failed``.

        Raises:
            ValueError: no such transaction, or a bad site name or count.
        """
        state = _state_of_tx(transaction_id)
        tx = state.table.get_transaction(transaction_id) if state is not None else None
        if tx is None:
            raise ValueError(f"no such transaction {transaction_id!r} (deleted or timed out?)")
        for name in (*(sites or ()), *(allowed_sites or ())):
            _fqcn.validate(name)
        outcome = TransferOutcome(transaction_id, sites, num_sites, min_sites)
        for ref in list(tx.refs):
            outcome.add_ref(ref.rid)
        tx.track = Track(outcome, allowed_sites, done_cb, progress_cb, progress_interval, secure)
        return outcome

    @classmethod
    def set_inflight_limits(
        cls,
        cell: CellLike,
        per_site: int = MAX_INFLIGHT_PER_SITE,
        total: int = MAX_INFLIGHT_TOTAL,
    ) -> None:
        """Cap the chunk data `cell` holds that has not yet left the process (bytes).

        `per_site` bounds what is held for any one requesting cell, `total` what is
        held for all of them; a request beyond either is answered
        ``service_unavailable`` (objdl's own sites slow down and retry). Defaults:
        :data:`MAX_INFLIGHT_PER_SITE` (64 MiB) and :data:`MAX_INFLIGHT_TOTAL`
        (256 MiB), whatever window a site asks for.

        Raises:
            ValueError: a limit that is not a positive int.
        """
        _state_for(cell).inflight.set_limits(per_site, total)

    @classmethod
    def inflight_stats(cls, cell: CellLike) -> dict[str, Any]:
        """What `cell` holds now: ``held``, ``by_site``, ``peak``, ``peak_site``,
        ``rejected`` (requests answered ``service_unavailable``) and the two limits."""
        return _state_for(cell).inflight.stats()

    @classmethod
    def get_outcome(cls, transaction_id: str) -> TransferOutcome | None:
        """The outcome of a live transaction (keep it to read it after the end)."""
        state = _state_of_tx(transaction_id)
        tx = state.table.get_transaction(transaction_id) if state is not None else None
        return tx.track.outcome if tx is not None else None

    @classmethod
    def withdraw(cls, ref_id: str, reason: str = "withdrawn by its owner") -> bool:
        """Stop offering one object; sites still downloading it fail at their next request.

        Returns False if no cell offers `ref_id` (any more).
        """
        with _registry_lock:
            states = list(_states.values())
        return any(state.withdraw(ref_id, reason) for state in states)
