"""Direct data links (``Cell(data_bind=...)``) through the public API, on a real broker.

An owner with a data socket offers it in the first reply of a download; the site opens
a link and the chunks skip the broker. These tests check that they do (the broker's
``routed_bytes``), and that every way a link can fail (no offer, links off, nobody
listening, cut, black hole, broker gone) still ends in a complete, verified download.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from objdl import (
    Cell,
    CellError,
    ObjDownloader,
    download_bytes,
    download_dict,
    download_file,
    offer_bytes,
    offer_dict,
    offer_file,
)
from tests import _procs
from tests._netproxy import ESTABLISHED, LISTEN, Proxy, free_port, port_of, tcp_states
from tests.conftest import wait_for

MiB = 1024 * 1024
FAST: dict[str, Any] = {"broker_timeout": 1.0, "heartbeat_interval": 0.2}
LOOPBACK = "tcp://127.0.0.1:*"


@pytest.fixture(autouse=True)
def _downloader_state() -> Iterator[None]:
    yield
    ObjDownloader.shutdown()


class Blob:
    """Random bytes and their sha256, with a short repr (pytest prints arguments)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = os.urandom(size)
        self.sha = hashlib.sha256(self.data).hexdigest()

    def __repr__(self) -> str:
        return f"Blob({len(self.data)} bytes)"


@pytest.fixture(scope="module")
def blob() -> Blob:
    """Made once for the tests that break something in the middle of a download."""
    return Blob(256 * MiB)


def routed(broker: Any) -> int:
    return int(broker.stats()["routed_bytes"])


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def proxied_owner(
    make_cell: Callable[..., Cell], proxies: Callable[[int], Proxy]
) -> tuple[Cell, Proxy]:
    """An owner "server" whose data socket sites reach only through a :class:`Proxy`.

    Its data port is chosen up front, so that the proxy can be made before the owner
    (which has to advertise the proxy's address)."""
    port = free_port()
    proxy = proxies(port)
    owner = make_cell(
        "server", data_bind=f"tcp://127.0.0.1:{port}", data_advertise=proxy.url, **FAST
    )
    assert owner.data_url == proxy.url
    return owner, proxy


class Download(threading.Thread):
    """download_bytes in a thread; `done` is the progress seen, `result` the bytes."""

    def __init__(
        self, cell: Cell, ref: str, on_progress: Callable[[int], None] | None = None, **kw: Any
    ) -> None:
        super().__init__(name=f"test-download-{cell.fqcn}")
        self.cell, self.ref, self.kw = cell, ref, kw
        self.on_progress = on_progress
        self.done = 0
        self.result: bytearray | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        def progress(ref_id: str, done: int, total: Any, rate: float) -> None:
            self.done = done
            if self.on_progress is not None:
                self.on_progress(done)

        try:
            self.result = download_bytes(
                self.cell,
                "server",
                self.ref,
                progress_cb=progress,
                progress_interval=0.01,
                **self.kw,
            )
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> bytearray:
        self.join(timeout)
        assert not self.is_alive(), f"download still running after {timeout}s ({self.done} B)"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


# -- 1. the chunks skip the broker ------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["file", "bytes", "dict"])
def test_download_goes_over_the_link(
    kind: str, broker: Any, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    owner = make_cell("server", data_bind=LOOPBACK)
    site = make_cell("site-1")
    assert owner.data_url is not None and owner.data_url.startswith("tcp://127.0.0.1:")
    assert site.link_state("server") == "none"
    # The first reply comes through the broker, and so may the replies to what was
    # asked before the link was up (the window waits for it: the first reply, 2 MiB).
    size = 96 * MiB
    raw = os.urandom(size)
    before = routed(broker)
    if kind == "file":
        src = tmp_path / "model.bin"
        src.write_bytes(raw)
        ref = offer_file(owner, src)
        got = download_file(site, "server", ref, tmp_path / "copy.bin").read_bytes()
        assert sha(got) == sha(raw)
    elif kind == "bytes":
        ref = offer_bytes(owner, raw)
        assert sha(download_bytes(site, "server", ref)) == sha(raw)
    else:
        w = np.frombuffer(raw, dtype=np.float32).reshape(-1, 1024)
        b = np.arange(1000, dtype=np.int64)
        out = download_dict(site, "server", offer_dict(owner, {"w": w, "b": b}))
        assert set(out) == {"w", "b"}
        assert out["w"].dtype == np.float32 and out["w"].shape == w.shape
        assert sha(out["w"].tobytes()) == sha(raw)  # (random bits: NaNs, so not array_equal)
        assert np.array_equal(out["b"], b)
    through_broker = routed(broker) - before
    assert site.link_state("server") == "up"
    assert through_broker < size // 4, f"{through_broker} of {size} bytes crossed the broker"
    assert site.link_stats["links_opened"] == 1 and owner.link_stats["links_bound"] == 1


# -- 2, 3. no link offered, or links off ------------------------------------------------


@pytest.mark.timeout(30)
def test_owner_without_data_bind_uses_the_broker(
    broker: Any, make_cell: Callable[..., Cell]
) -> None:
    owner = make_cell("server")
    site = make_cell("site-1")
    assert owner.data_url is None and owner.link_offer("site-1") is None
    size = 32 * MiB
    raw = os.urandom(size)
    before = routed(broker)
    assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
    assert routed(broker) - before >= size
    assert site.link_state("server") == "none"
    assert site.link_stats["links_opened"] == 0


@pytest.mark.timeout(30)
def test_site_with_links_off_uses_the_broker(broker: Any, make_cell: Callable[..., Cell]) -> None:
    owner = make_cell("server", data_bind=LOOPBACK)
    site = make_cell("site-1", direct_links=False)
    size = 32 * MiB
    raw = os.urandom(size)
    before = routed(broker)
    assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
    assert routed(broker) - before >= size
    assert site.link_state("server") == "none"
    assert "direct_links=False" in site.open_link("server", owner.link_offer("site-1"))
    assert owner.link_stats["links_bound"] == 0


# -- 4. nobody listens where the owner says -----------------------------------------------


@pytest.mark.timeout(30)
def test_unreachable_data_address_falls_back_at_once(
    broker: Any, make_cell: Callable[..., Cell], dead_url: str
) -> None:
    plain = make_cell("plain")
    owner = make_cell("server", data_bind=LOOPBACK, data_advertise=dead_url)
    site = make_cell("site-1")
    assert owner.data_url == dead_url
    size = 64 * MiB
    raw = os.urandom(size)

    started = time.monotonic()
    assert sha(download_bytes(site, "plain", offer_bytes(plain, raw))) == sha(raw)
    usual = time.monotonic() - started

    before = routed(broker)
    started = time.monotonic()
    assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
    took = time.monotonic() - started
    assert took < usual + 3.0, f"{took:.2f}s against {usual:.2f}s through the broker alone"
    assert routed(broker) - before >= size
    wait_for(lambda: site.link_state("server") == "failed", timeout=10)
    assert site.link_stats["links_failed"] == 1 and site.link_stats["links_lost"] == 0
    # A link that failed is not tried again at once: the next download just uses the broker.
    assert site.open_link("server", owner.link_offer("site-1")) == "failed lately"


# -- 5. the link is cut, or turns into a black hole, mid-download ----------------------------


@pytest.mark.timeout(40)
def test_link_cut_mid_download_completes_through_the_broker(
    blob: Blob, broker: Any, make_cell: Callable[..., Cell], proxies: Callable[[int], Proxy]
) -> None:
    owner, proxy = proxied_owner(make_cell, proxies)
    site = make_cell("site-1", **FAST)
    ref = offer_bytes(owner, blob.data)
    cut_at: list[int] = []

    def cut_early(done: int) -> None:  # (on the download's thread: the cut is in order)
        if proxy.to_site >= 32 * MiB and not cut_at:
            cut_at.append(done)
            cut_when.append(time.monotonic())
            proxy.cut()

    cut_when: list[float] = []
    before = routed(broker)
    d = Download(site, ref, cut_early, per_request_timeout=10.0)
    d.start()
    got = d.finish(30)
    assert cut_at and cut_at[0] < blob.size // 2, cut_at
    # The requests lost with the link are asked again at once, spending no try; none
    # waits for its per_request_timeout (10 s), the rest is a transfer by the broker.
    after_cut = time.monotonic() - cut_when[0]
    assert after_cut < 6.0, f"{after_cut:.1f}s from the cut to the end"
    assert sha(got) == blob.sha
    assert site.link_stats["links_lost"] == 1
    assert site.link_state("server") == "failed"
    assert routed(broker) - before >= blob.size - proxy.to_site  # the rest came this way
    assert owner.link_stats["links_bound"] == 1


@pytest.mark.timeout(40)
def test_link_turned_black_hole_falls_back_after_the_timeout(
    blob: Blob, broker: Any, make_cell: Callable[..., Cell], proxies: Callable[[int], Proxy]
) -> None:
    owner, proxy = proxied_owner(make_cell, proxies)
    site = make_cell("site-1", **FAST)
    ref = offer_bytes(owner, blob.data)
    holed: list[float] = []

    def hole(done: int) -> None:
        if proxy.to_site >= 32 * MiB and not holed:
            holed.append(time.monotonic())
            proxy.black_hole()

    d = Download(site, ref, hole, per_request_timeout=10.0)
    d.start()
    wait_for(lambda: holed, timeout=20)
    wait_for(lambda: site.link_state("server") == "failed", timeout=10)
    fell_back = time.monotonic() - holed[0]
    # Silence for broker_timeout (1 s) takes the link down: not sooner, not much later.
    assert 0.8 <= fell_back < 3.0, fell_back
    assert sha(d.finish(30)) == blob.sha
    # The owner, which has not noticed yet, answers the retries the way they came (the
    # broker), not into the dead link: none waits for its per_request_timeout (10 s).
    after_hole = time.monotonic() - holed[0]
    assert after_hole < 7.0, f"{after_hole:.1f}s from the black hole to the end"
    assert site.link_stats["links_lost"] == 1
    # What the owner had queued on the dead connection is let go (it would otherwise
    # count against the site's share of the owner's memory for as long as the
    # black hole keeps the connection open).
    wait_for(lambda: ObjDownloader.inflight_stats(owner)["held"] == 0, timeout=10)


# -- 6. the broker goes away while the link is up -------------------------------------------


@pytest.mark.timeout(40)
def test_download_over_the_link_survives_the_broker_stopping() -> None:
    from broker import Broker

    b = Broker(LOOPBACK)
    b.start()
    with contextlib.ExitStack() as stack:
        stack.callback(b.stop)
        owner = Cell("server", b.url, data_bind=LOOPBACK, **FAST)
        owner.start()
        stack.callback(owner.stop)
        site = Cell("site-1", b.url, **FAST)
        site.start()
        stack.callback(site.stop)
        size = 64 * MiB
        raw = os.urandom(size)
        # Slow enough (about 20 MB/s) that the cells notice the broker is gone (after
        # broker_timeout, 1 s) long before the end.
        producer = _procs.throttled_producer(0.025, chunk_size=64 * 1024)
        tx = ObjDownloader.new_transaction(owner, producer, 60.0)
        ref = ObjDownloader.add_download_object(tx, raw)
        d = Download(site, ref, per_request_timeout=3.0)
        d.start()
        wait_for(lambda: d.done >= 8 * MiB, timeout=20)
        assert site.link_state("server") == "up"
        b.stop()
        wait_for(lambda: not site.is_connected and not owner.is_connected, timeout=5)
        left = size - d.done
        assert left > 16 * MiB, f"only {left} bytes were left when the broker was gone"
        assert sha(d.finish(30)) == sha(raw)
        assert site.link_state("server") == "up"
        assert site.link_stats["links_lost"] == 0


# -- 7. many downloads at once ---------------------------------------------------------------


@pytest.mark.timeout(40)
def test_four_sites_at_once_each_over_its_link(broker: Any, make_cell: Callable[..., Cell]) -> None:
    owner = make_cell("server", data_bind=LOOPBACK)
    sites = [make_cell(f"site-{i}") for i in range(4)]
    size = 96 * MiB
    raw = os.urandom(size)
    ref = offer_bytes(owner, raw)
    before = routed(broker)
    downloads = [Download(site, ref) for site in sites]
    for d in downloads:
        d.start()
    for d in downloads:
        assert sha(d.finish(30)) == sha(raw)
    through_broker = routed(broker) - before
    assert through_broker < len(sites) * size // 4, through_broker
    assert [s.link_state("server") for s in sites] == ["up"] * 4
    assert owner.link_stats["links_bound"] == 4 and owner.link_stats["links_refused"] == 0


@pytest.mark.timeout(40)
def test_two_downloads_on_one_site_share_one_link(
    broker: Any, make_cell: Callable[..., Cell]
) -> None:
    owner = make_cell("server", data_bind=LOOPBACK)
    site = make_cell("site-1")
    size = 96 * MiB
    a, b = os.urandom(size), os.urandom(size)
    before = routed(broker)
    downloads = [Download(site, offer_bytes(owner, a)), Download(site, offer_bytes(owner, b))]
    for d in downloads:
        d.start()
    assert sha(downloads[0].finish(30)) == sha(a)
    assert sha(downloads[1].finish(30)) == sha(b)
    assert routed(broker) - before < 2 * size // 4
    assert site.link_stats["links_opened"] == 1
    assert owner.link_stats["links_bound"] == 1
    assert site.link_state("server") == "up"


# -- 8. stopping with a link up ---------------------------------------------------------------


def _objdl_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("objdl-")}


@pytest.mark.timeout(30)
def test_stop_with_a_link_up_leaves_no_thread_or_socket(broker: Any) -> None:
    threads_before = _objdl_threads()
    owner = Cell("server", broker.url, data_bind=LOOPBACK)
    site = Cell("site-1", broker.url)
    with owner, site:
        raw = os.urandom(32 * MiB)
        assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
        assert site.link_state("server") == "up"
        assert owner.data_url is not None
        port = port_of(owner.data_url)
        assert ESTABLISHED in tcp_states(port) and LISTEN in tcp_states(port)
        ObjDownloader.shutdown()
        started = time.monotonic()
        site.stop()
        owner.stop()
        assert time.monotonic() - started < 3.0
    assert _objdl_threads() == threads_before
    # libzmq closes the sockets on its own I/O thread: give it a moment.
    wait_for(lambda: not {ESTABLISHED, LISTEN} & set(tcp_states(port)), timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


@pytest.mark.timeout(30)
def test_owner_stopping_takes_the_sites_link_down(
    broker: Any, make_cell: Callable[..., Cell]
) -> None:
    owner = Cell("server", broker.url, data_bind=LOOPBACK)
    owner.start()
    try:
        site = make_cell("site-1", **FAST)
        raw = os.urandom(16 * MiB)
        assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
        assert site.link_state("server") == "up"
    finally:
        ObjDownloader.shutdown()
        owner.stop()
    wait_for(lambda: site.link_state("server") == "failed", timeout=5)
    assert site.link_stats["links_lost"] == 1


# -- 9. the owner in another process ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_owner_in_another_process(
    broker: Any, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    mp = multiprocessing.get_context("spawn")
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(96 * MiB))
    results, stop = mp.Queue(), mp.Event()
    owner = mp.Process(target=_procs.direct_owner_main, args=(broker.url, str(src), results, stop))
    owner.start()
    try:
        kind, ref, data_url = results.get(timeout=30)
        assert kind == "ref" and data_url.startswith("tcp://127.0.0.1:")
        site = make_cell("site-1")
        before = routed(broker)
        path = download_file(site, "server", ref, tmp_path / "copy.bin")
        assert sha(path.read_bytes()) == sha(src.read_bytes())
        assert site.link_state("server") == "up"
        assert routed(broker) - before < src.stat().st_size // 4
        stop.set()
        kind, stats = results.get(timeout=15)
        assert kind == "stats" and stats["links_bound"] == 1, stats
        owner.join(15)
        assert owner.exitcode == 0
    finally:
        _procs.end_children([owner], results)


# -- 10. bad arguments ------------------------------------------------------------------------


def test_data_options_are_checked_when_the_cell_is_made() -> None:
    url = "tcp://127.0.0.1:1"  # never connected to: every case fails before start
    with pytest.raises(ValueError, match="need data_bind"):
        Cell("server", url, data_advertise="tcp://127.0.0.1:5555")
    with pytest.raises(ValueError, match="need data_bind"):
        Cell("server", url, data_allowed_keys={})
    for bad in ("http://127.0.0.1:80", "tcp://127.0.0.1", "127.0.0.1:80", "tcp://host:port"):
        with pytest.raises(ValueError, match="data_bind must look like"):
            Cell("server", url, data_bind=bad)
    for bad_adv in ("", "   ", "tcp://127.0.0.1", "tcp://127.0.0.1:*", "inproc://x", "a b"):
        with pytest.raises(ValueError, match="data_advertise"):
            Cell("server", url, data_bind=LOOPBACK, data_advertise=bad_adv)


def test_a_curve_cell_needs_keys_for_its_data_socket() -> None:
    import zmq

    broker_public, _ = zmq.curve_keypair()
    mine = zmq.curve_keypair()
    with pytest.raises(ValueError, match="data_allowed_keys"):
        Cell(
            "server",
            "tcp://127.0.0.1:1",
            curve_keys=mine,
            broker_public_key=broker_public.decode(),
            data_bind=LOOPBACK,
        )
    site_public, _ = zmq.curve_keypair()
    with pytest.raises(ValueError, match="curve_keys"):  # CURVE asked for, with no key pair
        Cell(
            "server",
            "tcp://127.0.0.1:1",
            data_bind=LOOPBACK,
            data_allowed_keys={"site-1": site_public.decode()},
        )


@pytest.mark.timeout(20)
def test_wildcard_bind_without_advertise_fails_at_start(broker: Any) -> None:
    threads_before = _objdl_threads()
    cell = Cell("server", broker.url, data_bind="tcp://0.0.0.0:*")  # (not bound: see below)
    with pytest.raises(CellError, match="data_advertise"):
        cell.start()
    cell.stop()
    assert _objdl_threads() == threads_before
    assert "server" not in broker.cells()


@pytest.mark.timeout(30)
def test_advertise_a_host_keeps_the_bound_port(broker: Any, make_cell: Callable[..., Cell]) -> None:
    owner = make_cell("server", data_bind=LOOPBACK, data_advertise="localhost")
    site = make_cell("site-1")
    assert owner.data_url is not None and owner.data_url.startswith("tcp://localhost:")
    port = port_of(owner.data_url)
    assert LISTEN in tcp_states(port)  # the port it bound, not another
    raw = os.urandom(16 * MiB)
    assert sha(download_bytes(site, "server", offer_bytes(owner, raw))) == sha(raw)
    assert site.link_state("server") == "up"


# -- a site that does not read -----------------------------------------------------------------


@pytest.mark.timeout(40)
def test_a_site_that_never_reads_does_not_stall_the_other_links(
    broker: Any, make_cell: Callable[..., Cell]
) -> None:
    """A site with a good token asks and asks over its link and reads nothing: the
    replies pile up for it alone, while another site's download still goes over its own
    link (it is not stuck behind them, and does not have to fall back)."""
    import zmq

    from objdl import Message, MessageHeaderKey, MessageType, wire

    owner = make_cell("server", data_bind=LOOPBACK)
    make_cell("evil")  # a real cell with that name: the broker would route its offer
    offer = owner.link_offer("evil")
    assert offer is not None and owner.data_url is not None
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    try:
        evil.linger = 0
        evil.rcvhwm = 1
        evil.setsockopt(zmq.RCVBUF, 4096)
        evil.connect(owner.data_url)
        evil.send_multipart([wire.KIND_LINK, b"evil", offer["token"]])
        assert evil.poll(5000), "no answer to LINK"
        assert evil.recv_multipart()[0] == wire.KIND_LINK_OK

        def ask(n: int) -> None:
            for i in range(n):
                headers = {
                    MessageHeaderKey.CHANNEL: "obj_downloader__",
                    MessageHeaderKey.TOPIC: "obj_downloader__download",
                    MessageHeaderKey.MSG_TYPE: MessageType.REQUEST,
                    MessageHeaderKey.REQ_ID: i + 1,
                }
                body = Message(headers, {"ref_id": "no-such-ref", "junk": b"x" * 900})
                evil.send_multipart([wire.KIND_MSG, b"server", *wire.encode(body)])

        ask(40_000)  # answers: far more than the kernel's buffers and a pipe's 1000 messages
        site = make_cell("site-1", **FAST)
        raw = os.urandom(64 * MiB)
        ref = offer_bytes(owner, raw)
        d = Download(site, ref, per_request_timeout=5.0)
        d.start()
        assert sha(d.finish(30)) == sha(raw)
        assert site.link_state("server") == "up"
        assert site.link_stats["links_lost"] == 0
        assert owner.link_stats["link_dropped"] == 1  # the one that does not read
    finally:
        evil.close(0)
        ctx.term()
