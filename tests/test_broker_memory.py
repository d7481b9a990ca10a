"""The broker's memory under a peer that asks for much and never reads (real processes).

A bare DEALER registers as a site, asks an owner for 160 replies of 2 MiB (what a
site with ``window=160`` asks for) and never reads one. The owner answers every request
(a plain handler, so this is about the broker alone, whatever caps the owner has): the
broker must hold at most its per-peer bound for that peer, count what it refused, and
keep routing for everyone else. The second attack sends that peer messages just too
small to be tracked one by one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from typing import Any

import psutil
import pytest
import zmq

from broker.routing import DEFAULT_MAX_PEER_QUEUE
from broker.server import _track_min
from objdl import wire
from objdl.cell import Cell
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode
from objdl.objects import download_bytes
from tests._broker_procs import big_reply_owner_main, stats_broker_main
from tests.conftest import wait_for

MiB = 1024 * 1024
CHUNK = 2 * MiB
WINDOW = 160  # requests the attacker sends: 320 MiB of replies
SLACK = 32 * MiB  # allocator and libzmq bookkeeping, received frames being routed
OFFER = 128 * MiB
KERNEL = 32 * MiB  # at most this much in the TCP buffers between broker and attacker

_H = MessageHeaderKey


def _request(i: int) -> list[Any]:
    headers = {
        _H.CHANNEL: "attack",
        _H.TOPIC: "chunk",
        _H.REQ_ID: i + 1,
        _H.MSG_TYPE: MessageType.REQUEST,
    }
    body = {"offset": i * CHUNK, "n": CHUNK}
    return [wire.KIND_MSG, b"owner", *wire.encode(Message(headers, body))]


def _ask(conn: Any, what: str = "stats") -> Any:
    conn.send(what)
    assert conn.poll(10), f"no answer to {what!r}"
    return conn.recv()


def _reset_peak(pid: int) -> None:
    """Make the process's VmHWM start again from its current RSS (Linux)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.timeout(180)
def test_peer_that_stops_reading_cannot_grow_the_broker() -> None:
    mp = multiprocessing.get_context("spawn")
    broker_end, broker_conn = mp.Pipe()
    owner_end, owner_conn = mp.Pipe()
    broker = mp.Process(target=stats_broker_main, args=({}, broker_end), daemon=True)
    owner: Any = None
    attacker: Any = None
    try:
        broker.start()
        assert broker_conn.poll(30), "broker did not start"
        url = broker_conn.recv()
        owner = mp.Process(
            target=big_reply_owner_main, args=(url, CHUNK, OFFER, owner_end), daemon=True
        )
        owner.start()
        assert owner_conn.poll(60), "owner did not start"
        ref = owner_conn.recv()
        assert broker.pid is not None
        proc = psutil.Process(broker.pid)

        ctx = zmq.Context.instance()
        attacker = ctx.socket(zmq.DEALER)
        attacker.linger = 0
        attacker.rcvhwm = 1
        attacker.connect(url)
        attacker.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, b"attacker"])
        assert attacker.poll(5000) and attacker.recv_multipart()[0] == wire.KIND_REG_OK

        time.sleep(0.2)  # let the broker settle before its baseline
        _reset_peak(broker.pid)
        base = proc.memory_info().rss
        for i in range(WINDOW):  # ...and never read again
            attacker.send_multipart(_request(i))

        last_hb = 0.0

        def all_replies_handled() -> bool:
            nonlocal last_hb
            if time.monotonic() - last_hb > 0.5:  # stay registered: send, never read
                attacker.send_multipart([wire.KIND_HB])
                last_hb = time.monotonic()
            st = _ask(broker_conn)
            return _ask(owner_conn, "count") == WINDOW and (
                st["routed"] + st["drop_busy"] >= 2 * WINDOW
            )

        wait_for(all_replies_handled, timeout=60, interval=0.1)
        growth = _peak_kib(broker.pid) * 1024 - base
        stats = _ask(broker_conn)
        print(
            f"broker peak RSS growth {growth / MiB:.1f} MiB; {stats['drop_busy']} replies "
            f"dropped, peak per-peer {stats['peak_peer_bytes'] / MiB:.1f} MiB"
        )
        assert growth <= DEFAULT_MAX_PEER_QUEUE + SLACK, f"grew {growth / MiB:.0f} MiB"
        assert stats["peak_peer_bytes"] <= DEFAULT_MAX_PEER_QUEUE
        # What did not fit was refused and counted: every reply beyond the bound and
        # what the kernel's socket buffers took (a few MiB on loopback).
        assert stats["drop_busy"] >= WINDOW - (DEFAULT_MAX_PEER_QUEUE + KERNEL) // CHUNK
        assert stats["errors"] == 0

        # The broker stays responsive: another cell's request gets its 2 MiB reply...
        with Cell("site-1", url) as site:
            reply = site.send_request("attack", "owner", "chunk", Message(payload=1), 10.0)
            assert reply.get_header(_H.RETURN_CODE) == ReturnCode.OK
            assert len(reply.payload) == CHUNK
            # ...and an honest site downloads the offered object, the attacker still stalled.
            data = download_bytes(site, "owner", ref)
            assert len(data) == OFFER and data[-1] == 0
        assert proc.memory_info().rss - base <= DEFAULT_MAX_PEER_QUEUE + 2 * SLACK
    finally:
        if attacker is not None:
            attacker.close(linger=0)
        for conn, child in ((owner_conn, owner), (broker_conn, broker)):
            if child is not None and child.is_alive():
                with contextlib.suppress(OSError):
                    conn.send("stop")
                child.join(10)
                if child.is_alive():
                    child.kill()
                    child.join(10)
        for c in (broker_conn, broker_end, owner_conn, owner_end):
            c.close()


@pytest.mark.timeout(180)
def test_untracked_messages_cannot_grow_the_broker_past_its_bound() -> None:
    # Messages under the broker's tracking threshold are not tracked one by one: libzmq
    # may hold SNDHWM (1000) of them for a peer, under 1/8 of the bound; past that they
    # wait in the broker, counted, and past the bound they are refused.
    nbytes = _track_min(DEFAULT_MAX_PEER_QUEUE, 1000) - 200  # the body: the MSG stays under
    count = DEFAULT_MAX_PEER_QUEUE * 3 // 2 // nbytes
    mp = multiprocessing.get_context("spawn")
    broker_end, broker_conn = mp.Pipe()
    broker = mp.Process(target=stats_broker_main, args=({}, broker_end), daemon=True)
    ctx = zmq.Context.instance()
    socks: list[Any] = []
    try:
        broker.start()
        assert broker_conn.poll(30), "broker did not start"
        url = broker_conn.recv()
        assert broker.pid is not None
        for name in (b"attacker", b"flooder"):
            sock = ctx.socket(zmq.DEALER)
            socks.append(sock)
            sock.linger = 0
            if name == b"attacker":
                sock.rcvhwm = 1
                sock.setsockopt(zmq.RCVBUF, 4096)
            sock.connect(url)
            sock.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, name])
            assert sock.poll(5000) and sock.recv_multipart()[0] == wire.KIND_REG_OK
        attacker, flooder = socks
        time.sleep(0.2)  # let the broker settle before its baseline
        _reset_peak(broker.pid)
        base = psutil.Process(broker.pid).memory_info().rss
        headers = {_H.CHANNEL: "attack", _H.TOPIC: "t", _H.MSG_TYPE: MessageType.REQUEST}
        nacks = 0
        for i in range(count):  # 96 MiB for a peer that never reads
            message = Message({**headers, _H.REQ_ID: i + 1}, bytes(nbytes))
            flooder.send_multipart([wire.KIND_MSG, b"attacker", *wire.encode(message)])
            while flooder.poll(0):
                nacks += flooder.recv_multipart()[:3] == [wire.KIND_NACK, b"attacker", b"busy"]
            if i % 1000 == 0:
                attacker.send_multipart([wire.KIND_HB])  # stay registered: send, never read
        wait_for(lambda: (st := _ask(broker_conn))["routed"] + st["nack_busy"] >= count, 60)
        growth = _peak_kib(broker.pid) * 1024 - base
        stats = _ask(broker_conn)
        print(
            f"{count} messages of {nbytes} bytes: broker peak RSS growth "
            f"{growth / MiB:.1f} MiB; {stats['nack_busy']} NACKed busy, "
            f"{stats['deferred']} deferred, peak per-peer {stats['peak_peer_bytes'] / MiB:.1f} MiB"
        )
        assert growth <= DEFAULT_MAX_PEER_QUEUE * 9 // 8 + SLACK, f"grew {growth / MiB:.0f} MiB"
        assert stats["peak_peer_bytes"] <= DEFAULT_MAX_PEER_QUEUE
        assert stats["nack_busy"] >= count // 4 and stats["errors"] == 0
    finally:
        for sock in socks:
            sock.close(linger=0)
        if broker.is_alive():
            with contextlib.suppress(OSError):
                broker_conn.send("stop")
            broker.join(10)
            if broker.is_alive():
                broker.kill()
                broker.join(10)
        broker_conn.close()
        broker_end.close()
