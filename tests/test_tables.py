"""Socket-free tests of the owner's tables (transactions, refs, finished downloads) and
of the retry policy, driven by an explicit fake clock."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objdl.downloader import _tables
from objdl.downloader._defs import Producer, ProduceRC, RetryPolicy
from objdl.downloader._tables import FINISHED_TTL, Ref, Transaction, TransactionTable, new_id

PROPERTY = settings(max_examples=100, deadline=None)
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


class _NullProducer(Producer):
    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        return ProduceRC.EOF, None, {}


class Clock:
    """A fake monotonic clock: time moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def tx(timeout: float = 10.0, now: float = 0.0, **kw: Any) -> Transaction:
    return Transaction(_NullProducer(), timeout, now, **kw)


def add_tx(table: TransactionTable, timeout: float = 10.0, now: float = 0.0, **kw: Any) -> str:
    t = tx(timeout, now, **kw)
    table.add_transaction(t)
    return t.tid


def add_ref(table: TransactionTable, tx_id: str, obj: Any = b"x", ref_id: str | None = None) -> Ref:
    return table.add_ref(tx_id, lambda t: Ref(t, obj, ref_id))


# --- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["T", "R"])
def test_new_id_is_prefix_and_random_uuid4(prefix: str) -> None:
    ids = [new_id(prefix) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:50]:
        assert re.fullmatch(prefix + UUID4, i), i
        assert uuid.UUID(i[1:]).version == 4  # random, not time/MAC based


def test_default_ids_of_transactions_and_refs() -> None:
    t = tx()
    r = Ref(t, b"obj")
    assert re.fullmatch("T" + UUID4, t.tid)
    assert re.fullmatch("R" + UUID4, r.rid)
    assert tx().tid != t.tid and Ref(t, b"obj").rid != r.rid


def test_given_ids_are_kept_and_empty_ref_id_means_generate() -> None:
    t = tx(tx_id="my-tx")
    assert t.tid == "my-tx"
    assert Ref(t, 1, "my-ref").rid == "my-ref"
    assert re.fullmatch("R" + UUID4, Ref(t, 1, "").rid)  # as the seed: falsy id -> generated


# --- Transaction validation ---------------------------------------------------------------


def test_transaction_keeps_its_arguments() -> None:
    p = _NullProducer()

    def cb(tx_id: str, objs: list[Any], **kw: Any) -> None:
        pass

    t = Transaction(p, 5, 100.0, "tid", cb, a=1, b="two")
    assert t.producer is p and t.timeout_cb is cb
    assert t.cb_kwargs == {"a": 1, "b": "two"}
    assert t.timeout == 5.0 and isinstance(t.timeout, float)
    assert t.last_active == 100.0 and t.deadline == 105.0
    assert t.refs == []


@pytest.mark.parametrize("producer", [None, object(), "producer", _NullProducer])
def test_transaction_rejects_non_producer(producer: Any) -> None:
    with pytest.raises(TypeError, match="producer must be a Producer"):
        Transaction(producer, 10.0, 0.0)


@pytest.mark.parametrize("cb", ["not callable", 42, object()])
def test_transaction_rejects_non_callable_timeout_cb(cb: Any) -> None:
    with pytest.raises(TypeError, match="timeout_cb must be callable"):
        Transaction(_NullProducer(), 10.0, 0.0, timeout_cb=cb)


@pytest.mark.parametrize(
    "timeout",
    # NaN once slipped through `timeout <= 0`: a NaN deadline never expires, and first in
    # the table it made next_deadline() NaN, so the owner's monitor spun and expired nothing.
    [0, 0.0, -1, -0.5, True, False, "10", None, [10], float("nan"), float("inf")],
)
def test_transaction_rejects_bad_timeout(timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Transaction(_NullProducer(), timeout, 0.0)


# --- TransactionTable: transactions and deadlines -----------------------------------------


def test_empty_table() -> None:
    table = TransactionTable()
    assert len(table) == 0
    assert table.next_deadline() is None
    assert table.pop_expired(1e18) == []
    assert table.pop_all() == []
    assert table.get_transaction("T-nope") is None
    assert table.pop_transaction("T-nope") is None
    assert table.touch("R-nope", 0.0) is None


def test_add_and_get_transaction_and_duplicate_id() -> None:
    table = TransactionTable()
    t = tx(tx_id="T1")
    table.add_transaction(t)
    assert len(table) == 1
    assert table.get_transaction("T1") is t
    with pytest.raises(ValueError, match=r"T1.*already exists"):
        table.add_transaction(tx(tx_id="T1"))
    assert table.get_transaction("T1") is t and len(table) == 1


def test_expiry_is_at_the_deadline_not_before() -> None:
    clock = Clock()
    table = TransactionTable()
    tid = add_tx(table, timeout=10.0, now=clock.now)
    deadline = clock.now + 10.0
    assert table.next_deadline() == deadline
    assert table.pop_expired(deadline - 1e-6) == []
    assert len(table) == 1
    expired = table.pop_expired(deadline)
    assert [t.tid for t in expired] == [tid]
    assert len(table) == 0 and table.get_transaction(tid) is None
    assert table.pop_expired(deadline + 100) == []  # gone: returned only once


def test_touch_restarts_the_clock_of_the_refs_transaction() -> None:
    clock = Clock()
    table = TransactionTable()
    tid = add_tx(table, timeout=10.0, now=clock.now)
    ref = add_ref(table, tid)
    start = clock.now
    assert table.touch(ref.rid, clock.advance(8.0)) is ref
    assert table.get_transaction(tid).last_active == start + 8.0  # type: ignore[union-attr]
    assert table.next_deadline() == start + 18.0
    assert table.pop_expired(clock.advance(9.0)) == []  # 17 s after start, 9 s idle
    expired = table.pop_expired(clock.advance(1.0))  # 10 s idle
    assert [t.tid for t in expired] == [tid]


def test_touch_only_moves_its_own_transaction() -> None:
    table = TransactionTable()
    a = add_tx(table, timeout=10.0, now=0.0)
    b = add_tx(table, timeout=10.0, now=0.0)
    ra = add_ref(table, a)
    add_ref(table, b)
    table.touch(ra.rid, 9.0)
    assert [t.tid for t in table.pop_expired(10.0)] == [b]
    assert table.next_deadline() == 19.0


def test_touch_of_an_unknown_ref_changes_nothing() -> None:
    table = TransactionTable()
    tid = add_tx(table, timeout=10.0, now=0.0)
    add_ref(table, tid)
    assert table.touch("R-unknown", 9.0) is None
    assert table.next_deadline() == 10.0


def test_next_deadline_is_the_earliest() -> None:
    table = TransactionTable()
    add_tx(table, timeout=30.0, now=0.0)
    b = add_tx(table, timeout=5.0, now=2.0)
    add_tx(table, timeout=10.0, now=1.0)
    assert table.next_deadline() == 7.0
    table.pop_transaction(b)
    assert table.next_deadline() == 11.0


def test_pop_expired_drops_refs_but_returns_them_on_the_transaction() -> None:
    table = TransactionTable()
    tid = add_tx(table, timeout=1.0, now=0.0)
    r1 = add_ref(table, tid, obj="one")
    r2 = add_ref(table, tid, obj="two")
    (expired,) = table.pop_expired(5.0)
    assert [r.obj for r in expired.refs] == ["one", "two"]  # for timeout_cb and release
    assert table.touch(r1.rid, 5.0) is None
    assert table.touch(r2.rid, 5.0) is None


def test_pop_transaction_removes_it_and_only_its_refs() -> None:
    table = TransactionTable()
    a = add_tx(table)
    b = add_tx(table)
    ra = add_ref(table, a)
    rb = add_ref(table, b)
    popped = table.pop_transaction(a)
    assert popped is not None and popped.tid == a and popped.refs == [ra]
    assert table.pop_transaction(a) is None
    assert table.touch(ra.rid, 1.0) is None
    assert table.touch(rb.rid, 1.0) is rb
    assert len(table) == 1


def test_pop_all_empties_everything() -> None:
    table = TransactionTable()
    ids = {add_tx(table) for _ in range(3)}
    refs = [add_ref(table, tid) for tid in ids]
    assert {t.tid for t in table.pop_all()} == ids
    assert len(table) == 0 and table.next_deadline() is None
    assert all(table.touch(r.rid, 1.0) is None for r in refs)
    assert table.pop_all() == []


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.floats(0.001, 1e4, allow_nan=False),  # timeout
            st.floats(0.0, 1e4, allow_nan=False),  # created at
            st.floats(0.0, 1e4, allow_nan=False),  # touched this long after creation
        ),
        max_size=12,
    ),
    st.floats(0.0, 3e4, allow_nan=False),
)
def test_pop_expired_matches_a_model(txs: list[tuple[float, float, float]], now: float) -> None:
    table = TransactionTable()
    expected_deadline: dict[str, float] = {}
    for timeout, created, later in txs:
        tid = add_tx(table, timeout=timeout, now=created)
        ref = add_ref(table, tid)
        table.touch(ref.rid, created + later)
        expected_deadline[tid] = created + later + float(timeout)
    assert table.next_deadline() == min(expected_deadline.values(), default=None)
    expired = {t.tid for t in table.pop_expired(now)}
    assert expired == {tid for tid, d in expected_deadline.items() if now >= d}
    assert len(table) == len(txs) - len(expired)


# --- TransactionTable: refs ---------------------------------------------------------------


def test_add_ref_to_unknown_transaction_raises_without_calling_make() -> None:
    table = TransactionTable()
    called: list[Transaction] = []

    def make(t: Transaction) -> Ref:
        called.append(t)
        return Ref(t, b"x")

    with pytest.raises(ValueError, match="no such transaction"):
        table.add_ref("T-missing", make)
    assert called == []


def test_add_ref_links_ref_and_transaction() -> None:
    table = TransactionTable()
    tid = add_tx(table)
    r1 = add_ref(table, tid, obj="a", ref_id="R1")
    r2 = add_ref(table, tid, obj="b")
    t = table.get_transaction(tid)
    assert t is not None and t.refs == [r1, r2]
    assert r1.tx is t and r2.tx is t
    assert table.touch("R1", 3.0) is r1


def test_duplicate_ref_id_raises_and_leaves_the_first() -> None:
    table = TransactionTable()
    a = add_tx(table)
    b = add_tx(table)
    first = add_ref(table, a, obj="first", ref_id="R1")
    with pytest.raises(ValueError, match=r"R1.*already in use"):
        add_ref(table, a, obj="second", ref_id="R1")
    with pytest.raises(ValueError, match="already in use"):
        add_ref(table, b, obj="third", ref_id="R1")  # ref ids are table-wide
    assert table.get_transaction(a).refs == [first]  # type: ignore[union-attr]
    assert table.get_transaction(b).refs == []  # type: ignore[union-attr]
    assert table.touch("R1", 1.0) is first


def test_ref_id_is_free_again_once_its_transaction_is_gone() -> None:
    table = TransactionTable()
    a = add_tx(table, timeout=1.0, now=0.0)
    add_ref(table, a, ref_id="R1")
    table.pop_expired(10.0)
    b = add_tx(table, timeout=1.0, now=10.0)
    again = add_ref(table, b, ref_id="R1")
    assert table.touch("R1", 10.5) is again


def test_add_ref_to_an_expired_transaction_raises() -> None:
    table = TransactionTable()
    tid = add_tx(table, timeout=1.0, now=0.0)
    table.pop_expired(2.0)
    with pytest.raises(ValueError, match="no such transaction"):
        add_ref(table, tid)


def test_ref_keeps_callback_and_kwargs() -> None:
    t = tx()

    def cb(*a: Any, **kw: Any) -> None:
        pass

    r = Ref(t, "obj", "R9", cb, site="x", n=3)
    assert (r.rid, r.tx, r.obj, r.obj_downloaded_cb) == ("R9", t, "obj", cb)
    assert r.cb_kwargs == {"site": "x", "n": 3}


# --- TransactionTable: finished downloads -------------------------------------------------


def test_record_finished_is_true_once_within_the_ttl() -> None:
    table = TransactionTable()
    assert table.finished("R1", "site-1", 0.0) is False
    assert table.record_finished("R1", "site-1", 0.0) is True
    assert table.record_finished("R1", "site-1", 1.0) is False  # a retried final request
    assert table.record_finished("R1", "site-1", FINISHED_TTL - 0.001) is False
    assert table.finished("R1", "site-1", 50.0) is True


def test_finished_record_expires_after_the_ttl() -> None:
    table = TransactionTable()
    table.record_finished("R1", "site-1", 10.0)
    assert table.finished("R1", "site-1", 10.0 + FINISHED_TTL - 0.001) is True
    assert table.finished("R1", "site-1", 10.0 + FINISHED_TTL) is False
    assert table.record_finished("R1", "site-1", 10.0 + FINISHED_TTL) is True
    assert table.finished("R1", "site-1", 10.0 + 2 * FINISHED_TTL - 0.001) is True


def test_finished_is_per_ref_and_per_requester() -> None:
    table = TransactionTable()
    assert table.record_finished("R1", "site-1", 0.0) is True
    assert table.record_finished("R1", "site-2", 0.0) is True
    assert table.record_finished("R2", "site-1", 0.0) is True
    assert table.finished("R2", "site-2", 0.0) is False


def test_finished_answers_only_a_repeat_of_the_final_request() -> None:
    table = TransactionTable()
    final = {"offset": 9, "ok": True, "reason": ""}
    assert table.record_finished("R1", "site-1", 0.0, final) is True
    assert table.finished("R1", "site-1", 1.0, dict(final)) is True  # a retry, as decoded
    assert table.finished("R1", "site-1", 1.0, None) is False  # a new download's first request
    assert table.finished("R1", "site-1", 1.0, {"length": 7}) is False
    assert table.finished("R1", "site-1", 1.0, {"offset": 9}) is False
    assert table.finished("R1", "site-1", FINISHED_TTL, final) is False  # expired


def test_second_eof_within_the_ttl_is_not_recorded_again() -> None:
    table = TransactionTable()
    assert table.record_finished("R1", "site-1", 0.0, {"offset": 9}) is True
    assert table.record_finished("R1", "site-1", 5.0, {"offset": 9, "ok": True}) is False
    assert table.finished("R1", "site-1", 6.0, {"offset": 9}) is True  # the first one is kept


def test_finished_records_outlive_the_transaction() -> None:
    table = TransactionTable()
    tid = add_tx(table)
    ref = add_ref(table, tid)
    table.record_finished(ref.rid, "site-1", 1.0)
    table.pop_transaction(tid)
    assert table.touch(ref.rid, 2.0) is None
    assert table.finished(ref.rid, "site-1", 2.0) is True
    table.pop_all()
    assert table.finished(ref.rid, "site-1", 3.0) is True


def test_finished_table_is_bounded_dropping_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tables, "FINISHED_MAX", 4)
    table = TransactionTable()
    for i in range(10):
        assert table.record_finished(f"R{i}", "site", float(i)) is True
        assert len(table._finished) <= 4  # the bound itself is only visible inside
    now = 10.0  # all ten are still within their TTL
    assert [table.finished(f"R{i}", "site", now) for i in range(10)] == [False] * 6 + [True] * 4


def test_full_finished_table_prunes_expired_records_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_tables, "FINISHED_MAX", 3)
    table = TransactionTable()
    table.record_finished("old-1", "s", 0.0)
    table.record_finished("fresh", "s", 100.0)
    table.record_finished("old-2", "s", 1.0)
    now = 1.0 + FINISHED_TTL  # both olds have expired, "fresh" has not
    assert table.record_finished("new", "s", now) is True
    assert len(table._finished) == 2
    assert table.finished("fresh", "s", now) is True  # kept though inserted before old-2
    assert table.finished("new", "s", now) is True


def test_full_finished_table_drops_the_oldest_record(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: re-recording an expired key used to keep its old dict position, so
    # "drop the oldest" dropped the newest record instead.
    monkeypatch.setattr(_tables, "FINISHED_MAX", 3)
    table = TransactionTable()
    table.record_finished("A", "s", 0.0)  # expires at TTL
    table.record_finished("B", "s", 100.0)
    table.record_finished("A", "s", FINISHED_TTL + 10.0)  # A again, after its record expired
    table.record_finished("C", "s", FINISHED_TTL + 20.0)
    now = FINISHED_TTL + 30.0  # A, B, C all fresh and the table is full
    table.record_finished("D", "s", now)
    assert table.finished("B", "s", now) is False  # B (recorded at 100) is the oldest
    assert table.finished("A", "s", now) is True


# --- RetryPolicy --------------------------------------------------------------------------


def test_retry_policy_defaults_and_doubling() -> None:
    p = RetryPolicy()
    assert (p.tries, p.backoff, p.backoff_max) == (3, 0.5, 4.0)
    assert [p.delay(a) for a in range(2, 8)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_retry_policy_first_retry_waits_backoff() -> None:
    p = RetryPolicy(tries=5, backoff=0.25, backoff_max=100.0)
    assert p.delay(2) == 0.25
    assert p.delay(3) == 0.5
    assert p.delay(6) == 4.0


def test_retry_policy_zero_backoff_never_waits() -> None:
    p = RetryPolicy(tries=4, backoff=0.0, backoff_max=10.0)
    assert all(p.delay(a) == 0.0 for a in range(1, 20))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tries": 0}, "tries"),
        ({"tries": -3}, "tries"),
        ({"backoff": -0.1}, "negative"),
        ({"backoff_max": -1.0}, "negative"),
    ],
)
def test_retry_policy_rejects_bad_settings(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kw)


def test_retry_policy_is_frozen() -> None:
    import dataclasses

    p = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tries = 10  # type: ignore[misc]


@PROPERTY
@given(
    st.floats(0.0, 100.0, allow_nan=False),
    st.floats(0.0, 1000.0, allow_nan=False),
    st.integers(2, 200),
)
def test_retry_delay_doubles_up_to_the_cap(backoff: float, cap: float, attempt: int) -> None:
    p = RetryPolicy(tries=3, backoff=backoff, backoff_max=cap)
    d = p.delay(attempt)
    assert 0.0 <= d <= cap
    assert p.delay(attempt + 1) >= d  # never shrinks
    assert d == min(backoff * 2 ** (attempt - 2), cap)
