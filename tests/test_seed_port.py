"""Code written against the seed's Object Downloader runs with only its imports changed.

Below the import block and the one fixture that picks the transport, the code uses only
names the seed defines, called the way the seed's own code calls them (positional
arguments included). It runs through a real broker and again on objdl.testing's fake
network, where the fixture rebinds ``Cell`` to make fake cells: the same code, with the
import pointed elsewhere.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# The only lines that differ from the seed-based original:
#   nvflare.fuel.f3.cellnet.cell            -> objdl.cell
#   nvflare.fuel.f3.cellnet.defs / utils    -> objdl.message
#   nvflare.apis.signal                     -> objdl.message
#   ...obj_downloader                       -> objdl.downloader
from objdl.cell import Cell
from objdl.downloader import (
    OBJ_DOWNLOADER_CHANNEL,
    OBJ_DOWNLOADER_TOPIC,
    Consumer,
    DownloadStatus,
    ObjDownloader,
    Producer,
    ProduceRC,
    download_object,
)
from objdl.message import (
    Message,
    MessageHeaderKey,
    ReturnCode,
    Signal,
    make_reply,
    new_cell_message,
)


class _FakeBroker:
    """What the test reads of a broker (its url), for the fake network."""

    url = "fake://network"


@pytest.fixture(params=["broker", "fake"])
def broker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if request.param == "broker":
        yield request.getfixturevalue("broker")
        return
    from objdl.testing import FakeClock, FakeNetwork

    with FakeNetwork(FakeClock(autojump=True)) as net:
        monkeypatch.setattr(sys.modules[__name__], "Cell", lambda name, url: net.cell(name))
        yield _FakeBroker()


class ChunkProducer(Producer):
    def __init__(self, chunk_size):
        super().__init__()
        self.chunk_size = chunk_size

    def produce(self, ref_id, obj, state, requester):
        offset = state.get("offset", 0) if state else 0
        if offset >= len(obj):
            return ProduceRC.EOF, None, None
        chunk = obj[offset : offset + self.chunk_size]
        return ProduceRC.OK, chunk, {"offset": offset + len(chunk)}


class ChunkConsumer(Consumer):
    def __init__(self):
        super().__init__()
        self.parts = []
        self.result = None
        self.error = None

    def consume(self, ref_id, state, data):
        assert isinstance(data, bytes)
        self.parts.append(data)
        return state

    def download_completed(self, ref_id):
        self.result = b"".join(self.parts)
        self.logger.info(f"downloaded {ref_id}")

    def download_failed(self, ref_id, reason):
        self.error = reason


def test_seed_style_owner_and_sites(broker: Any) -> None:
    server = Cell("server", broker.url)
    sites = [Cell(f"site-{i}", broker.url) for i in (1, 2)]
    for c in (server, *sites):
        c.start()
    try:
        done = []
        timed_out = []
        all_done = threading.Event()

        def obj_downloaded(ref_id, to_site, status, obj, expected):
            done.append((to_site, status))
            if len(done) == expected:
                all_done.set()

        def tx_timeout(tx_id, objs, note):
            timed_out.append((tx_id, len(objs), note))

        model = bytes(range(256)) * 1000
        tx_id = ObjDownloader.new_transaction(
            server, ChunkProducer(100_000), 5.0, None, tx_timeout, note="bye"
        )
        ref_id = ObjDownloader.add_download_object(tx_id, model, None, obj_downloaded, expected=2)

        # The owner tells the sites the ref with an ordinary message.
        got_ref = []
        for s in sites:
            s.register_request_cb(
                "app", "model_ready", lambda req: got_ref.append(req.payload) or None
            )
        replies = server.broadcast_request("app", "model_ready", [s.get_fqcn() for s in sites],
                                           new_cell_message({}, ref_id), 5.0)  # fmt: skip
        assert all(
            r.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK for r in replies.values()
        )

        consumers = [ChunkConsumer() for _ in sites]
        threads = [
            threading.Thread(
                target=download_object, args=("server", got_ref[i], 5.0, s, consumers[i])
            )
            for i, s in enumerate(sites)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all_done.wait(5)
        assert [c.result == model for c in consumers] == [True, True]
        assert sorted(done) == [
            ("site-1", DownloadStatus.SUCCESS),
            ("site-2", DownloadStatus.SUCCESS),
        ]

        ObjDownloader.delete_transaction(tx_id, True)
        assert timed_out == [(tx_id, 1, "bye")]

        # Failure is reported through download_failed, as in the seed.
        c = ChunkConsumer()
        download_object("server", ref_id, 2.0, sites[0], c, False, True, Signal())
        assert c.result is None and "invalid_request" in c.error

        assert make_reply(ReturnCode.OK).get_header(MessageHeaderKey.RETURN_CODE) == "ok"
        assert isinstance(new_cell_message({}, None), Message)
        assert OBJ_DOWNLOADER_CHANNEL == "obj_downloader__"
        assert OBJ_DOWNLOADER_TOPIC == "obj_downloader__download"
    finally:
        ObjDownloader.shutdown()
        for c in (*sites, server):
            c.stop()
