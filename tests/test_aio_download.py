"""Downloads with asyncio cells on either side, mixed with threaded cells, on a real broker."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import Broker
from objdl import aio
from objdl.cell import Cell
from objdl.downloader import ObjDownloader
from objdl.errors import CellError
from objdl.objects import (
    DownloadError,
    download_bytes,
    download_dict,
    download_file,
    offer_bytes,
    offer_dict,
    offer_file,
)
from objdl.objects import new_transaction as new_tx
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def test_an_asyncio_site_downloads_bytes_files_and_dicts_from_a_threaded_owner(
    broker: Broker, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    owner = make_cell("server")
    data = os.urandom(5 * MiB + 1)
    src = tmp_path / "model.bin"
    src.write_bytes(data)
    arrays = {"w": np.arange(300_000, dtype=np.float32), "meta": {"round": 3}}
    refs = (
        offer_bytes(owner, data),
        offer_file(owner, src),
        offer_dict(owner, arrays),
    )
    dest = tmp_path / "got" / "model.bin"
    dest.parent.mkdir()

    async def main() -> tuple[Any, ...]:
        async with aio.Cell("site-1", broker.url) as cell:
            ticks = [0]

            async def ticker() -> None:  # the loop stays free while chunks arrive
                while True:
                    ticks[0] += 1
                    await asyncio.sleep(0.001)

            t = asyncio.create_task(ticker())
            got = await asyncio.gather(
                aio.download_bytes(cell, "server", refs[0], chunk_size=256 * 1024),
                aio.download_file(cell, "server", refs[1], dest),
                aio.download_dict(cell, "server", refs[2]),
            )
            t.cancel()
            return (*got, ticks[0])

    got_bytes, got_path, got_dict, ticks = asyncio.run(main())
    assert bytes(got_bytes) == data
    assert got_path == dest and dest.read_bytes() == data
    assert np.array_equal(got_dict["w"], arrays["w"]) and got_dict["meta"] == {"round": 3}
    assert ticks > 10


def test_an_asyncio_owner_serves_a_threaded_site_off_its_loop(
    broker: Broker, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    src = tmp_path / "model.bin"
    src.write_bytes(data[: 2 * MiB])
    arrays = {"w": np.arange(100_000, dtype=np.int64)}
    ready = threading.Event()
    stop = threading.Event()
    ref: list[str] = []
    produced_on: set[str] = set()

    def downloaded(*args: Any, **kwargs: Any) -> None:
        produced_on.add(threading.current_thread().name)

    async def serve() -> None:
        async with aio.Cell("server", broker.url) as cell:
            tx = new_tx(cell, timeout=30.0)
            ref.append(offer_bytes(cell, data, transaction_id=tx, obj_downloaded_cb=downloaded))
            ref.append(offer_file(cell, src))
            ref.append(offer_dict(cell, arrays))
            state = ObjDownloader.inflight_stats(cell)
            assert state["held"] == 0
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)

    loop_thread = threading.Thread(target=asyncio.run, args=(serve(),), name="owner-loop")
    loop_thread.start()
    try:
        assert ready.wait(10)
        site = make_cell("site-1")
        got = download_bytes(site, "server", ref[0], chunk_size=512 * 1024)
        assert bytes(got) == data
        dest = tmp_path / "got.bin"
        assert download_file(site, "server", ref[1], dest).read_bytes() == data[: 2 * MiB]
        assert np.array_equal(download_dict(site, "server", ref[2])["w"], arrays["w"])
    finally:
        stop.set()
        loop_thread.join(10)
    assert not loop_thread.is_alive()
    # The owner's side (produce, then the downloaded callback) ran on a handler thread.
    assert produced_on and all(n.startswith("objdl-server-handler-") for n in produced_on)


def test_asyncio_owner_and_site_on_one_loop(broker: Broker) -> None:
    data = os.urandom(2 * MiB + 7)

    async def main() -> bytes:
        async with aio.Cell("server", broker.url) as owner, aio.Cell("site-1", broker.url) as site:
            ref = offer_bytes(owner, data)
            return bytes(await aio.download_bytes(site, "server", ref, chunk_size=128 * 1024))

    assert asyncio.run(main()) == data


def test_cancelling_a_download_ends_it_leaves_no_file_and_tells_the_owner(
    broker: Broker, make_cell: Callable[..., Cell], tmp_path: Path
) -> None:
    owner = make_cell("server")
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(1024 * MiB)
    tx = new_tx(owner, timeout=60.0, num_sites=1)
    outcome = ObjDownloader.get_outcome(tx)
    assert outcome is not None
    ref = offer_file(owner, src, transaction_id=tx, chunk_size=64 * 1024)
    out = tmp_path / "out"
    out.mkdir()

    async def main() -> tuple[float, int]:
        async with aio.Cell("site-1", broker.url) as cell:
            loop = asyncio.get_running_loop()
            under_way = asyncio.Event()

            def progress(ref_id: str, done: int, total: int | None, rate: float) -> None:
                if done >= 4 * MiB:  # on the download's thread: tell the loop
                    loop.call_soon_threadsafe(under_way.set)

            task = asyncio.create_task(
                aio.download_file(
                    cell,
                    "server",
                    ref,
                    out / "big.bin",
                    window=1,
                    progress_cb=progress,
                    progress_interval=0.0,
                )
            )
            await asyncio.wait_for(under_way.wait(), 30)
            assert not task.done()  # 4 MiB of 1 GiB in 64 KiB chunks, one at a time
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            took = time.monotonic() - t0
            return took, len(cell._core.waiters._requests)

    took, waiting = asyncio.run(main())
    assert took < 0.1, took
    assert waiting == 0
    assert list(out.iterdir()) == []  # no part file, no file
    wait_for(lambda: "site-1" in outcome.refs[ref].failed)
    assert outcome.refs[ref].sites["site-1"].state == "cancelled"


def test_a_failed_asyncio_download_raises_download_error(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    make_cell("server")

    async def main() -> None:
        async with aio.Cell("site-1", broker.url) as cell:
            with pytest.raises(DownloadError) as info:
                await aio.download_bytes(cell, "server", "no-such-ref", per_request_timeout=2.0)
            assert info.value.ref_id == "no-such-ref"
            with pytest.raises(TypeError, match=r"objdl\.aio\.Cell"):
                await aio.download_bytes(object(), "server", "x")  # type: ignore[arg-type]

    asyncio.run(main())


def test_threaded_downloads_on_the_loop_thread_are_refused(broker: Broker) -> None:
    """A blocking download from the loop's own thread would freeze the loop: it raises."""

    async def main() -> None:
        async with aio.Cell("site-1", broker.url) as cell:
            with pytest.raises(CellError, match="block the event loop"):
                download_bytes(cell, "server", "x", per_request_timeout=1.0)

    asyncio.run(main())


def test_digest_of_an_asyncio_download_matches(
    broker: Broker, make_cell: Callable[..., Cell]
) -> None:
    owner = make_cell("server")
    data = os.urandom(MiB)
    ref = offer_bytes(owner, data)

    async def main() -> str:
        async with aio.Cell("site-1", broker.url) as cell:
            return hashlib.sha256(await aio.download_bytes(cell, "server", ref)).hexdigest()

    assert asyncio.run(main()) == hashlib.sha256(data).hexdigest()
