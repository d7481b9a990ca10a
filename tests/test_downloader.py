"""The seed's Object Downloader behaviours.

Most run on objdl.testing's fake network (request/reply semantics, a clock the test
moves, faults instead of slow producers); those that prove the real shells (the
monitor thread's own timing, an abort while a real cell waits) stay on a real broker,
and the basic exchange runs on both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from objdl.cell import Cell, CellLike
from objdl.downloader import (
    Consumer,
    DownloadStatus,
    ObjDownloader,
    Producer,
    ProduceRC,
    download_object,
)
from objdl.message import MessageType, Signal
from objdl.testing import FakeCell, FakeNetwork
from tests.conftest import wait_for


class ListProducer(Producer):
    """Serves a list of small items, one per request; state {"i": next index}."""

    def __init__(self) -> None:
        super().__init__()
        self.requesters: list[str] = []
        self.calls = 0

    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        self.calls += 1
        self.requesters.append(requester)
        i = (state or {}).get("i", 0)
        if i >= len(obj):
            return ProduceRC.EOF, None, {}
        return ProduceRC.OK, obj[i], {"i": i + 1}


class ListConsumer(Consumer):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[Any] = []
        self.completed = False
        self.failed: str | None = None

    def consume(self, ref_id: str, state: dict, data: Any) -> dict:
        self.items.append(data)
        return state

    def download_completed(self, ref_id: str) -> None:
        self.completed = True

    def download_failed(self, ref_id: str, reason: str) -> None:
        self.failed = reason


def fetch(site: CellLike, ref: str, consumer: Consumer | None = None, **kw: Any) -> ListConsumer:
    c = consumer or ListConsumer()
    kw.setdefault("per_request_timeout", 5.0)
    timeout = kw.pop("per_request_timeout")
    download_object("server", ref, timeout, site, c, **kw)
    assert isinstance(c, ListConsumer)
    return c


def test_download_and_callback_arguments(any_cells: tuple[CellLike, CellLike]) -> None:
    owner, site = any_cells
    calls: list[tuple[Any, ...]] = []
    producer = ListProducer()
    tx = ObjDownloader.new_transaction(owner, producer, 30.0)
    items = ["a", b"b", {"c": 1}]

    def downloaded(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))

    ref = ObjDownloader.add_download_object(tx, items, obj_downloaded_cb=downloaded, tag="x")
    c = fetch(site, ref)
    assert c.completed and c.failed is None
    assert c.items == items
    # Positional arguments in the seed's order: ref_id, to_site, status, obj; then cb_kwargs.
    assert calls == [((ref, "site-1", DownloadStatus.SUCCESS, items), {"tag": "x"})]
    # The requester is the broker-stamped origin.
    assert set(producer.requesters) == {"site-1"}


def test_explicit_ids_are_used(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    owner, site = fake_cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0, tx_id="T-mine")
    assert tx == "T-mine"
    assert ObjDownloader.add_download_object(tx, [1], ref_id="R-mine") == "R-mine"
    with pytest.raises(ValueError, match="already"):
        ObjDownloader.add_download_object(tx, [2], ref_id="R-mine")
    with pytest.raises(ValueError, match="already exists"):
        ObjDownloader.new_transaction(owner, ListProducer(), 30.0, tx_id="T-mine")
    assert fetch(site, "R-mine").items == [1]


def test_bad_arguments_raise(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    owner, _ = fake_cells
    with pytest.raises(TypeError, match="Producer"):
        ObjDownloader.new_transaction(owner, object(), 30.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        ObjDownloader.new_transaction(owner, ListProducer(), 0)
    with pytest.raises(TypeError, match="callable"):
        ObjDownloader.new_transaction(owner, ListProducer(), 1.0, timeout_cb=5)
    with pytest.raises(ValueError, match="no such transaction"):
        ObjDownloader.add_download_object("T-none", [1])
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    with pytest.raises(TypeError, match="callable"):
        ObjDownloader.add_download_object(tx, [1], obj_downloaded_cb="nope")  # type: ignore[arg-type]


def test_inactivity_timeout_calls_timeout_cb_once(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    fired: list[tuple[Any, ...]] = []
    t0 = time.monotonic()
    tx = ObjDownloader.new_transaction(
        owner,
        ListProducer(),
        0.5,
        timeout_cb=lambda *a, **k: fired.append((a, k, time.monotonic())),
        n=7,
    )
    ref = ObjDownloader.add_download_object(tx, ["x"])
    wait_for(lambda: fired, timeout=3)
    (args, kwargs, when), *_ = fired
    assert args == (tx, [["x"]]) and kwargs == {"n": 7}
    assert 0.5 <= when - t0 < 1.5  # within a second of the deadline, not every 5 s
    time.sleep(0.3)
    assert len(fired) == 1
    c = fetch(site, ref, tries=1)
    assert c.failed is not None and "invalid_request" in c.failed and "no such ref" in c.failed


def test_inactivity_timeout_is_at_the_deadline_on_the_cells_clock(
    fake_cells: tuple[FakeCell, FakeCell],
) -> None:
    owner, site = fake_cells
    clock = owner.clock
    fired: list[tuple[Any, ...]] = []
    t0 = clock()
    tx = ObjDownloader.new_transaction(
        owner, ListProducer(), 0.5, timeout_cb=lambda *a, **k: fired.append((a, k, clock())), n=7
    )
    ref = ObjDownloader.add_download_object(tx, ["x"])
    clock.advance_to(t0 + 0.499)
    assert fired == []  # not before the deadline
    clock.advance_to(t0 + 0.5)
    assert fired == [((tx, [["x"]]), {"n": 7}, t0 + 0.5)]  # at it, once
    clock.advance(3600.0)
    assert len(fired) == 1
    c = fetch(site, ref, tries=1)
    assert c.failed is not None and "invalid_request" in c.failed and "no such ref" in c.failed


def test_requests_restart_the_inactivity_clock(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    owner, site = fake_cells
    fired: list[str] = []

    class Slow(ListProducer):
        def produce(self, *a: Any) -> tuple[str, Any, dict]:
            owner.clock.advance(0.1)  # each request takes 0.1 s of the owner's time
            return super().produce(*a)

    tx = ObjDownloader.new_transaction(owner, Slow(), 0.6, timeout_cb=lambda t, o: fired.append(t))
    ref = ObjDownloader.add_download_object(tx, list(range(12)))  # 1.3 s of requests
    c = fetch(site, ref)
    assert c.completed and c.items == list(range(12))
    assert fired == []
    owner.clock.advance(0.6)
    assert fired == [tx]


def test_delete_transaction_with_and_without_callback(
    fake_cells: tuple[FakeCell, FakeCell],
) -> None:
    owner, site = fake_cells
    fired: list[str] = []
    tx1 = ObjDownloader.new_transaction(
        owner, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
    )
    tx2 = ObjDownloader.new_transaction(
        owner, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
    )
    ref1 = ObjDownloader.add_download_object(tx1, [1])
    ObjDownloader.delete_transaction(tx1)
    assert fired == []
    ObjDownloader.delete_transaction(tx2, call_cb=True)
    assert fired == [tx2]  # ran before delete_transaction returned
    ObjDownloader.delete_transaction(tx2, call_cb=True)  # unknown now: a no-op
    assert fired == [tx2]
    c = fetch(site, ref1, tries=1)
    assert c.failed is not None and "no such ref" in c.failed


def test_shutdown_deletes_all_and_allows_new_transactions(
    fake_cells: tuple[FakeCell, FakeCell],
) -> None:
    owner, site = fake_cells
    fired: list[str] = []
    txs = [
        ObjDownloader.new_transaction(
            owner, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
        )
        for _ in range(3)
    ]
    ObjDownloader.shutdown()
    assert sorted(fired) == sorted(txs)
    assert not any(t.name.endswith("txmonitor") and t.is_alive() for t in threading.enumerate())
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, ["again"])
    assert fetch(site, ref).items == ["again"]


def test_cell_stop_ends_monitor_and_transactions(fake_net: FakeNetwork) -> None:
    fired: list[str] = []
    with fake_net.cell("server") as owner:
        tx = ObjDownloader.new_transaction(
            owner, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
        )
    assert fired == [tx]
    wait_for(lambda: not any(t.name == "objdl-server-txmonitor" for t in threading.enumerate()))


def test_two_cells_in_one_process_keep_apart(fake_net: FakeNetwork) -> None:
    with (
        fake_net.cell("owner-a") as a,
        fake_net.cell("owner-b") as b,
        fake_net.cell("site-1") as s,
    ):
        try:
            fired: list[str] = []
            tx_a = ObjDownloader.new_transaction(
                a, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
            )
            tx_b = ObjDownloader.new_transaction(b, ListProducer(), 30.0)
            ref_a = ObjDownloader.add_download_object(tx_a, ["from a"])
            ref_b = ObjDownloader.add_download_object(tx_b, ["from b"])
            c = ListConsumer()
            download_object("owner-b", ref_a, 5.0, s, c, tries=1)  # a's ref is not b's
            assert c.failed is not None and "no such ref" in c.failed
            c = ListConsumer()
            download_object("owner-b", ref_b, 5.0, s, c)
            assert c.items == ["from b"]
            a.stop()  # ends a's transactions only
            assert fired == [tx_a]
            c = ListConsumer()
            download_object("owner-b", ref_b, 5.0, s, c)
            assert c.items == ["from b"]
        finally:
            ObjDownloader.shutdown()


class Scripted(Producer):
    def __init__(self, behaviour: Callable[[int], tuple[str, Any, dict]]) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.calls = 0

    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        self.calls += 1
        return self.behaviour(self.calls)


def boom(n: int) -> tuple[str, Any, dict]:
    raise RuntimeError("producer blew up")


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        (boom, ["process_exception", "RuntimeError", "producer blew up"]),
        (lambda n: (ProduceRC.ERROR, "bad disk", {}), ["producer error", "bad disk"]),
        (lambda n: ("weird", None, {}), ["process_exception", "unknown return code"]),
    ],
)
def test_owner_side_failures(
    fake_cells: tuple[FakeCell, FakeCell], behaviour: Any, expect: list[str]
) -> None:
    owner, site = fake_cells
    statuses: list[str] = []
    tx = ObjDownloader.new_transaction(owner, Scripted(behaviour), 30.0)
    ref = ObjDownloader.add_download_object(
        tx, None, obj_downloaded_cb=lambda r, s, st, o: statuses.append(st)
    )
    t0 = owner.clock()
    c = fetch(site, ref)
    assert owner.clock() == t0  # at once, not by waiting out a timeout
    assert c.failed is not None and not c.completed
    for text in expect:
        assert text in c.failed
    if "bad disk" in expect:
        assert statuses == [DownloadStatus.FAILED]


class BadConsumer(ListConsumer):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result

    def consume(self, ref_id: str, state: dict, data: Any) -> dict:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("result", "expect"),
    [
        (ValueError("cannot store"), "exception when consuming data: ValueError: cannot store"),
        (["x"], "should be dict"),
    ],
)
def test_consumer_failures(fake_cells: tuple[FakeCell, FakeCell], result: Any, expect: str) -> None:
    owner, site = fake_cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, [1, 2, 3])
    c = BadConsumer(result)
    fetch(site, ref, consumer=c)
    assert c.failed is not None and expect in c.failed


def test_abort_ends_download_promptly(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    sig = Signal()
    release = threading.Event()

    def slow(n: int) -> tuple[str, Any, dict]:
        release.wait(5)
        return ProduceRC.OK, n, {}

    tx = ObjDownloader.new_transaction(owner, Scripted(slow), 30.0)
    ref = ObjDownloader.add_download_object(tx, None)
    threading.Timer(0.2, sig.trigger).start()
    t0 = time.monotonic()
    c = fetch(site, ref, per_request_timeout=10.0, abort_signal=sig)
    release.set()
    assert time.monotonic() - t0 < 0.6
    assert c.failed is not None and "abort" in c.failed


def test_abort_ends_a_download_waiting_on_the_fake_clock(
    fake_net: FakeNetwork, fake_cells: tuple[FakeCell, FakeCell]
) -> None:
    owner, site = fake_cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, [1, 2])
    outcome = ObjDownloader.track_transaction(tx, num_sites=1)
    sig = Signal()
    fake_net.hold(kind=MessageType.REQUEST)  # requests never arrive: the site waits
    t0 = fake_net.clock()
    fake_net.clock.call_at(t0 + 1.0, sig.trigger)
    c = fetch(site, ref, per_request_timeout=10.0, abort_signal=sig)
    assert fake_net.clock() == t0 + 1.0  # ended by the signal, not by the timeout
    assert c.failed is not None and "abort" in c.failed
    # The site told the owner it gave up (a fire, which the hold let through).
    assert "cancelled by the site" in outcome.refs[ref].failed["site-1"]


def test_owner_unreachable_fails_after_retries(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    _, site = fake_cells
    c = ListConsumer()
    t0 = time.monotonic()
    download_object("gone", "R-x", 5.0, site, c, tries=3, backoff=0.1)
    elapsed = time.monotonic() - t0
    assert c.failed is not None
    assert "target_unreachable" in c.failed and "after 3 tries" in c.failed
    assert 0.3 <= elapsed < 2.0  # 0.1 + 0.2 of back-off, no timeout waited out


def test_timeout_fails_with_reason(
    fake_net: FakeNetwork, fake_cells: tuple[FakeCell, FakeCell]
) -> None:
    owner, site = fake_cells
    tx = ObjDownloader.new_transaction(owner, Scripted(lambda n: (ProduceRC.EOF, None, {})), 30.0)
    ref = ObjDownloader.add_download_object(tx, None)
    fake_net.drop(kind=MessageType.REPLY)  # the owner answers; the answers are lost
    c = fetch(site, ref, per_request_timeout=0.3, tries=2, backoff=0.05)
    assert c.failed is not None and "timeout" in c.failed and "after 2 tries" in c.failed


def test_retry_after_timeout_succeeds(
    fake_net: FakeNetwork, fake_cells: tuple[FakeCell, FakeCell]
) -> None:
    owner, site = fake_cells

    def data_then_eof(n: int) -> tuple[str, Any, dict]:
        return (ProduceRC.OK, "data", {"done": True}) if n <= 2 else (ProduceRC.EOF, None, {})

    producer = Scripted(data_then_eof)
    tx = ObjDownloader.new_transaction(owner, producer, 30.0)
    ref = ObjDownloader.add_download_object(tx, None)
    fake_net.drop(kind=MessageType.REPLY, count=1)  # the first reply is lost: a retry
    c = fetch(site, ref, per_request_timeout=0.3, tries=3, backoff=0.05)
    assert c.completed and c.items == ["data"] and producer.calls == 3


def test_retry_landing_after_eof_gets_eof_again(
    fake_net: FakeNetwork, fake_cells: tuple[FakeCell, FakeCell]
) -> None:
    """The owner deletes the transaction on EOF, but its reply is lost: the site's
    retry must find EOF (from the finished record), not 'no such ref'."""
    owner, site = fake_cells
    calls: list[str] = []
    tx_holder: list[str] = []

    def downloaded(ref_id: str, to_site: str, status: str, obj: Any) -> None:
        calls.append(status)
        ObjDownloader.delete_transaction(tx_holder[0])

    def is_eof(env: Any) -> bool:
        return isinstance(env.payload, dict) and env.payload.get("status") == ProduceRC.EOF

    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    tx_holder.append(tx)
    ref = ObjDownloader.add_download_object(tx, ["only"], obj_downloaded_cb=downloaded)
    lost = fake_net.drop(is_eof, kind=MessageType.REPLY, count=1)
    c = fetch(site, ref, per_request_timeout=0.3, tries=3, backoff=0.05)
    assert lost.hits == 1  # the first EOF was lost and the request retried
    assert c.completed and c.failed is None and c.items == ["only"]
    assert calls == [DownloadStatus.SUCCESS]  # and never twice


def test_callback_exceptions_are_logged_not_raised(
    fake_cells: tuple[FakeCell, FakeCell], caplog: pytest.LogCaptureFixture
) -> None:
    owner, site = fake_cells

    def bad_cb(*a: Any) -> None:
        raise RuntimeError("callback bug")

    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0, timeout_cb=bad_cb)
    ref = ObjDownloader.add_download_object(tx, [1], obj_downloaded_cb=bad_cb)
    with caplog.at_level(logging.ERROR, logger="objdl.downloader"):
        c = fetch(site, ref)
        ObjDownloader.delete_transaction(tx, call_cb=True)
    assert c.completed
    assert sum("callback" in r.getMessage() and r.exc_info is not None for r in caplog.records) == 2


def test_malformed_requests_get_invalid_request(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    from objdl.downloader import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC
    from objdl.message import Message, MessageHeaderKey, ReturnCode

    owner, site = fake_cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, [1])
    for payload in (None, "x", {}, {"ref_id": 5}, {"ref_id": ref, "state": "notadict"}):
        reply = site.send_request(
            OBJ_DOWNLOADER_CHANNEL, "server", OBJ_DOWNLOADER_TOPIC, Message(payload=payload), 5.0
        )
        assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.INVALID_REQUEST, payload
        assert reply.get_header(MessageHeaderKey.ERROR)
