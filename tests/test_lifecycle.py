"""Transfer lifecycle beyond the seed: goals, outcome, progress, cancel, withdraw, who may fetch.

On objdl.testing's fake network (the first test also through a real broker): these are
the owner's tables and outcomes, which need request/reply semantics, not sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from objdl.cell import Cell, CellLike
from objdl.downloader import ObjDownloader, TransferStatus
from objdl.message import Signal
from objdl.objects import DownloadError, download_bytes, new_transaction, offer_bytes
from objdl.testing import FakeCell, FakeNetwork
from tests.conftest import wait_for

MiB = 1024 * 1024
NAMES = ("server", "site-1", "site-2", "site-3")


@pytest.fixture
def net(fake_net: FakeNetwork) -> dict[str, FakeCell]:
    cells = {n: fake_net.cell(n) for n in NAMES}
    for c in cells.values():
        c.start()
    return cells


@pytest.fixture(params=["broker", "fake"])
def any_net(request: pytest.FixtureRequest) -> Iterator[dict[str, CellLike]]:
    if request.param == "fake":
        yield request.getfixturevalue("net")
        return
    url = request.getfixturevalue("broker").url
    cells = {n: Cell(n, url) for n in NAMES}
    for c in cells.values():
        c.start()
    try:
        yield dict(cells)
    finally:
        ObjDownloader.shutdown()
        for c in cells.values():
            c.stop()


def test_named_sites_finish_the_transaction_by_itself(any_net: dict[str, CellLike]) -> None:
    net = any_net
    done: list[tuple[str, str]] = []
    tx = new_transaction(
        net["server"],
        timeout=60.0,
        sites=["site-1", "site-2"],
        done_cb=lambda t, st, o: done.append((t, st)),
    )
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    r1 = offer_bytes(net["server"], b"a" * 1000, transaction_id=tx)
    r2 = offer_bytes(net["server"], b"b" * 3 * MiB, transaction_id=tx)
    for site in ("site-1", "site-2"):
        assert download_bytes(net[site], "server", r1) == b"a" * 1000
    assert outcome.status == TransferStatus.RUNNING  # r2 not yet everywhere
    assert outcome.never_came(r2) == ["site-1", "site-2"]
    download_bytes(net["site-1"], "server", r2)
    download_bytes(net["site-2"], "server", r2)
    assert outcome.wait(5).status == TransferStatus.FINISHED  # long before the 60 s timeout
    assert done == [(tx, TransferStatus.FINISHED)]
    assert outcome.complete and outcome.min_met
    assert outcome.summary()[r2] == {
        "finished": ["site-1", "site-2"],
        "failed": {},
        "in_progress": [],
        "never_came": [],
        "refused": {},
    }
    assert outcome.refs[r2].sites["site-1"].bytes_sent == 3 * MiB


def test_num_sites_and_minimum(net: dict[str, FakeCell]) -> None:
    tx = new_transaction(net["server"], timeout=1.0, num_sites=3, min_sites=2)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    ref = offer_bytes(net["server"], b"x" * 100, transaction_id=tx)
    download_bytes(net["site-1"], "server", ref)
    assert not outcome.min_met
    download_bytes(net["site-2"], "server", ref)
    assert outcome.min_met and not outcome.complete
    net["server"].clock.advance(1.0)
    assert outcome.status == TransferStatus.TIMEOUT  # the third never came
    assert outcome.refs[ref].finished == ["site-1", "site-2"]


def test_delete_reports_deleted(net: dict[str, FakeCell]) -> None:
    got: list[str] = []
    tx = new_transaction(
        net["server"], timeout=60.0, num_sites=1, done_cb=lambda t, st, o: got.append(st)
    )
    ObjDownloader.delete_transaction(tx)
    assert got == [TransferStatus.DELETED]


def test_progress_on_both_sides(net: dict[str, FakeCell]) -> None:
    owner_calls: list[tuple[Any, ...]] = []
    site_calls: list[tuple[Any, ...]] = []
    tx = new_transaction(net["server"], num_sites=1, progress_cb=lambda *a: owner_calls.append(a))
    ref = offer_bytes(net["server"], bytes(20 * MiB), transaction_id=tx)
    download_bytes(
        net["site-1"],
        "server",
        ref,
        progress_cb=lambda *a: site_calls.append(a),
        progress_interval=0.0,
    )
    assert site_calls[-1][:3] == (ref, 20 * MiB, 20 * MiB)
    assert [c[1] for c in site_calls] == sorted(c[1] for c in site_calls)  # monotonic
    assert site_calls[-1][3] > 0  # a rate
    wait_for(lambda: owner_calls and owner_calls[-1][2] == 20 * MiB)
    assert owner_calls[-1][:4] == (ref, "site-1", 20 * MiB, 20 * MiB)
    # Rate-limited: with the default 0.5 s interval, far fewer calls than chunks.
    assert len(owner_calls) < 20


def test_site_cancel_is_recorded_by_owner(net: dict[str, FakeCell]) -> None:
    tx = new_transaction(net["server"], timeout=60.0, num_sites=1)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    ref = offer_bytes(net["server"], bytes(64 * MiB), transaction_id=tx)
    sig = Signal()

    def on_progress(ref_id: str, done: int, total: int | None, rate: float) -> None:
        if done >= 4 * MiB:
            sig.trigger()

    with pytest.raises(DownloadError, match="aborted"):
        download_bytes(
            net["site-1"],
            "server",
            ref,
            abort_signal=sig,
            progress_cb=on_progress,
            progress_interval=0.0,
        )
    wait_for(lambda: "site-1" in outcome.refs[ref].failed)
    assert "cancelled by the site" in outcome.refs[ref].failed["site-1"]
    assert outcome.refs[ref].sites["site-1"].state == "cancelled"


def test_withdraw_fails_downloads_promptly(net: dict[str, FakeCell]) -> None:
    ref = offer_bytes(net["server"], bytes(64 * MiB))
    errors: list[str] = []
    started, withdrawn = threading.Event(), threading.Event()

    def on_progress(*a: object) -> None:
        started.set()
        withdrawn.wait(10)  # the download is under way while the owner withdraws

    def fetch() -> None:
        try:
            download_bytes(
                net["site-1"],
                "server",
                ref,
                window=1,
                progress_cb=on_progress,
                progress_interval=0.0,
            )
        except DownloadError as exc:
            errors.append(exc.reason)

    t = threading.Thread(target=fetch)
    t.start()
    assert started.wait(10)
    assert ObjDownloader.withdraw(ref, "a newer model exists")
    withdrawn.set()
    t0 = time.monotonic()
    t.join(10)
    assert time.monotonic() - t0 < 2.0
    assert len(errors) == 1 and "withdrawn" in errors[0] and "a newer model exists" in errors[0]
    assert not ObjDownloader.withdraw(ref)


def test_only_allowed_sites_may_download(
    net: dict[str, FakeCell], caplog: pytest.LogCaptureFixture
) -> None:
    tx = new_transaction(net["server"], allowed_sites=["site-1"])
    ref = offer_bytes(net["server"], b"secret", transaction_id=tx)
    assert download_bytes(net["site-1"], "server", ref) == b"secret"
    with pytest.raises(DownloadError, match="unauthenticated") as info:
        download_bytes(net["site-2"], "server", ref)
    assert "site-2 is not allowed" in info.value.reason
    assert any("site-2 may not download" in r.getMessage() for r in caplog.records)


def test_ref_ids_are_unguessable(net: dict[str, FakeCell]) -> None:
    import uuid

    refs = {offer_bytes(net["server"], b"x") for _ in range(50)}
    assert len(refs) == 50
    for r in refs:
        assert uuid.UUID(r[1:]).version == 4  # 122 random bits


def test_track_rejects_bad_input(net: dict[str, FakeCell]) -> None:
    with pytest.raises(ValueError, match="no such transaction"):
        ObjDownloader.track_transaction("T-none", num_sites=1)
    tx = new_transaction(net["server"])
    with pytest.raises(ValueError, match="invalid cell name"):
        ObjDownloader.track_transaction(tx, sites=["not a name"])
    with pytest.raises(ValueError, match="num_sites"):
        ObjDownloader.track_transaction(tx, num_sites=0)
