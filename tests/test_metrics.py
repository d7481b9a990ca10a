"""A broker you can watch: /metrics scraped over HTTP, as Prometheus would.

The numbers follow the broker (cells come and go, counters move with traffic); the
HTTP thread ends with the broker, whatever its clients do; a missing
prometheus_client is a one-line error, exit 2 on the command line.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from broker import Broker, BrokerError, MetricsUnavailableError, _collector, metrics
from broker.metrics import MAX_CONNECTIONS, MAX_REQUEST_BYTES, TOP_PEERS, RelayLink
from broker.routing import COUNTERS
from objdl import wire
from objdl.cell import Cell
from objdl.message import Message
from tests._cli_procs import CLI, Child, run
from tests.conftest import wait_for

ANY = "tcp://127.0.0.1:*"
HEADERS = b"\x82\xa6req_id\x07\xa6origin\xa6server"  # opaque to the broker


def scrape(
    b: Broker, accept: str | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at the broker's /metrics: {(name, sorted labels): value}."""
    assert b.metrics_url is not None
    request = urllib.request.Request(b.metrics_url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5.0) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("objdl-broker-metrics")]


@pytest.fixture
def mbroker() -> Iterator[Broker]:
    """A started broker with metrics on a free loopback port."""
    b = Broker(ANY, metrics="127.0.0.1:0")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def dealer(ctx: zmq.Context[Any], url: str, name: str | None = None) -> zmq.Socket[Any]:
    """A bare DEALER connection, registered as `name` if given."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url)
    if name is not None:
        sock.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode()])
        assert sock.poll(5000), "no REG_OK"
        assert sock.recv_multipart() == [wire.KIND_REG_OK, name.encode()]
    return sock


# ---------------------------------------------------------------- what it says


def test_cells_gauge_follows_cells_coming_and_going(mbroker: Broker) -> None:
    assert value(scrape(mbroker), "objdl_broker_cells") == 0
    a, b = Cell("site-1", mbroker.url), Cell("site-2", mbroker.url)
    a.start()
    b.start()
    try:
        assert value(scrape(mbroker), "objdl_broker_cells") == 2
        a.stop()  # says BYE: forgotten at once
        wait_for(lambda: value(scrape(mbroker), "objdl_broker_cells") == 1)
        samples = scrape(mbroker)
        assert value(samples, "objdl_broker_cells_left_total", reason="bye") == 1
        assert value(samples, "objdl_broker_registrations_total", result="ok") == 2
    finally:
        a.stop()
        b.stop()
    wait_for(lambda: value(scrape(mbroker), "objdl_broker_cells") == 0)


def test_counters_move_with_traffic(mbroker: Broker, ctx: zmq.Context[Any]) -> None:
    before = scrape(mbroker)
    assert value(before, "objdl_broker_routed_messages_total", kind="msg") == 0
    with Cell("server", mbroker.url) as owner, Cell("site-1", mbroker.url) as site:
        owner.register_request_cb("app", "ping", lambda req: Message(payload="pong"), inline=True)
        for _ in range(5):
            reply = site.send_request("app", "server", "ping", Message(payload="hi"), timeout=5.0)
            assert reply.payload == "pong"
        site.send_request("app", "nobody", "ping", Message(payload="hi"), timeout=5.0)
    junk = dealer(ctx, mbroker.url)
    junk.send_multipart([b"JUNK", b"x"])
    wait_for(lambda: value(scrape(mbroker), "objdl_broker_drops_total", cause="unknown_kind") == 1)
    after = scrape(mbroker)
    assert value(after, "objdl_broker_routed_messages_total", kind="msg") == 10  # 5 each way
    routed_bytes = value(after, "objdl_broker_routed_bytes_total", kind="msg")
    assert 10 * 20 < routed_bytes < 10 * 1024  # ten small MSGs: their frames, no overhead
    assert value(before, "objdl_broker_routed_bytes_total", kind="msg") == 0
    assert value(after, "objdl_broker_nacks_total", reason="unreachable") == 1
    assert value(after, "objdl_broker_nacks_total", reason="busy") == 0
    junk.close()


def test_bytes_queued_for_a_peer_that_stops_reading_carry_its_name(
    ctx: zmq.Context[Any],
) -> None:
    with Broker(ANY, metrics="127.0.0.1:0", sndhwm=4, max_peer_queue=8 << 20) as b:
        slow = ctx.socket(zmq.DEALER)
        slow.linger = 0
        slow.rcvhwm = 1
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.connect(b.url)
        slow.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, b"slow"])
        wait_for(lambda: "slow" in b.cells())  # then it never reads again
        sender = dealer(ctx, b.url, "sender")
        chunk = b"x" * (256 << 10)
        for _ in range(80):  # 20 MiB: more than the kernel's buffers and the bound hold
            sender.send_multipart([wire.KIND_MSG, b"slow", HEADERS, chunk])

        def queued() -> dict[Any, float] | None:
            s = scrape(b)
            held = s.get(("objdl_broker_peer_queued_bytes", (("cell", "slow"),)), 0.0)
            return s if held > 4 << 20 else None

        samples: Any = wait_for(queued)
        held = value(samples, "objdl_broker_peer_queued_bytes", cell="slow")
        assert value(samples, "objdl_broker_queued_bytes") >= held
        assert value(samples, "objdl_broker_queued_peers") >= 1
        assert value(samples, "objdl_broker_peer_queue_limit_bytes") == 8 << 20
        assert value(samples, "objdl_broker_peer_queue_peak_bytes") >= held
        wait_for(lambda: value(scrape(b), "objdl_broker_nacks_total", reason="busy") > 0)
        slow.close()
        sender.close()


def test_per_peer_series_are_bounded_to_the_top_peers() -> None:
    """Why top N: the question is *who* backs the broker up, so the series carry names;
    a federation of thousands of cells must not make thousands of series."""
    by_cell = {f"site-{i}": 1000 + i for i in range(10 * TOP_PEERS)}
    by_cell[""] = 5  # connections without a name, summed
    families = {f.name: f for f in _collector._queues(0, by_cell, len(by_cell), 64 << 20)}
    top = families["objdl_broker_peer_queued_bytes"].samples
    assert len(top) == TOP_PEERS
    expected = {f"site-{i}" for i in range(10 * TOP_PEERS - TOP_PEERS, 10 * TOP_PEERS)}
    assert {s.labels["cell"] for s in top} == expected
    assert families["objdl_broker_queued_bytes"].samples[0].value == sum(by_cell.values())


def test_every_routing_counter_has_a_family_of_its_own(mbroker: Broker) -> None:
    samples = scrape(mbroker)
    others = {labels for name, labels in samples if name == "objdl_broker_other_total"}
    assert others == set(), f"counters without a family: {others}"
    assert len(
        [k for k in samples if k[0].startswith("objdl_broker_") and k[0].endswith("_total")]
    ) >= len(COUNTERS)


def test_unknown_counters_still_show_and_counters_never_go_down(
    mbroker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mbroker.stats
    routed = iter([7, 3])  # the broker lowers routed when a counted send fails later
    monkeypatch.setattr(mbroker, "stats", lambda: {**real(), "routed": next(routed), "new": 4})
    first, second = scrape(mbroker), None
    assert value(first, "objdl_broker_other_total", counter="new") == 4
    assert value(first, "objdl_broker_routed_messages_total", kind="msg") == 7
    second = scrape(mbroker)
    assert value(second, "objdl_broker_routed_messages_total", kind="msg") == 7


def test_relay_links_have_their_place(mbroker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = scrape(mbroker)
    assert value(samples, "objdl_broker_relay_links", direction="up", state="connected") == 0
    info = [k for k in samples if k[0] == "objdl_broker_info"]
    assert info and dict(info[0][1])["role"] == "root" and dict(info[0][1])["url"] == mbroker.url
    links = [
        RelayLink("up", "site-1", "tcp://parent:8002", up=False),
        RelayLink("down", "site-1.ward-3", "", up=True),
    ]
    monkeypatch.setattr(mbroker, "relay_links", lambda: links, raising=False)
    samples = scrape(mbroker)
    assert value(samples, "objdl_broker_relay_links", direction="up", state="disconnected") == 1
    assert value(samples, "objdl_broker_relay_links", direction="down", state="connected") == 1
    up = (
        "objdl_broker_relay_link_up",
        (("direction", "up"), ("prefix", "site-1"), ("url", "tcp://parent:8002")),
    )
    assert samples[up] == 0
    assert dict(next(k for k in samples if k[0] == "objdl_broker_info")[1])["role"] == "relay"


def test_openmetrics_is_served_when_asked_for(mbroker: Broker) -> None:
    samples = scrape(mbroker, accept="application/openmetrics-text; version=1.0.0")
    assert ("objdl_broker_cells", ()) in samples


# ---------------------------------------------------------------- lifecycle


def test_the_thread_and_its_sockets_end_with_the_broker() -> None:
    b = Broker(ANY, metrics="127.0.0.1:0")
    assert metrics_threads() == []
    b.start()
    url = b.metrics_url
    assert url is not None and not url.endswith(":0/metrics")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with Cell("site-1", b.url):
        assert value(scrape(b), "objdl_broker_cells") == 1
        assert len(metrics_threads()) == 1
    b.stop()
    assert metrics_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2.0).close()
    b.start()  # a restart serves on the same port, counters from zero
    try:
        assert b.metrics_url == url
        assert value(scrape(b), "objdl_broker_registrations_total", result="ok") == 0
    finally:
        b.stop()
    assert metrics_threads() == []


def test_a_metrics_port_in_use_fails_the_start_and_leaves_nothing(mbroker: Broker) -> None:
    assert mbroker.metrics_url is not None
    taken = mbroker.metrics_url.removeprefix("http://").removesuffix("/metrics")
    other = Broker(ANY, metrics=taken)
    with pytest.raises(BrokerError, match="cannot serve metrics"):
        other.start(timeout=2.0)
    assert len(metrics_threads()) == 1  # only mbroker's
    assert not [t for t in threading.enumerate() if t.name == f"objdl-broker {other.url}"]
    other.stop()
    with Broker(other.url):  # its ROUTER's address was let go too
        pass


@pytest.mark.parametrize(
    "address",
    ["9102", ":9102", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "::1:9102", "[nope]:1"],
)
def test_bad_addresses_are_refused_naming_what_to_give(address: str) -> None:
    with pytest.raises(ValueError, match="metrics: "):
        Broker(ANY, metrics=address)


def test_missing_prometheus_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "broker._collector")
    with pytest.raises(MetricsUnavailableError, match=r"pip install 'objdl\[metrics\]'"):
        Broker(ANY, metrics="127.0.0.1:0")
    Broker(ANY)  # without metrics= nothing needs it


# ---------------------------------------------------------------- attacks


def test_silent_and_flooding_clients_cannot_hold_the_thread_or_block_a_scrape(
    mbroker: Broker,
) -> None:
    """Twice as many connections as allowed, none sending a byte: the oldest are
    closed to let new ones in, a scrape still gets its answer, and stop() closes the
    rest and ends the thread at once."""
    assert mbroker.metrics_url is not None
    port = int(mbroker.metrics_url.rsplit(":", 1)[1].split("/")[0])
    silent = [
        socket.create_connection(("127.0.0.1", port), timeout=5.0)
        for _ in range(2 * MAX_CONNECTIONS)
    ]
    try:
        assert value(scrape(mbroker), "objdl_broker_cells") == 0
        oldest = silent[0]
        assert oldest.recv(1) == b""  # closed by the server, to make room
        t0 = time.monotonic()
        mbroker.stop()
        assert time.monotonic() - t0 < 1.0
        assert metrics_threads() == []
        for s in silent[-MAX_CONNECTIONS + 1 :]:
            assert s.recv(1) == b""  # every connection closed with the thread
    finally:
        for s in silent:
            s.close()


def test_a_client_that_never_finishes_its_request_is_cut_off(
    mbroker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.3)
    assert mbroker.metrics_url is not None
    port = int(mbroker.metrics_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - t0 < 3.0


def _raw(b: Broker, request: bytes) -> bytes:
    assert b.metrics_url is not None
    port = int(b.metrics_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_malformed_and_oversized_requests_get_an_http_error(mbroker: Broker) -> None:
    assert _raw(mbroker, b"\x00\xff junk\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(mbroker, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _raw(mbroker, b"GET /admin HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (4 * MAX_REQUEST_BYTES)
    assert _raw(mbroker, huge).startswith(b"HTTP/1.1 431 ")
    head = _raw(mbroker, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert value(scrape(mbroker), "objdl_broker_cells") == 0  # and it still serves


# ---------------------------------------------------------------- command line


def test_the_command_line_serves_metrics_until_sigterm() -> None:
    child = Child([*CLI, "broker", "--bind", ANY, "--metrics", "127.0.0.1:0"])
    try:
        line = child.wait_for_line(lambda s: s.startswith("objdl broker metrics at "))
        url = line.split(" at ", 1)[1]
        with urllib.request.urlopen(url, timeout=5.0) as reply:
            assert b"objdl_broker_cells 0.0" in reply.read()
        child.signal(signal.SIGTERM)
        assert child.wait() == 0
    finally:
        child.stop()


def test_the_command_line_refuses_bad_metrics_in_one_line() -> None:
    bad = run([sys.executable, "-m", "broker", "--bind", ANY, "--metrics", "9102"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines() == [bad.stderr.strip()]
        and "metrics: '9102' is not HOST:PORT" in bad.stderr
    )
    missing = run(
        [sys.executable, "-c",
         "import sys; sys.modules['prometheus_client'] = None\n"
         "from broker.__main__ import main\n"
         "raise SystemExit(main(['--bind', 'tcp://127.0.0.1:*', '--metrics', '127.0.0.1:0']))"]
    )  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "pip install 'objdl[metrics]'" in missing.stderr
