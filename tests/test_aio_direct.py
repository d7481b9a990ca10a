"""Direct data links with asyncio cells (``objdl.aio.Cell(data_bind=...)``), on a real broker.

The asyncio cell drives the same link sockets as the threaded one, from its event loop:
an asyncio owner offers its data socket to threaded and asyncio sites, an asyncio site
(``objdl.aio.download_*``) takes the links that threaded and asyncio owners offer, a
link cut mid-download still ends in a complete, verified download through the broker,
and stopping leaves no socket and no thread. Each test runs on asyncio's own loop and
on uvloop (when it is installed).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import Broker
from objdl import aio
from objdl.cell import Cell
from objdl.downloader import ObjDownloader
from objdl.errors import CellError
from objdl.objects import download_bytes, offer_bytes, offer_file
from objdl.security import KeyPolicy
from tests._netproxy import ESTABLISHED, LISTEN, Proxy, free_port, port_of, tcp_states
from tests.conftest import wait_for

MiB = 1 << 20
LOOPBACK = "tcp://127.0.0.1:*"
FAST: dict[str, Any] = {"broker_timeout": 1.0, "heartbeat_interval": 0.2}
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(autouse=True)
def _downloader_state() -> Iterator[None]:
    yield
    ObjDownloader.shutdown()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a coroutine to its end on a new loop of the kind the parameter names."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


def routed(broker: Any) -> int:
    return int(broker.stats()["routed_bytes"])


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def objdl_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("objdl-")}


class LoopOwner:
    """An asyncio owner cell "server" on a loop of its own thread.

    `setup(cell)` runs on the loop once the cell is up (it offers objects; what it
    returns is :attr:`ref`); :attr:`stats` are the cell's ``link_stats`` as it stops."""

    def __init__(self, run: Run, url: str, setup: Callable[[aio.Cell], Any], **kw: Any) -> None:
        self._run, self._url, self._setup, self._kw = run, url, setup, kw
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.ref: Any = None
        self.data_url: str | None = None
        self.stats: dict[str, int] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-owner-loop")

    def _main(self) -> None:
        try:
            self._run(self._serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aio.Cell("server", self._url, **self._kw) as cell:
            self.data_url = cell.data_url
            self.ref = self._setup(cell)
            self._ready.set()
            await self._stop.wait()
            ObjDownloader.shutdown()
            self.stats = cell.link_stats

    def __enter__(self) -> LoopOwner:
        self._thread.start()
        assert self._ready.wait(10), "the owner's loop did not start within 10s"
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the owner's loop did not end within 10s"
        assert self.error is None, self.error


# -- the chunks skip the broker, whichever side is asyncio -------------------------------------


@pytest.mark.timeout(40)
def test_an_asyncio_owner_serves_a_threaded_site_over_its_data_socket(
    run: Run, broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    size = 64 * MiB
    raw = os.urandom(size)
    with LoopOwner(run, broker.url, lambda cell: offer_bytes(cell, raw), data_bind=LOOPBACK) as o:
        assert o.data_url is not None and o.data_url.startswith("tcp://127.0.0.1:")
        site = make_cell("site-1")
        before = routed(broker)
        assert sha(download_bytes(site, "server", o.ref)) == sha(raw)
        through_broker = routed(broker) - before
        assert site.link_state("server") == "up"
    # The first reply and what was asked before the link came up go through the broker.
    assert through_broker < size // 4, f"{through_broker} of {size} bytes crossed the broker"
    assert site.link_stats["links_opened"] == 1 and o.stats["links_bound"] == 1


@pytest.mark.timeout(40)
def test_an_asyncio_site_downloads_a_file_over_a_threaded_owners_link(
    run: Run, broker: Broker, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    owner = make_cell("server", data_bind=LOOPBACK)
    size = 64 * MiB
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(size))
    ref = offer_file(owner, src)
    dest = tmp_path / "copy.bin"

    async def main() -> tuple[Path, str, dict[str, int], int, int]:
        async with aio.Cell("site-1", broker.url) as cell:
            assert cell.link_state("server") == "none"
            ticks = [0]

            async def ticker() -> None:  # the loop that carries the link stays free
                while True:
                    ticks[0] += 1
                    await asyncio.sleep(0.001)

            t = asyncio.create_task(ticker())
            before = routed(broker)
            path = await aio.download_file(cell, "server", ref, dest)
            through_broker = routed(broker) - before
            t.cancel()
            return path, cell.link_state("server"), cell.link_stats, through_broker, ticks[0]

    path, state, stats, through_broker, ticks = run(main())
    assert path == dest and sha(dest.read_bytes()) == sha(src.read_bytes())
    assert state == "up" and stats["links_opened"] == 1 and stats["links_lost"] == 0
    assert through_broker < size // 4, f"{through_broker} of {size} bytes crossed the broker"
    assert owner.link_stats["links_bound"] == 1
    assert ticks > 10


@pytest.mark.timeout(40)
def test_asyncio_owner_and_site_on_one_loop_and_stop_leaves_nothing(
    run: Run, broker: Broker
) -> None:
    threads_before = objdl_threads()
    size = 48 * MiB
    raw = os.urandom(size)

    async def main() -> tuple[bytes, str, dict[str, int], int, int, list[str]]:
        async with (
            aio.Cell("server", broker.url, data_bind=LOOPBACK) as owner,
            aio.Cell("site-1", broker.url) as site,
        ):
            assert owner.data_url is not None
            port = port_of(owner.data_url)
            ref = offer_bytes(owner, raw)
            before = routed(broker)
            got = bytes(await aio.download_bytes(site, "server", ref))
            through_broker = routed(broker) - before
            states = tcp_states(port)
            ObjDownloader.shutdown()
            return got, site.link_state("server"), owner.link_stats, through_broker, port, states

    got, state, stats, through_broker, port, states = run(main())
    assert sha(got) == sha(raw)
    assert state == "up" and stats["links_bound"] == 1
    assert through_broker < size // 4, f"{through_broker} of {size} bytes crossed the broker"
    assert ESTABLISHED in states and LISTEN in states  # the link was a TCP connection
    assert objdl_threads() == threads_before
    # libzmq closes the sockets on its own I/O thread: give it a moment.
    wait_for(lambda: not {ESTABLISHED, LISTEN} & set(tcp_states(port)), timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


# -- the link is cut mid-download: the rest goes through the broker -----------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner_kind", ["threaded", "asyncio"])
def test_link_cut_mid_download_to_an_asyncio_site_completes_through_the_broker(
    owner_kind: str,
    run: Run,
    broker: Broker,
    make_cell: Callable[..., Cell],
    proxies: Callable[[int], Proxy],
) -> None:
    size = 128 * MiB
    raw = os.urandom(size)
    port = free_port()
    proxy = proxies(port)  # before the owner, which advertises it
    owner_kw: dict[str, Any] = {
        "data_bind": f"tcp://127.0.0.1:{port}",
        "data_advertise": proxy.url,
        **FAST,
    }
    cut_when: list[float] = []
    cut_at: list[int] = []

    def cut_early(ref_id: str, done: int, total: Any, rate: float) -> None:
        # (on the download's thread, beside the loop: the cut is in order)
        if proxy.to_site >= 32 * MiB and not cut_at:
            cut_at.append(done)
            cut_when.append(time.monotonic())
            proxy.cut()

    async def site_main(ref: str) -> tuple[bytes, str, dict[str, int], float]:
        async with aio.Cell("site-1", broker.url, **FAST) as cell:
            got = await aio.download_bytes(
                cell,
                "server",
                ref,
                progress_cb=cut_early,
                progress_interval=0.01,
                per_request_timeout=10.0,
            )
            ended = time.monotonic()
            return bytes(got), cell.link_state("server"), cell.link_stats, ended

    before = routed(broker)
    if owner_kind == "threaded":
        owner = make_cell("server", **owner_kw)
        got, state, stats, ended = run(site_main(offer_bytes(owner, raw)))
        owner_stats = owner.link_stats
    else:
        with LoopOwner(run, broker.url, lambda cell: offer_bytes(cell, raw), **owner_kw) as o:
            assert o.data_url == proxy.url
            # (the site's loop here, the owner's on its thread)
            got, state, stats, ended = run(site_main(o.ref))
        owner_stats = o.stats
    assert sha(got) == sha(raw)
    assert cut_at and cut_at[0] < size // 2, cut_at
    # The requests lost with the link fail at once and are retried through the broker;
    # none waits for its per_request_timeout (10 s).
    after_cut = ended - cut_when[0]
    assert after_cut < 6.0, f"{after_cut:.1f}s from the cut to the end"
    assert stats["links_lost"] == 1 and state == "failed"
    assert routed(broker) - before >= size - proxy.to_site  # the rest came this way
    assert owner_stats["links_bound"] == 1


# -- CURVE: the data socket's ZAP handler is answered from the loop ------------------------------


@pytest.mark.timeout(40)
def test_curve_link_between_asyncio_cells(run: Run) -> None:
    pairs = {name: zmq.curve_keypair() for name in ("broker", "server", "site-1", "outsider")}
    public = {name: pub.decode() for name, (pub, _) in pairs.items()}
    allowed = {name: public[name] for name in ("server", "site-1")}
    b = Broker(LOOPBACK, curve_keys=pairs["broker"], allowed_keys=KeyPolicy.of(allowed))
    b.start()
    size = 32 * MiB
    raw = os.urandom(size)

    def keyed(name: str, **kw: Any) -> aio.Cell:
        return aio.Cell(
            name,
            b.url,
            curve_keys=pairs[name],
            broker_public_key=public["broker"],
            peer_keys=allowed,
            **kw,
        )

    async def main() -> tuple[bytes, str, dict[str, int], int]:
        async with keyed("server", data_bind=LOOPBACK) as owner, keyed("site-1") as site:
            offer = owner.link_offer("site-1")
            assert offer is not None and offer["key"] == public["server"]
            assert owner.data_url is not None
            ref = offer_bytes(owner, raw)
            before = routed(b)
            got = bytes(await aio.download_bytes(site, "server", ref))
            through_broker = routed(b) - before
            # A key the allow-list does not hold is turned away by the owner's ZAP handler.
            ctx = zmq.Context.instance()
            outsider = ctx.socket(zmq.DEALER)
            try:
                outsider.linger = 0
                outsider.curve_serverkey = offer["key"].encode()
                outsider.curve_publickey, outsider.curve_secretkey = pairs["outsider"]
                outsider.connect(owner.data_url)
                deadline = time.monotonic() + 5.0
                while owner.link_stats["zap_denied"] == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                outsider.close(linger=0)
            ObjDownloader.shutdown()
            return got, site.link_state("server"), owner.link_stats, through_broker

    try:
        got, state, stats, through_broker = run(main())
    finally:
        b.stop()
    assert sha(got) == sha(raw)
    assert state == "up" and stats["links_bound"] == 1
    assert through_broker < size // 4, f"{through_broker} of {size} bytes crossed the broker"
    assert stats["zap_denied"] >= 1 and stats["links_refused"] == 0


# -- arguments, and a data socket that cannot be bound ---------------------------------------


def test_data_options_of_an_asyncio_cell_are_checked_when_it_is_made() -> None:
    url = "tcp://127.0.0.1:1"  # never connected to: every case fails before start
    with pytest.raises(ValueError, match="need data_bind"):
        aio.Cell("server", url, data_advertise="tcp://127.0.0.1:5555")
    with pytest.raises(ValueError, match="data_bind must look like"):
        aio.Cell("server", url, data_bind="127.0.0.1:80")
    with pytest.raises(ValueError, match="data_advertise"):
        aio.Cell("server", url, data_bind=LOOPBACK, data_advertise="tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="curve_keys"):
        aio.Cell("server", url, data_bind=LOOPBACK, data_allowed_keys={})
    # Links off: an offer is not taken, and says why.
    site = aio.Cell("site-1", url, direct_links=False)
    assert "direct_links=False" in site.open_link("server", {})
    assert site.link_state("server") == "none" and site.data_url is None


@pytest.mark.timeout(20)
def test_a_data_port_in_use_fails_the_start_and_leaves_nothing(run: Run, broker: Broker) -> None:
    threads_before = objdl_threads()
    held = socket.create_server(("127.0.0.1", 0))
    try:
        port = held.getsockname()[1]

        async def main() -> None:
            cell = aio.Cell("server", broker.url, data_bind=f"tcp://127.0.0.1:{port}")
            with pytest.raises(CellError, match="cannot bind data_bind"):
                await cell.start()
            await cell.stop()  # (idempotent after a failed start)
            assert not cell.is_connected
            wildcard = aio.Cell("server", broker.url, data_bind="tcp://0.0.0.0:*")
            with pytest.raises(CellError, match="data_advertise"):
                await wildcard.start()

        run(main())
    finally:
        held.close()
    assert objdl_threads() == threads_before
    assert "server" not in broker.cells()
