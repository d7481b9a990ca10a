"""Cells given a standby broker: start past a dead first one, and fail over mid-download."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker import Broker
from objdl import aio, wire
from objdl._session import Session, SessionState
from objdl.cell import Cell
from objdl.errors import BrokerUnavailableError
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import download_file, offer_file
from tests._cli_procs import Child

pytestmark = pytest.mark.timeout(90)

RC = MessageHeaderKey.RETURN_CODE
MiB = 1 << 20


# ---------------------------------------------------------------- the session's rules


def test_connecting_too_long_moves_to_the_next_broker() -> None:
    s = Session("site-1", 0.0, switch_after=1.0)
    assert s.tick(0.0).send and not s.tick(0.5).reconnect
    assert s.next_deadline() <= 1.0
    act = s.tick(1.0)
    assert act.reconnect and not act.lost and s.state is SessionState.CONNECTING
    s.socket_replaced(1.0)
    assert not s.tick(1.5).reconnect  # a full turn for the next broker


def test_a_standby_broker_sends_the_cell_on_at_once() -> None:
    s = Session("site-1", 0.0, switch_after=5.0)
    s.tick(0.0)
    act = s.on_frame(wire.KIND_REG_ERR, [wire.KIND_REG_ERR, b"site-1", wire.REG_STANDBY], 0.1)
    assert not act.refused and s.state is SessionState.CONNECTING
    assert s.next_deadline() <= 0.1 and s.tick(0.1).reconnect


def test_with_one_broker_standby_is_a_refusal_and_silence_never_switches() -> None:
    s = Session("site-1", 0.0)
    s.tick(0.0)
    assert not s.tick(100.0).reconnect  # CONNECTING: keeps asking the one broker
    act = s.on_frame(wire.KIND_REG_ERR, [wire.KIND_REG_ERR, b"site-1", wire.REG_STANDBY], 100.1)
    assert act.refused == "standby" and s.state is SessionState.REFUSED


def test_broker_urls_are_checked() -> None:
    for bad in ([], "tcp://a:1,nonsense", ["tcp://a:1", "tcp://a:1"], [1]):
        with pytest.raises(ValueError, match="broker"):
            Cell("site-1", bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- real brokers


def test_start_skips_a_dead_first_broker(broker: Broker, dead_url: str) -> None:
    t0 = time.monotonic()
    with Cell("site-1", [dead_url, broker.url], start_timeout=5.0) as cell:
        took = time.monotonic() - t0
        assert cell.is_connected and cell.broker_url == broker.url
    assert took < 3.0, took  # the dead one had its share, not the whole start
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        Cell("site-2", f"{dead_url},{dead_url.replace('tcp://', 'ipc:///tmp/')}").start(1.0)
    assert time.monotonic() - t0 < 2.5
    assert dead_url in str(info.value)


def test_an_asyncio_cell_skips_a_dead_first_broker(broker: Broker, dead_url: str) -> None:
    async def main() -> str:
        async with aio.Cell("site-1", [dead_url, broker.url], start_timeout=5.0) as cell:
            return cell.broker_url

    assert asyncio.run(main()) == broker.url


def _broker_process() -> tuple[Child, str]:
    child = Child([sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:*"])
    url = child.wait_for_line(lambda line: "listening on" in line).rsplit(" ", 1)[-1]
    return child, url


def test_a_download_in_flight_completes_on_the_standby_when_the_primary_dies(
    tmp_path: Path,
) -> None:
    """The primary broker is killed (SIGKILL) mid-download; owner and site move to the
    standby and the download completes within its retry budget, verified."""
    primary, purl = _broker_process()
    standby, surl = _broker_process()
    urls = [purl, surl]
    src = tmp_path / "model.bin"
    data = os.urandom(48 * MiB)
    src.write_bytes(data)
    owner = Cell("server", urls, broker_timeout=1.0, heartbeat_interval=0.25)
    site = Cell("site-1", urls, broker_timeout=1.0, heartbeat_interval=0.25)
    try:
        owner.start()
        site.start()
        assert owner.broker_url == site.broker_url == purl
        ref = offer_file(owner, src, timeout=60.0, chunk_size=256 * 1024)
        killed = threading.Event()
        got: dict[str, Any] = {}

        def progress(ref_id: str, done: int, total: int | None, rate: float) -> None:
            if done >= 8 * MiB and not killed.is_set():
                killed.set()
                primary.signal(signal.SIGKILL)

        def fetch() -> None:
            try:
                got["path"] = download_file(
                    site,
                    "server",
                    ref,
                    tmp_path / "out.bin",
                    per_request_timeout=3.0,
                    window=2,
                    progress_cb=progress,
                    progress_interval=0.0,
                )
            except Exception as exc:  # reported below
                got["error"] = exc

        t = threading.Thread(target=fetch)
        t.start()
        t.join(60)
        assert not t.is_alive()
        assert killed.is_set()
        assert "error" not in got, got
        assert hashlib.sha256(got["path"].read_bytes()).digest() == hashlib.sha256(data).digest()
        assert owner.broker_url == site.broker_url == surl
        assert site.stats["reconnects"] >= 1 and owner.stats["reconnects"] >= 1
        # And plain requests go on through the standby.
        owner.register_request_cb("ch", "echo", lambda req: Message(payload=req.payload))
        reply = site.send_request("ch", "server", "echo", Message(payload=1), 5.0)
        assert reply.get_header(RC) == ReturnCode.OK and reply.payload == 1
    finally:
        site.stop()
        owner.stop()
        primary.stop()
        standby.stop()


def test_the_command_line_takes_a_broker_and_its_standby(broker: Broker, dead_url: str) -> None:
    from tests._cli_procs import run_cli

    with Cell("alpha", broker.url):
        proc = run_cli(["cells", "--broker", f"{dead_url},{broker.url}"])
        assert proc.returncode == 0, proc.stderr
        assert f"alpha\t{broker.url}" in proc.stdout.splitlines()  # the broker that answered
    proc = run_cli(["cells", "--broker", f"{broker.url},{broker.url}"])
    assert proc.returncode == 2 and "names a broker twice" in proc.stderr
