"""Hostile sites against the owner: memory caps, faked deliveries, refused cells, plaintext.

Each test is an attack a site (or a broker that learnt a ref) can make with raw
frames, and what the owner must do about it.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from objdl import wire
from objdl.cell import Cell
from objdl.downloader import (
    MAX_INFLIGHT_PER_SITE,
    DownloadStatus,
    ObjDownloader,
    TransferOutcome,
    TransferStatus,
)
from objdl.downloader._budget import InFlight
from objdl.downloader._outcome import MAX_RANGES, Ranges
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode
from objdl.objects import (
    BytesSource,
    DownloadError,
    ObjectProducer,
    download_bytes,
    download_file,
    new_transaction,
    offer_bytes,
    offer_file,
)
from objdl.security import KeyPair
from tests.conftest import wait_for

RC = MessageHeaderKey.RETURN_CODE
CH, TOPIC = "obj_downloader__", "obj_downloader__download"
MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ raw sockets


def request_frames(target: str, req_id: int, payload: Any, headers: dict | None = None) -> list:
    h = {"msg_type": MessageType.REQUEST, "req_id": req_id, "channel": CH, "topic": TOPIC}
    h.update(headers or {})
    return [wire.KIND_MSG, target.encode(), *wire.encode(Message(h, payload))]


class RawSite:
    """A bare DEALER registered at the broker under `name`: raw frames, no objdl cell."""

    def __init__(self, url: str, name: str, rcvhwm: int = 1000) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = rcvhwm
        self.sock.connect(url)
        self.sock.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode()])
        assert self.sock.poll(5000) and self.sock.recv_multipart()[0] == wire.KIND_REG_OK
        self._ids = iter(range(1, 10**9))

    def send(self, payload: Any, headers: dict | None = None, target: str = "server") -> int:
        rid = next(self._ids)
        self.sock.send_multipart(request_frames(target, rid, payload, headers))
        return rid

    def reply(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = self.sock.recv_multipart()
            if frames[0] == wire.KIND_MSG:
                return wire.decode(frames[2:])
        raise AssertionError("no reply")

    def ask(self, payload: Any, headers: dict | None = None) -> Message:
        self.send(payload, headers)
        return self.reply()

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(broker: Any) -> Iterator[Any]:
    made: list[RawSite] = []

    def make(name: str, **kw: Any) -> RawSite:
        made.append(RawSite(broker.url, name, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


# ------------------------------------------------------------------ 1. memory caps


def test_inflight_counts_bytes_until_every_view_is_gone() -> None:
    budget = InFlight(per_site=3 * MiB, total=5 * MiB)
    big = bytes(MiB)
    held = []
    for _ in range(3):
        data, why = budget.charge("s", memoryview(big))
        assert why is None
        held.append(data)
    assert budget.held("s") == 3 * MiB
    data, why = budget.charge("s", memoryview(big))
    assert data is None and "per-site cap of 3145728 bytes" in str(why)
    other, why = budget.charge("t", [memoryview(big)] * 2)
    assert why is None and budget.held() == 5 * MiB
    assert "total cap of 5242880 bytes" in str(budget.charge("u", big)[1])
    # Small pieces that add up are joined into one tracked buffer, in order.
    small = [bytes([i]) * 1000 for i in range(100)]
    joined, why = InFlight().charge("s", small)
    assert why is None and b"".join(bytes(v) for v in joined) == b"".join(small)
    del held, other, data
    gc.collect()
    assert budget.held() == 0 and budget.stats()["rejected"] == 2
    # A chunk larger than the cap is served when nothing else is held.
    _lone, why = budget.charge("s", bytes(4 * MiB))
    assert why is None and budget.held("s") == 4 * MiB


class FakeBroker:
    """A ROUTER that registers the owner, hands it requests and never reads its replies."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.rcvhwm = 1
        self.sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.peer = b""

    def register(self) -> None:
        assert self.sock.poll(5000)
        frames = self.sock.recv_multipart()
        assert frames[1] == wire.KIND_REG
        self.peer = frames[0]
        self.sock.send_multipart([self.peer, wire.KIND_REG_OK, frames[3]])

    def request(self, origin: str, req_id: int, payload: Any) -> None:
        frames = request_frames("server", req_id, payload)
        frames[1] = origin.encode()  # as the broker stamps it
        self.sock.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def sparse_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(160 * 2 * MiB)  # sparse: reads cost no disk
    return path


def test_owner_holds_at_most_its_cap_for_a_site_that_never_reads(sparse_file: Path) -> None:
    """160 requests for 2 MiB chunks, replies never read: 64 MiB held, the rest refused."""
    fake = FakeBroker()
    owner = Cell("server", fake.url, heartbeat_interval=30.0, broker_timeout=60.0)
    proc = psutil.Process(os.getpid())
    try:
        t = threading.Thread(target=owner.start)
        t.start()
        fake.register()
        t.join(10)
        assert owner.is_connected
        ref = offer_file(owner, sparse_file)
        gc.collect()
        rss0 = proc.memory_info().rss
        fake.request("attacker", 1, {"ref_id": ref, "state": {"length": 2 * MiB}})
        for i in range(1, 160):
            fake.request("attacker", i + 1, {"ref_id": ref, "state": {"offset": i * 2 * MiB}})
        wait_for(lambda: ObjDownloader.inflight_stats(owner)["rejected"] >= 100, 60)
        stats = ObjDownloader.inflight_stats(owner)
        rss = proc.memory_info().rss - rss0
        assert stats["peak_site"] <= MAX_INFLIGHT_PER_SITE
        assert stats["held"] <= MAX_INFLIGHT_PER_SITE
        assert rss < MAX_INFLIGHT_PER_SITE + 64 * MiB, rss / MiB
        # The excess was refused with service_unavailable naming the cap.
        from objdl.downloader._owner import _state_for

        reply = _state_for(owner).handle(
            Message({"origin": "attacker"}, {"ref_id": ref, "state": {"offset": 0}})
        )
        assert reply.get_header(RC) == ReturnCode.SERVICE_UNAVAILABLE
        assert "per-site cap of 67108864 bytes" in reply.get_header(MessageHeaderKey.ERROR)
        owner.stop()  # the socket closes: every frame held for the attacker is let go
        gc.collect()
        wait_for(lambda: ObjDownloader.inflight_stats(owner)["held"] == 0, 10)
    finally:
        ObjDownloader.shutdown()
        owner.stop()
        fake.close()


def test_window_160_site_is_slowed_not_failed(cells: Any, raw: Any) -> None:
    """A site asking for a huge window at a small cap completes, and so does one beside
    it; a bare socket that sends 160 requests and never reads holds at most the cap."""
    owner, site = cells
    ObjDownloader.set_inflight_limits(owner, per_site=2 * MiB, total=8 * MiB)
    data = os.urandom(48 * MiB)
    tx = new_transaction(owner, chunk_size=MiB)
    ref = offer_bytes(owner, data, transaction_id=tx)
    attacker = raw("attacker", rcvhwm=1)
    attacker.send({"ref_id": ref, "state": {"length": MiB}})
    for i in range(1, 48):
        attacker.send({"ref_id": ref, "state": {"offset": i * MiB, "length": MiB}})
    got = download_bytes(site, "server", ref, window=160, chunk_size=MiB, tries=2)
    assert bytes(got) == data
    stats = ObjDownloader.inflight_stats(owner)
    assert stats["peak_site"] <= 2 * MiB and stats["peak"] <= 8 * MiB
    assert stats["rejected"] > 0  # the cap was hit, and the honest site still finished
    with Cell("site-2", owner.broker_url) as other:
        assert bytes(download_bytes(other, "server", ref, chunk_size=MiB)) == data


# ------------------------------------------------------------------ 2. faked delivery


def test_final_request_without_the_bytes_is_not_a_delivery(cells: Any, raw: Any) -> None:
    owner, site = cells
    data = os.urandom(3 * MiB + 5)
    calls: list[tuple[str, str]] = []
    tx = new_transaction(owner, num_sites=2, chunk_size=MiB)
    ref = offer_bytes(
        owner, data, transaction_id=tx, obj_downloaded_cb=lambda r, s, st, o: calls.append((s, st))
    )
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    # Two cells that know the ref claim delivery without fetching a byte; a third
    # fetches the first chunk only, then claims the rest.
    for name in ("fake-1", "fake-2"):
        reply = raw(name).ask({"ref_id": ref, "state": {"offset": len(data), "ok": True}})
        assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
        assert "not counted as delivered" in reply.get_header(MessageHeaderKey.ERROR)
    partial = raw("fake-3")
    assert partial.ask({"ref_id": ref}).get_header(RC) == ReturnCode.OK
    reply = partial.ask({"ref_id": ref, "state": {"offset": len(data), "ok": True}})
    assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
    assert outcome.status == TransferStatus.RUNNING and calls == []
    assert sorted(outcome.refs[ref].failed) == ["fake-1", "fake-2", "fake-3"]
    # The honest sites still get it, and only they end the transaction.
    assert bytes(download_bytes(site, "server", ref, chunk_size=MiB)) == data
    assert outcome.status == TransferStatus.RUNNING
    with Cell("site-2", owner.broker_url) as other:
        assert bytes(download_bytes(other, "server", ref)) == data
    assert outcome.wait(5).status == TransferStatus.FINISHED
    assert outcome.refs[ref].finished == ["site-1", "site-2"]
    assert sorted(calls) == [("site-1", DownloadStatus.SUCCESS), ("site-2", DownloadStatus.SUCCESS)]


def test_a_site_that_fetched_every_byte_in_pieces_counts(cells: Any, raw: Any) -> None:
    """Coverage adds up across requests in any order and across retries of one site."""
    owner, _ = cells
    data = os.urandom(300_000)
    tx = new_transaction(owner, sites=["picky"], chunk_size=100_000)
    ref = offer_bytes(owner, data, transaction_id=tx)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    picky = raw("picky")
    for off in (200_000, 0, 100_000):
        assert picky.ask({"ref_id": ref, "state": {"offset": off}}).get_header(RC) == "ok"
    reply = picky.ask({"ref_id": ref, "state": {"offset": len(data), "ok": True}})
    assert reply.get_header(RC) == ReturnCode.OK
    assert outcome.wait(5).status == TransferStatus.FINISHED


def test_ranges_merge_and_stay_bounded() -> None:
    r = Ranges()
    for s, e in [(10, 20), (0, 5), (5, 10), (30, 40), (20, 30)]:
        r.add(s, e)
    assert len(r) == 1 and r.covers(0, 40) and not r.covers(0, 41)
    frag = Ranges()
    for i in range(MAX_RANGES + 500):
        frag.add(2 * i, 2 * i + 1)
    assert len(frag) == MAX_RANGES and not frag.covers(0, 2)


def test_bytes_served_to_one_name_do_not_count_for_another(cells: Any, raw: Any) -> None:
    """One party fetches every byte as "mule", then claims delivery as "claimer"."""
    owner, _ = cells
    data = os.urandom(300_000)
    tx = new_transaction(owner, sites=["claimer"], chunk_size=100_000)
    ref = offer_bytes(owner, data, transaction_id=tx)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    mule, claimer = raw("mule"), raw("claimer")
    for off in (0, 100_000, 200_000):
        assert mule.ask({"ref_id": ref, "state": {"offset": off}}).get_header(RC) == "ok"
    reply = claimer.ask({"ref_id": ref, "state": {"offset": len(data), "ok": True}})
    assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
    assert outcome.status == TransferStatus.RUNNING and outcome.refs[ref].finished == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(-5, 60)), max_size=60))
def test_ranges_cover_exactly_the_bytes_added(spans: list[tuple[int, int]]) -> None:
    """Overlapping, touching, empty and backwards ranges, against a set of bytes."""
    r, model = Ranges(), set()
    for start, length in spans:
        r.add(start, start + length)
        model.update(range(start, start + length))
    for start in range(0, 370, 7):
        for end in (start, start + 1, start + 13, start + 60):
            assert r.covers(start, end) == model.issuperset(range(start, end)), (start, end)
    assert r.nbytes == len(model)


# ------------------------------------------------------------------ 3. refused cells


def test_refused_cell_does_not_keep_a_transaction_alive(cells: Any, raw: Any) -> None:
    owner, _ = cells
    tx = new_transaction(owner, timeout=1.0, allowed_sites=["site-1"])
    ref = offer_bytes(owner, b"x" * 1000, transaction_id=tx)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    intruder = raw("intruder")
    start = time.monotonic()
    while outcome.status == TransferStatus.RUNNING and time.monotonic() - start < 4.0:
        assert intruder.ask({"ref_id": ref}).get_header(RC) == ReturnCode.UNAUTHENTICATED
        time.sleep(0.3)
    assert outcome.status == TransferStatus.TIMEOUT
    assert time.monotonic() - start < 3.0
    # The owner's record says who was turned away, and how.
    assert outcome.summary()[ref]["refused"] == {"intruder": ReturnCode.UNAUTHENTICATED}


def test_refused_cells_are_remembered_up_to_a_bound() -> None:
    from objdl.downloader._outcome import MAX_REFUSED

    outcome = TransferOutcome("T1")
    outcome.add_ref("R1")
    for i in range(MAX_REFUSED + 50):
        outcome.refused("R1", f"name-{i}", ReturnCode.UNAUTHENTICATED)
    outcome.refused("R1", "name-0", ReturnCode.AUTHENTICATION_ERROR)  # a known one updates
    refused = outcome.summary()["R1"]["refused"]
    assert isinstance(refused, dict) and len(refused) == MAX_REFUSED
    assert refused["name-0"] == ReturnCode.AUTHENTICATION_ERROR


# ------------------------------------------------------------------ 4. secure only


def _keys() -> KeyPair:
    return KeyPair(*zmq.curve_keypair())


def test_secure_transaction_serves_only_sealed_requests(
    broker: Any, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "objdl.downloader")
    sk, ok, ak = _keys(), _keys(), _keys()
    peers = {"site-1": sk.public, "attacker": ak.public}
    with (
        Cell("server", broker.url, curve_keys=ok, peer_keys=peers) as owner,
        Cell("site-1", broker.url, curve_keys=sk, peer_keys={"server": ok.public}) as site,
    ):
        try:
            data = os.urandom(500_000)
            ref = offer_bytes(owner, data, secure=True, chunk_size=100_000)
            # In plaintext, through an objdl cell: refused.
            with pytest.raises(DownloadError, match=r"authentication_error.*sealed requests"):
                download_bytes(site, "server", ref, tries=1)
            # A raw socket (or a broker) forging the secure header in plaintext: refused
            # by the cell, before the handler; and a plaintext copy of the header alone
            # never passes as sealed.
            forger = raw("attacker")
            for headers in ({"secure": True}, {}):
                reply = forger.ask({"ref_id": ref}, headers)
                assert reply.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR
                assert reply.payload is None
            # Sealed: served.
            assert bytes(download_bytes(site, "server", ref, secure=True)) == data
            # The owner's record says who was turned away for asking in plaintext.
            tx_sec = new_transaction(owner, secure=True)
            ref2 = offer_bytes(owner, b"y" * 1000, transaction_id=tx_sec)
            with pytest.raises(DownloadError, match="authentication_error"):
                download_bytes(site, "server", ref2, tries=1)
            outcome = ObjDownloader.get_outcome(tx_sec)
            assert outcome is not None
            assert outcome.summary()[ref2]["refused"] == {"site-1": ReturnCode.AUTHENTICATION_ERROR}
            assert any(
                "only to sealed" in r.message or "plaintext" in r.message for r in caplog.records
            )
            tx_plain = new_transaction(owner)
            with pytest.raises(ValueError, match="not secure"):
                offer_bytes(owner, b"x", transaction_id=tx_plain, secure=True)
        finally:
            ObjDownloader.shutdown()


def test_handler_sees_secure_only_for_opened_requests(broker: Any, raw: Any) -> None:
    """The cell overwrites any SECURE header a plaintext sender put on a request."""
    seen: list[Any] = []
    with Cell("server", broker.url) as owner:
        owner.register_request_cb("ch", "t", lambda req: seen.append(req.get_header("secure")))
        forger = raw("attacker")
        forger.sock.send_multipart(
            [wire.KIND_MSG, b"server", *wire.encode(Message({"msg_type": "req", "req_id": 1,
             "channel": "ch", "topic": "t", "secure": 1}))]
        )  # fmt: skip
        forger.sock.send_multipart(
            [wire.KIND_MSG, b"server", *wire.encode(Message({"msg_type": "req", "req_id": 2,
             "channel": "ch", "topic": "t"}))]
        )  # fmt: skip
        wait_for(lambda: forger.sock.poll(100) and len(seen) >= 1, 5)
        time.sleep(0.2)
        assert seen == [False]


# ------------------------------------------------------------------ 5. more attacks


def test_cancel_only_ends_the_senders_own_download(cells: Any, raw: Any) -> None:
    owner, site = cells
    data = os.urandom(MiB)
    tx = new_transaction(owner, sites=["site-1"], chunk_size=256 * 1024)
    ref = offer_bytes(owner, data, transaction_id=tx)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    rogue = raw("rogue")
    reply = rogue.ask({"ref_id": ref, "cancel": "x" * 1_000_000})
    assert reply.get_header(RC) == ReturnCode.OK
    assert len(outcome.refs[ref].failed["rogue"]) < 300
    assert bytes(download_bytes(site, "server", ref)) == data
    assert outcome.wait(5).status == TransferStatus.FINISHED


CONTROLS = "\x1b[2J\x1b]0;owned\x07\u202e\nobjdl: ERROR: forged"


def test_site_text_reaches_the_owners_log_and_outcome_escaped(
    cells: Any, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A site's cancel reason, final failure reason and an unknown ref id end up in the
    owner's outcome and log (``objdl serve`` prints both): none may drive its terminal."""
    owner, _ = cells
    data = b"q" * 1000
    tx = new_transaction(owner)
    ref = offer_bytes(owner, data, transaction_id=tx)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    rogue, other = raw("rogue"), raw("other")
    with caplog.at_level(logging.INFO, logger="objdl"):
        assert rogue.ask({"ref_id": ref, "cancel": CONTROLS}).get_header(RC) == ReturnCode.OK
        other.ask({"ref_id": ref})
        final = {"offset": len(data), "ok": False, "reason": CONTROLS}
        assert other.ask({"ref_id": ref, "state": final}).payload["status"] == "error"
        reply = rogue.ask({"ref_id": "R" + CONTROLS})
        assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST
    reasons = outcome.refs[ref].failed
    assert set(reasons) == {"rogue", "other"}
    for reason in reasons.values():
        assert reason.isprintable() and "\\x1b[2J" in reason, repr(reason)
    logged = [r.getMessage() for r in caplog.records]
    assert any("\\x1b[2J" in m for m in logged), logged  # the texts were logged, escaped
    assert all("\x1b" not in m and "\n" not in m for m in logged), logged


def test_odd_states_and_ids_get_invalid_request(cells: Any, raw: Any) -> None:
    owner, _ = cells
    ref = offer_bytes(owner, b"y" * 200_000, chunk_size=100_000)
    rogue = raw("rogue")
    cases = [
        {"ref_id": "R" * 100_000},
        {"ref_id": ref, "state": {"offset": -1}},
        {"ref_id": ref, "state": {"offset": 2**63}},
        {"ref_id": ref, "state": {"offset": True}},
        {"ref_id": ref, "state": {"offset": 0, "length": 0}},
        {"ref_id": ref, "state": {"offset": 0, "length": "big"}},
        {"ref_id": ref, "state": [1, 2]},
    ]
    for payload in cases:
        reply = rogue.ask(payload)
        assert reply.get_header(RC) == ReturnCode.INVALID_REQUEST, payload
    # A huge length is clipped to the owner's chunk size.
    reply = rogue.ask({"ref_id": ref, "state": {"offset": 0, "length": 2**62}})
    assert reply.get_header(RC) == ReturnCode.OK and len(reply.payload["data"]) == 100_000


def test_huge_final_state_is_not_kept(cells: Any, raw: Any) -> None:
    owner, _ = cells
    data = b"z" * 150_000
    ref = offer_bytes(owner, data, chunk_size=100_000)
    rogue = raw("rogue")
    rogue.ask({"ref_id": ref})
    rogue.ask({"ref_id": ref, "state": {"offset": 100_000}})
    final = {"offset": len(data), "ok": True, "reason": "r" * 500_000}
    assert rogue.ask({"ref_id": ref, "state": final}).get_header(RC) == ReturnCode.OK
    from objdl.downloader._owner import _state_for

    entries = _state_for(owner).table._finished
    assert all(len(v[1]) == 16 for v in entries.values())
    # Its retry still gets EOF (the fingerprint matches), a different state does not.
    assert rogue.ask({"ref_id": ref, "state": final}).payload["status"] == "eof"


def test_flood_of_first_requests_hashes_once(cells: Any, raw: Any) -> None:
    owner, _ = cells
    digests = []

    class Counting(BytesSource):
        def digest(self, algo: str) -> str:
            digests.append(algo)
            return super().digest(algo)

    class Producer(ObjectProducer):
        def open_source(self, ref_id: str, obj: Any) -> Any:
            return Counting(obj)

    tx = ObjDownloader.new_transaction(owner, Producer(), 10.0)
    ref = ObjDownloader.add_download_object(tx, b"q" * 300_000)
    rogue = raw("rogue")
    for _ in range(50):
        rogue.send({"ref_id": ref})
    for _ in range(50):
        assert rogue.reply().get_header(RC) == ReturnCode.OK
    assert digests == ["xxh3_128"]


def test_file_download_beside_a_stuck_peer(cells: Any, raw: Any, sparse_file: Path) -> None:
    owner, site = cells
    ref = offer_file(owner, sparse_file)
    stuck = raw("stuck", rcvhwm=1)
    for i in range(160):
        stuck.send({"ref_id": ref, "state": {"offset": i * 2 * MiB}})
    dest = sparse_file.parent / "copy.bin"
    download_file(site, "server", ref, dest)
    assert dest.stat().st_size == sparse_file.stat().st_size
    stats = ObjDownloader.inflight_stats(owner)
    assert stats["peak_site"] <= MAX_INFLIGHT_PER_SITE
    dest.unlink()


def test_sealed_replies_count_against_the_cap_until_they_leave(sparse_file: Path) -> None:
    """secure=True: a sealed reply's plaintext stays counted until its sealed copy has
    left the process, so an authenticated site that never reads is capped too."""
    from objdl.security import PeerKeys
    from objdl.security._e2e import EndToEnd, seal_of

    site_keys, owner_keys = KeyPair(*zmq.curve_keypair()), KeyPair(*zmq.curve_keypair())
    fake = FakeBroker()
    owner = Cell(
        "server",
        fake.url,
        heartbeat_interval=30.0,
        broker_timeout=60.0,
        curve_keys=owner_keys,
        peer_keys={"attacker": site_keys.public},
    )
    e2e = EndToEnd("attacker", site_keys, PeerKeys({"server": owner_keys.public}))
    proc = psutil.Process(os.getpid())

    def sealed(req_id: int, state: dict) -> list[Any]:
        h = {"msg_type": "req", "req_id": req_id, "channel": CH, "topic": TOPIC, "secure": True}
        return e2e.outbound("server").seal(wire.encode(Message(h, {"ref_id": ref, "state": state})))

    def send(frames: list[Any]) -> None:
        fake.sock.send_multipart([fake.peer, wire.KIND_MSG, b"attacker", *frames])

    try:
        t = threading.Thread(target=owner.start)
        t.start()
        fake.register()
        t.join(10)
        assert owner.is_connected
        ref = offer_file(owner, sparse_file, secure=True)
        # First contact is refused (no session yet), sealed: it teaches the owner's session.
        first = sealed(1, {"length": 2 * MiB})
        send(first)
        deadline = time.monotonic() + 10
        while True:
            assert fake.sock.poll(max(0, int((deadline - time.monotonic()) * 1000)))
            got = fake.sock.recv_multipart()
            if got[1] == wire.KIND_MSG:
                break
        e2e.open("server", got[3:], seal_of(first))
        gc.collect()
        rss0 = proc.memory_info().rss
        send(sealed(2, {"length": 2 * MiB}))
        for i in range(1, 160):
            send(sealed(i + 2, {"offset": i * 2 * MiB}))
        wait_for(lambda: ObjDownloader.inflight_stats(owner)["rejected"] >= 100, 60)
        stats = ObjDownloader.inflight_stats(owner)
        assert stats["peak_site"] <= MAX_INFLIGHT_PER_SITE
        # The plaintext (counted) and its sealed copy: at most twice the cap, plus slack.
        rss = proc.memory_info().rss - rss0
        assert rss < 2 * MAX_INFLIGHT_PER_SITE + 64 * MiB, rss / MiB
        owner.stop()
        gc.collect()
        wait_for(lambda: ObjDownloader.inflight_stats(owner)["held"] == 0, 10)
    finally:
        ObjDownloader.shutdown()
        owner.stop()
        fake.close()
