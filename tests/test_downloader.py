"""The seed's Object Downloader behaviours, through a real broker and cells."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker import Broker
from objdl.cell import Cell
from objdl.downloader import (
    Consumer,
    DownloadStatus,
    ObjDownloader,
    Producer,
    ProduceRC,
    download_object,
)
from objdl.message import Signal
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


def fetch(site: Cell, ref: str, consumer: Consumer | None = None, **kw: Any) -> ListConsumer:
    c = consumer or ListConsumer()
    kw.setdefault("per_request_timeout", 5.0)
    timeout = kw.pop("per_request_timeout")
    download_object("server", ref, timeout, site, c, **kw)
    assert isinstance(c, ListConsumer)
    return c


def test_download_and_callback_arguments(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
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


def test_explicit_ids_are_used(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0, tx_id="T-mine")
    assert tx == "T-mine"
    assert ObjDownloader.add_download_object(tx, [1], ref_id="R-mine") == "R-mine"
    with pytest.raises(ValueError, match="already"):
        ObjDownloader.add_download_object(tx, [2], ref_id="R-mine")
    with pytest.raises(ValueError, match="already exists"):
        ObjDownloader.new_transaction(owner, ListProducer(), 30.0, tx_id="T-mine")
    assert fetch(site, "R-mine").items == [1]


def test_bad_arguments_raise(cells: tuple[Cell, Cell]) -> None:
    owner, _ = cells
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


def test_requests_restart_the_inactivity_clock(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    fired: list[str] = []

    class Slow(ListProducer):
        def produce(self, *a: Any) -> tuple[str, Any, dict]:
            time.sleep(0.1)
            return super().produce(*a)

    tx = ObjDownloader.new_transaction(owner, Slow(), 0.6, timeout_cb=lambda t, o: fired.append(t))
    ref = ObjDownloader.add_download_object(tx, list(range(12)))  # ~1.3 s of requests
    c = fetch(site, ref)
    assert c.completed and c.items == list(range(12))
    assert fired == []
    wait_for(lambda: fired == [tx], timeout=3)


def test_delete_transaction_with_and_without_callback(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
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


def test_shutdown_deletes_all_and_allows_new_transactions(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
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


def test_cell_stop_ends_monitor_and_transactions(broker: Broker) -> None:
    fired: list[str] = []
    with Cell("server", broker.url) as owner:
        tx = ObjDownloader.new_transaction(
            owner, ListProducer(), 30.0, timeout_cb=lambda t, o: fired.append(t)
        )
    assert fired == [tx]
    wait_for(lambda: not any(t.name == "objdl-server-txmonitor" for t in threading.enumerate()))


def test_two_cells_in_one_process_keep_apart(broker: Broker) -> None:
    with (
        Cell("owner-a", broker.url) as a,
        Cell("owner-b", broker.url) as b,
        Cell("site-1", broker.url) as s,
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
def test_owner_side_failures(cells: tuple[Cell, Cell], behaviour: Any, expect: list[str]) -> None:
    owner, site = cells
    statuses: list[str] = []
    tx = ObjDownloader.new_transaction(owner, Scripted(behaviour), 30.0)
    ref = ObjDownloader.add_download_object(
        tx, None, obj_downloaded_cb=lambda r, s, st, o: statuses.append(st)
    )
    t0 = time.monotonic()
    c = fetch(site, ref)
    assert time.monotonic() - t0 < 2.0  # promptly, not by waiting out a timeout
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
def test_consumer_failures(cells: tuple[Cell, Cell], result: Any, expect: str) -> None:
    owner, site = cells
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


def test_owner_unreachable_fails_after_retries(cells: tuple[Cell, Cell]) -> None:
    _, site = cells
    c = ListConsumer()
    t0 = time.monotonic()
    download_object("gone", "R-x", 5.0, site, c, tries=3, backoff=0.1)
    elapsed = time.monotonic() - t0
    assert c.failed is not None
    assert "target_unreachable" in c.failed and "after 3 tries" in c.failed
    assert 0.3 <= elapsed < 2.0  # 0.1 + 0.2 of back-off, no timeout waited out


def test_timeout_fails_with_reason(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    release = threading.Event()

    def slow(n: int) -> tuple[str, Any, dict]:
        release.wait(3)
        return ProduceRC.EOF, None, {}

    tx = ObjDownloader.new_transaction(owner, Scripted(slow), 30.0)
    ref = ObjDownloader.add_download_object(tx, None)
    c = fetch(site, ref, per_request_timeout=0.3, tries=2, backoff=0.05)
    release.set()
    assert c.failed is not None and "timeout" in c.failed and "after 2 tries" in c.failed


def test_retry_after_timeout_succeeds(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells

    def first_slow(n: int) -> tuple[str, Any, dict]:
        if n == 1:
            time.sleep(0.6)
        return (ProduceRC.OK, "data", {"done": True}) if n <= 2 else (ProduceRC.EOF, None, {})

    producer = Scripted(first_slow)
    tx = ObjDownloader.new_transaction(owner, producer, 30.0)
    ref = ObjDownloader.add_download_object(tx, None)
    c = fetch(site, ref, per_request_timeout=0.3, tries=3, backoff=0.05)
    assert c.completed and c.items == ["data"]


def test_retry_landing_after_eof_gets_eof_again(cells: tuple[Cell, Cell]) -> None:
    """The owner deletes the transaction on EOF, but its reply comes too late: the
    site's retry must find EOF (from the finished record), not 'no such ref'."""
    owner, site = cells
    calls: list[str] = []
    tx_holder: list[str] = []

    def downloaded(ref_id: str, to_site: str, status: str, obj: Any) -> None:
        calls.append(status)
        ObjDownloader.delete_transaction(tx_holder[0])
        time.sleep(0.6)  # the site's request times out meanwhile and is retried

    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    tx_holder.append(tx)
    ref = ObjDownloader.add_download_object(tx, ["only"], obj_downloaded_cb=downloaded)
    c = fetch(site, ref, per_request_timeout=0.3, tries=3, backoff=0.05)
    assert c.completed and c.failed is None and c.items == ["only"]
    time.sleep(0.5)
    assert calls == [DownloadStatus.SUCCESS]  # and never twice


def test_callback_exceptions_are_logged_not_raised(
    cells: tuple[Cell, Cell], caplog: pytest.LogCaptureFixture
) -> None:
    owner, site = cells

    def bad_cb(*a: Any) -> None:
        raise RuntimeError("callback bug")

    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0, timeout_cb=bad_cb)
    ref = ObjDownloader.add_download_object(tx, [1], obj_downloaded_cb=bad_cb)
    with caplog.at_level(logging.ERROR, logger="objdl.downloader"):
        c = fetch(site, ref)
        ObjDownloader.delete_transaction(tx, call_cb=True)
    assert c.completed
    assert sum("callback" in r.getMessage() and r.exc_info is not None for r in caplog.records) == 2


def test_malformed_requests_get_invalid_request(cells: tuple[Cell, Cell]) -> None:
    from objdl.downloader import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC
    from objdl.message import Message, MessageHeaderKey, ReturnCode

    owner, site = cells
    tx = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, [1])
    for payload in (None, "x", {}, {"ref_id": 5}, {"ref_id": ref, "state": "notadict"}):
        reply = site.send_request(
            OBJ_DOWNLOADER_CHANNEL, "server", OBJ_DOWNLOADER_TOPIC, Message(payload=payload), 5.0
        )
        assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.INVALID_REQUEST, payload
        assert reply.get_header(MessageHeaderKey.ERROR)
