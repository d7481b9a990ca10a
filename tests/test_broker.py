"""A real Broker on loopback, spoken to by raw DEALER sockets that follow docs/PROTOCOL.md."""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from broker import Broker, BrokerError
from broker.__main__ import main
from objdl import wire
from tests.conftest import wait_for

ANY_PORT = "tcp://127.0.0.1:*"
HEADERS = b"\x82\xa6req_id\x07\xa6origin\xa6server"  # opaque to the broker
REPO = Path(__file__).resolve().parent.parent


class Peer:
    """One DEALER connection to the broker, driven by hand."""

    def __init__(self, ctx: zmq.Context[Any], url: str, rcvhwm: int | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if rcvhwm is not None:
            self.sock.rcvhwm = rcvhwm
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        self.sock.connect(url)

    def send(self, *frames: bytes | memoryview) -> None:
        self.sock.send_multipart(list(frames), zmq.NOBLOCK)

    def recv(self, timeout: float = 5.0, skip: tuple[bytes, ...] = (wire.KIND_HB,)) -> list[bytes]:
        """The next message whose kind is not in `skip`; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                raise AssertionError(f"nothing received within {timeout}s")
            frames = self.sock.recv_multipart()
            if frames[0] not in skip:
                return frames

    def poll_one(self) -> list[bytes] | None:
        """A message if one is waiting, else None (never blocks)."""
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def reg(self, name: str) -> list[bytes]:
        self.send(wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode())
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


PeerFactory = Callable[..., Peer]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Broker]]:
    """Start brokers with the given settings on free ports; all stopped at teardown."""
    started: list[Broker] = []

    def make(**kw: Any) -> Broker:
        # Peers here do not heartbeat: a long cell timeout keeps a loaded machine from
        # expiring them mid-test, except where a test sets its own.
        kw.setdefault("cell_timeout", 60.0)
        b = Broker(kw.pop("bind", ANY_PORT), **kw)
        started.append(b)
        b.start()
        return b

    try:
        yield make
    finally:
        for b in started:
            b.stop()


@pytest.fixture
def patient(make_broker: Callable[..., Broker]) -> Broker:
    """A broker with default settings except a cell timeout no test run can hit."""
    return make_broker()


@pytest.fixture
def peer(ctx: zmq.Context[Any]) -> Iterator[PeerFactory]:
    """Make DEALER peers; every one is closed at teardown."""
    made: list[Peer] = []

    def make(url: str, name: str | None = None, **kw: Any) -> Peer:
        p = Peer(ctx, url, **kw)
        made.append(p)
        if name is not None:
            assert p.reg(name) == [wire.KIND_REG_OK, name.encode()]
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


def test_routes_between_two_cells_stamping_the_origin(patient: Broker, peer: PeerFactory) -> None:
    a, b = peer(patient.url, "site-1"), peer(patient.url, "server")
    big = os.urandom(1 << 20)
    # The sender names someone else wherever it can; only frame 1 decides the origin.
    a.send(wire.KIND_MSG, b"server", HEADERS, b"server", b"", big)
    assert b.recv() == [wire.KIND_MSG, b"site-1", HEADERS, b"server", b"", big]
    b.send(wire.KIND_MSG, b"site-1", b"h2", b"reply")
    assert a.recv() == [wire.KIND_MSG, b"server", b"h2", b"reply"]
    assert patient.stats()["routed"] == 2
    assert patient.cells() == ["server", "site-1"]


def test_message_to_own_name_comes_back(broker: Broker, peer: PeerFactory) -> None:
    a = peer(broker.url, "site-1")
    a.send(wire.KIND_MSG, b"site-1", HEADERS, b"self")
    assert a.recv() == [wire.KIND_MSG, b"site-1", HEADERS, b"self"]


def test_unknown_destination_is_nacked_with_headers(patient: Broker, peer: PeerFactory) -> None:
    a = peer(patient.url, "site-1")
    a.send(wire.KIND_MSG, b"site-9", HEADERS, b"body", b"buf")
    assert a.recv() == [wire.KIND_NACK, b"site-9", wire.NACK_UNREACHABLE, HEADERS]


def test_unregistered_sender_is_nacked(patient: Broker, peer: PeerFactory) -> None:
    peer(patient.url, "server")
    stranger = peer(patient.url)
    stranger.send(wire.KIND_MSG, b"server", HEADERS, b"body")
    assert stranger.recv() == [wire.KIND_NACK, b"server", wire.NACK_UNREGISTERED, HEADERS]
    stranger.send(wire.KIND_HB)
    assert stranger.recv() == [wire.KIND_WHO]


def test_live_duplicate_name_is_refused(patient: Broker, peer: PeerFactory) -> None:
    holder = peer(patient.url, "site-1")
    claimant = peer(patient.url)
    claimant.send(wire.KIND_REG, wire.PROTOCOL_VERSION, b"site-1")
    assert holder.recv() == [wire.KIND_PING]
    holder.send(wire.KIND_HB)
    assert claimant.recv() == [wire.KIND_REG_ERR, b"site-1", b"taken"]
    holder.send(wire.KIND_MSG, b"site-1", HEADERS, b"still mine")
    assert holder.recv(skip=(wire.KIND_HB, wire.KIND_PING))[3] == b"still mine"


def test_hung_holder_is_replaced(make_broker: Callable[..., Broker], peer: PeerFactory) -> None:
    b = make_broker(cell_timeout=30.0, probe_timeout=1.0)
    peer(b.url, "site-1")  # then never reads nor speaks again: a hung process
    restarted = peer(b.url)
    t0 = time.monotonic()
    assert restarted.reg("site-1") == [wire.KIND_REG_OK, b"site-1"]
    assert time.monotonic() - t0 < 2.5
    restarted.send(wire.KIND_MSG, b"site-1", HEADERS, b"to the new one")
    assert restarted.recv(skip=(wire.KIND_HB, wire.KIND_PING))[3] == b"to the new one"
    assert b.stats()["evicted"] == 1


def test_closed_holder_is_replaced(make_broker: Callable[..., Broker], peer: PeerFactory) -> None:
    b = make_broker(cell_timeout=30.0, probe_timeout=1.0)
    peer(b.url, "site-1").close()  # a crash without BYE: the connection goes away
    assert peer(b.url).reg("site-1") == [wire.KIND_REG_OK, b"site-1"]
    assert b.cells() == ["site-1"]


def test_silent_cell_is_forgotten(make_broker: Callable[..., Broker], peer: PeerFactory) -> None:
    b = make_broker(heartbeat_interval=0.1, cell_timeout=1.0)
    live = peer(b.url, "site-1")
    peer(b.url, "site-2")  # never heartbeats

    def site2_gone() -> bool:
        live.send(wire.KIND_HB)
        return b.cells() == ["site-1"]

    wait_for(site2_gone, timeout=5.0)
    live.send(wire.KIND_MSG, b"site-2", HEADERS, b"body")
    assert live.recv() == [wire.KIND_NACK, b"site-2", wire.NACK_UNREACHABLE, HEADERS]
    assert b.stats()["expired"] == 1


def test_broker_heartbeats_registered_cells(
    make_broker: Callable[..., Broker], peer: PeerFactory
) -> None:
    b = make_broker(heartbeat_interval=0.1)
    a = peer(b.url, "site-1")
    assert a.recv(timeout=2.0, skip=()) == [wire.KIND_HB]


def test_list_with_and_without_prefix(patient: Broker, peer: PeerFactory) -> None:
    for name in ("site-1", "site-1.job-7", "site-10", "server"):
        peer(patient.url, name)
    asker = peer(patient.url)
    asker.send(wire.KIND_LIST, b"t1", b"")
    assert asker.recv() == [wire.KIND_LIST_R, b"t1", b"server\nsite-1\nsite-1.job-7\nsite-10"]
    asker.send(wire.KIND_LIST, b"t2", b"site-1")
    assert asker.recv() == [wire.KIND_LIST_R, b"t2", b"site-1\nsite-1.job-7"]
    asker.send(wire.KIND_LIST, b"t3", b"nobody")
    assert asker.recv() == [wire.KIND_LIST_R, b"t3", b""]
    assert patient.cells("site-1") == ["site-1", "site-1.job-7"]


def _junk(rng: random.Random) -> list[bytes]:
    kinds = [b"FOO", b"", b"PING", b"REG_OK", b"LIST_R", rng.randbytes(rng.randint(1, 30))]
    kind = rng.choice([*kinds, wire.KIND_MSG, wire.KIND_REG, wire.KIND_LIST, wire.KIND_HB])
    count = rng.randint(0, 6)
    names = [b"a..b", b"\xff\xfe", b"x" * 300, b"site 1", rng.randbytes(8)]
    return [kind, *(rng.choice([*names, rng.randbytes(rng.randint(0, 100))]) for _ in range(count))]


def test_junk_is_dropped_and_counted_and_traffic_flows(
    make_broker: Callable[..., Broker], peer: PeerFactory
) -> None:
    b = make_broker(max_message_size=1 << 20)
    a, s = peer(b.url, "site-1"), peer(b.url, "server")
    junk = peer(b.url)
    rng = random.Random(1234)
    for _ in range(500):
        junk.send(*_junk(rng))
    for frames in (
        [b"FOO"],
        [wire.KIND_HB, b"extra"],
        [wire.KIND_MSG, b"server"],
        [wire.KIND_MSG, b"\xff\xfe", HEADERS, b"body"],
        [wire.KIND_LIST, b"t" * 65, b""],
    ):
        a.send(*frames)
    a.send(wire.KIND_MSG, b"server", HEADERS, b"body", b"x" * (1 << 20))
    assert a.recv() == [wire.KIND_NACK, b"server", wire.NACK_TOO_BIG, HEADERS]
    junk.send(wire.KIND_HB, b"x" * (2 << 20))
    wait_for(lambda: b.stats()["drop_too_big"] == 1)
    # Normal traffic still flows both ways.
    a.send(wire.KIND_MSG, b"server", HEADERS, b"after the junk")
    assert s.recv() == [wire.KIND_MSG, b"site-1", HEADERS, b"after the junk"]
    stats = b.stats()
    assert stats["errors"] == 0
    assert stats["drop_unknown_kind"] >= 1 and stats["drop_bad_frames"] >= 2
    assert stats["drop_bad_name"] >= 1 and stats["nack_too_big"] == 1
    assert b.cells() == ["server", "site-1"]


def test_internal_error_is_counted_and_routing_goes_on(
    patient: Broker, peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = peer(patient.url, "site-1")
    table = patient._table
    real = table.handle

    def failing(p: bytes, frames: Any, now: float) -> Any:
        if bytes(frames[0]) == b"BOOM":
            raise RuntimeError("injected")
        return real(p, frames, now)

    monkeypatch.setattr(table, "handle", failing)
    a.send(b"BOOM")
    wait_for(lambda: patient.stats()["errors"] == 1)
    a.send(wire.KIND_MSG, b"site-1", HEADERS, b"still routing")
    assert a.recv()[3] == b"still routing"


def test_restart_on_the_same_url(peer: PeerFactory) -> None:
    b = Broker(ANY_PORT, cell_timeout=60.0)
    b.start()
    try:
        url = b.url
        assert not url.endswith("*")
        a = peer(url, "site-1")
        b.stop()
        b.start()  # the same object binds the same port again
        assert b.url == url
        a.send(wire.KIND_HB)
        assert a.recv() == [wire.KIND_WHO]  # the new broker does not know us: register again
        assert a.reg("site-1") == [wire.KIND_REG_OK, b"site-1"]
    finally:
        b.stop()
    with Broker(url, cell_timeout=60.0) as again:  # and so does a new broker on that url
        assert again.url == url
        a.send(wire.KIND_HB)
        assert a.recv() == [wire.KIND_WHO]
        assert a.reg("site-1") == [wire.KIND_REG_OK, b"site-1"]
        a.send(wire.KIND_MSG, b"site-1", HEADERS, b"hello")
        assert a.recv()[3] == b"hello"


def test_slow_consumer_does_not_block_others(
    make_broker: Callable[..., Broker], peer: PeerFactory
) -> None:
    b = make_broker(sndhwm=20, max_peer_queue=4 << 20)
    slow = peer(b.url, "slow", rcvhwm=1)  # registered, then never reads
    flooder = peer(b.url, "flooder")
    a, s = peer(b.url, "site-1"), peer(b.url, "server")
    chunk = b"x" * (64 << 10)
    nacks = 0
    for _ in range(400):  # 25 MiB: more than the bound, the pipe and the kernel buffers hold
        flooder.send(wire.KIND_MSG, b"slow", HEADERS, chunk)
        while (got := flooder.poll_one()) is not None:
            nacks += got[:3] == [wire.KIND_NACK, b"slow", wire.NACK_BUSY]
    # Other cells are served meanwhile, promptly.
    t0 = time.monotonic()
    for i in range(50):
        a.send(wire.KIND_MSG, b"server", HEADERS, b"%d" % i)
        assert s.recv(timeout=5.0)[3] == b"%d" % i
    assert time.monotonic() - t0 < 5.0

    def busy_nacked() -> bool:
        nonlocal nacks
        while (got := flooder.poll_one()) is not None:
            nacks += got[:3] == [wire.KIND_NACK, b"slow", wire.NACK_BUSY]
        return nacks > 0

    # Every flood message was either queued or NACKed busy (and 50 more were routed).
    wait_for(lambda: (st := b.stats())["routed"] + st["nack_busy"] == 450)
    wait_for(busy_nacked)
    assert b.stats()["nack_busy"] >= nacks
    assert "slow" in b.cells()  # slow is not dead
    slow.close()


def _request(seq: int, nbytes: int) -> list[bytes]:
    """A MSG to "slow" whose headers say request (so a refusal is NACKed) and carry `seq`."""
    headers = msgpack.packb({"msg_type": "req", "req_id": seq})
    return [wire.KIND_MSG, b"slow", headers, seq.to_bytes(4, "big") + bytes(nbytes)]


def test_what_libzmq_refuses_on_the_fast_path_waits_in_order(
    make_broker: Callable[..., Broker], peer: PeerFactory
) -> None:
    # Small MSGs take the fast path until libzmq's pipe to "slow" (5 messages) and the
    # kernel's buffers are full; then they wait in the broker, behind the refused one,
    # until the bound is reached and requests are NACKed busy. Nothing is reordered.
    b = make_broker(sndhwm=5, max_peer_queue=2 << 20)
    slow = peer(b.url, "slow", rcvhwm=1)
    flooder = peer(b.url, "flooder")
    flooder.sock.sndtimeo = 10_000
    sent, nacked = 3000, 0

    def read_nacks() -> None:
        nonlocal nacked
        while (frames := flooder.poll_one()) is not None:
            nacked += frames[:3] == [wire.KIND_NACK, b"slow", wire.NACK_BUSY]

    for seq in range(sent):  # 12 MiB: more than the pipe, the kernel and the bound hold
        flooder.sock.send_multipart(_request(seq, 4000))  # waits while the broker catches up
        read_nacks()
    wait_for(lambda: (st := b.stats())["routed"] + st["nack_busy"] == sent, timeout=20)
    stats = b.stats()
    assert stats["deferred"] >= 1 and stats["nack_busy"] >= 1 and stats["errors"] == 0
    assert stats["peak_peer_bytes"] <= 2 << 20
    got = []
    while len(got) < stats["routed"]:
        frames = slow.recv(timeout=10)
        assert frames[:2] == [wire.KIND_MSG, b"flooder"]
        got.append(int.from_bytes(frames[3][:4], "big"))
    assert got == sorted(got) and len(set(got)) == len(got)
    wait_for(lambda: read_nacks() or nacked == stats["nack_busy"], timeout=10)
    assert nacked + len(got) == sent


def test_without_sndhwm_every_send_is_counted_against_the_bound(
    make_broker: Callable[..., Broker], peer: PeerFactory
) -> None:
    # sndhwm=0 lets libzmq queue any number of messages for a peer: the broker must then
    # track small ones too, or a peer that never reads makes it hold all it is sent.
    b = make_broker(sndhwm=0, max_peer_queue=1 << 20)
    slow = peer(b.url, "slow", rcvhwm=1)
    flooder = peer(b.url, "flooder")
    sent = 8000
    flooder.sock.sndtimeo = 10_000
    for seq in range(sent):  # 7 MiB of messages under 1 KiB, which a broker never tracked
        flooder.sock.send_multipart(_request(seq, 900))  # waits while the broker catches up
        while flooder.poll_one() is not None:
            pass
    wait_for(lambda: (st := b.stats())["routed"] + st["nack_busy"] == sent, timeout=20)
    stats = b.stats()
    assert stats["nack_busy"] >= 1 and stats["peak_peer_bytes"] <= 1 << 20
    assert stats["errors"] == 0
    slow.close()


def test_bad_bind_raises_broker_error(broker: Broker) -> None:
    taken = Broker(broker.url)
    with pytest.raises(BrokerError, match=broker.url.replace(".", r"\.")) as info:
        taken.start(timeout=1.0)
    assert not isinstance(info.value, zmq.ZMQError)
    taken.stop()  # never started: nothing to do
    with pytest.raises(BrokerError, match="no-such-transport"):
        Broker("no-such-transport://x").start()


def test_stop_is_prompt_and_idempotent(ctx: zmq.Context[Any], peer: PeerFactory) -> None:
    with Broker(ANY_PORT, heartbeat_interval=30.0, context=ctx) as b:
        peer(b.url, "site-1")
        with pytest.raises(BrokerError, match="already running"):
            b.start()
        t0 = time.monotonic()
        b.stop()
        assert time.monotonic() - t0 < 0.5
        b.stop()
    assert not ctx.closed  # a context we passed in is ours to end


def test_main_returns_2_on_bad_bind(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bind", broker.url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and broker.url in err[0] and "cannot bind" in err[0]


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line the process prints, without blocking past `timeout`."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line from the broker within {timeout}s: {buf!r}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"broker exited early: {buf!r}")
            buf += chunk
    return buf.decode().splitlines()[0]


def test_python_m_broker(peer: PeerFactory, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (
        open(tmp_path / "stderr", "wb") as err,
        subprocess.Popen(
            [sys.executable, "-m", "broker", "--bind", ANY_PORT, "--cell-timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=tmp_path,
        ) as proc,
    ):
        try:
            line = _read_line(proc, timeout=20.0)
            assert line.startswith("objdl broker listening on tcp://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            a, s = peer(url, "site-1"), peer(url, "server")
            a.send(wire.KIND_MSG, b"server", HEADERS, b"via the cli")
            assert s.recv() == [wire.KIND_MSG, b"site-1", HEADERS, b"via the cli"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, (tmp_path / "stderr").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
