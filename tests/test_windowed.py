"""The shell around the DownloadWindow, on real sockets, in both of its shapes.

`HookCell` is the real cell, recording the threads its ``on_done`` hooks run on (the
cell's I/O thread, where the window is fed and the next requests leave); the
``request_async`` of `QueueCell` takes no ``on_done``, as a cell written before it,
so the download's own thread takes every reply from the done_queue. The owner is a
plain cell answering the sized exchange by hand, honestly unless a test says not.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from broker import Broker
from objdl.cell import Cell, PendingRequest
from objdl.downloader import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, ProduceRC
from objdl.downloader._site import download_object
from objdl.downloader._windowed import _takes_on_done
from objdl.message import Message, ReturnCode, Signal, make_reply
from objdl.objects import BytesConsumer
from tests.conftest import reference_digest, wait_for

CHUNK = 4096
DATA = os.urandom(32 * CHUNK)
KW: dict[str, Any] = {"window": 4, "chunk_size": CHUNK, "tries": 2, "backoff": 0.01}


class HookCell(Cell):
    """The real cell; records what it is asked and where its ``on_done`` hooks run."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hook_threads: list[str] = []
        self.hooks_done = 0
        self.on_ask: Callable[[Any], None] = lambda state: None

    def request_async(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        done_queue: Any = None,
        secure: bool = False,
        optional: bool = False,
        on_done: Callable[[PendingRequest], None] | None = None,
    ) -> PendingRequest:
        hook = on_done
        if hook is not None:

            def recording(p: PendingRequest) -> None:
                self.hook_threads.append(threading.current_thread().name)
                hook(p)
                self.hooks_done += 1

            on_done = recording
        self.on_ask(request.payload.get("state"))
        return super().request_async(
            channel, target, topic, request, timeout, done_queue=done_queue, secure=secure,
            optional=optional, on_done=on_done,
        )  # fmt: skip


class QueueCell(Cell):
    """A cell whose ``request_async`` has no ``on_done`` (the cell of before)."""

    def request_async(  # type: ignore[override]
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        done_queue: Any = None,
        secure: bool = False,
        optional: bool = False,
    ) -> PendingRequest:
        return super().request_async(
            channel, target, topic, request, timeout, done_queue=done_queue, secure=secure,
            optional=optional,
        )  # fmt: skip


def honest(state: Any) -> Message:
    """The sized exchange for DATA in chunks of CHUNK (objdl.downloader.sized)."""
    state = state or {}
    length = min(state.get("length", CHUNK), CHUNK)
    if "offset" not in state:
        desc = {
            "offset": 0,
            "size": len(DATA),
            "chunk": CHUNK,
            "algo": "xxh3_128",
            "digest": reference_digest("xxh3_128", DATA),
            "meta": None,
        }
        return make_reply(
            ReturnCode.OK, body={"status": "ok", "state": desc, "data": DATA[:length]}
        )
    offset = state["offset"]
    if offset == len(DATA):
        return make_reply(ReturnCode.OK, body={"status": ProduceRC.EOF})
    data = DATA[offset : offset + length]
    body = {"status": "ok", "state": {"offset": offset + len(data)}, "data": data}
    return make_reply(ReturnCode.OK, body=body)


class Owner:
    """A cell answering with `answer(state)` (honest by default)."""

    def __init__(self, url: str) -> None:
        self.cell = Cell("server", url)
        self.answer: Callable[[Any], Message] = honest
        self.cancels: list[Any] = []
        self.cell.register_request_cb(OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, self._handle)

    def _handle(self, request: Message) -> Message | None:
        payload = request.payload
        if "cancel" in payload:
            self.cancels.append(payload["cancel"])
            return None
        return self.answer(payload.get("state"))


class Recording(BytesConsumer):
    """Keeps the bytes; records the threads it was called on; can hold up the writes."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()
        self.written = 0
        self.gate = threading.Event()
        self.gate.set()

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        self.threads.add(threading.current_thread().name)
        assert self.gate.wait(20.0), "the test never opened the gate"
        super().write(offset, pieces)
        self.written += sum(p.nbytes for p in pieces)


@pytest.fixture
def net() -> Iterator[tuple[str, Owner]]:
    b = Broker("tcp://127.0.0.1:*")
    b.start()
    owner = Owner(b.url)
    try:
        owner.cell.start()
        yield b.url, owner
    finally:
        owner.cell.stop()
        b.stop()


@pytest.fixture(params=["hook", "queue"])
def site(request: pytest.FixtureRequest, net: tuple[str, Owner]) -> Iterator[Cell]:
    kind = HookCell if request.param == "hook" else QueueCell
    cell = kind("site-1", net[0])
    cell.start()
    try:
        yield cell
    finally:
        cell.stop()


def download(site: Cell, consumer: Recording, **kw: Any) -> None:
    download_object("server", "R1", 5.0, site, consumer, **{**KW, **kw})


def test_the_shape_is_chosen_by_request_asyncs_signature() -> None:
    class Old:
        def request_async(self, channel: str, timeout: float, done_queue: Any = None) -> None: ...

    class New:
        def request_async(self, channel: str, on_done: Any = None) -> None: ...

    assert not _takes_on_done(Old()) and _takes_on_done(New())
    assert not _takes_on_done(QueueCell("a", "tcp://127.0.0.1:1"))
    assert _takes_on_done(HookCell("a", "tcp://127.0.0.1:1"))


def test_both_shapes_download_and_write_on_the_downloads_thread(site: Cell) -> None:
    consumer = Recording()
    download(site, consumer)
    assert consumer.outcome.ok and consumer.result == DATA
    assert consumer.threads == {threading.current_thread().name}
    if isinstance(site, HookCell):  # replies were fed to the window on the I/O thread
        assert site.hook_threads and set(site.hook_threads) == {"objdl-site-1-io"}


def test_a_stalled_writer_stops_the_asking_within_the_span(
    site: Cell, net: tuple[str, Owner]
) -> None:
    """The first write blocks: the I/O thread keeps asking (hook shape) until the span
    of two windows is reached, never past it; the done_queue shape asks nothing more
    while its only thread is stuck in the write. Then the download completes."""
    consumer = Recording()
    consumer.gate.clear()
    asks: list[tuple[int, int]] = []  # (offset, bytes written when it was asked)
    hooked = isinstance(site, HookCell)
    if isinstance(site, HookCell):
        site.on_ask = lambda state: asks.append(((state or {}).get("offset", -1), consumer.written))
    done = threading.Event()
    t = threading.Thread(target=lambda: (download(site, consumer), done.set()))
    t.start()
    try:
        if hooked:
            span = 2 * KW["window"]
            # The first reply, then the chunks at 1..7: every reply handled, the last ask made.
            wait_for(lambda: cast(HookCell, site).hooks_done == span, timeout=10.0)
            offsets = [o for o, _ in asks if o > 0]
            assert offsets == [k * CHUNK for k in range(1, span)]
            assert all(w == 0 for _, w in asks)  # (all while the writer was stuck)
        else:
            wait_for(lambda: consumer.threads, timeout=10.0)
            assert not done.is_set()
    finally:
        consumer.gate.set()
        t.join(30.0)
    assert not t.is_alive() and consumer.outcome.ok and consumer.result == DATA
    for offset, written in asks:
        if 0 < offset < len(DATA):
            assert offset < written + CHUNK * 2 * KW["window"]  # asked within the span


def test_a_bad_reply_decided_on_the_io_thread_ends_the_download(
    site: Cell, net: tuple[str, Owner]
) -> None:
    _, owner = net

    def other_offset(state: Any) -> Message:
        if state and state.get("offset") == 5 * CHUNK:
            body = {"status": "ok", "state": {"offset": CHUNK}, "data": DATA[:CHUNK]}
            return make_reply(ReturnCode.OK, body=body)
        return honest(state)

    owner.answer = other_offset
    consumer = Recording()
    download(site, consumer)
    assert consumer.outcome.ok is not True
    assert "an answer to another request" in (consumer.outcome.reason or "")


def test_busy_forever_ends_within_the_tries_in_both_shapes(
    site: Cell, net: tuple[str, Owner]
) -> None:
    _, owner = net
    asked: list[Any] = []

    def busy(state: Any) -> Message:
        if state and "offset" in state:
            asked.append(state["offset"])
            return make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy")
        return honest(state)

    owner.answer = busy
    consumer = Recording()
    download(site, consumer, tries=3)
    assert "after 3 tries" in (consumer.outcome.reason or "")
    assert len(set(asked)) <= KW["window"]  # no more than a window of distinct chunks


def test_abort_while_the_writer_is_stalled(site: Cell, net: tuple[str, Owner]) -> None:
    _, owner = net
    consumer = Recording()
    consumer.gate.clear()
    abort = Signal()
    t = threading.Thread(target=download, args=(site, consumer), kwargs={"abort_signal": abort})
    t.start()
    try:
        wait_for(lambda: consumer.threads, timeout=10.0)
        abort.trigger()
    finally:
        consumer.gate.set()
        t.join(30.0)
    assert not t.is_alive()
    assert "download aborted" in (consumer.outcome.reason or "")
    wait_for(lambda: owner.cancels, timeout=5.0)  # the owner was told


def test_a_request_that_races_a_withdrawal_is_told_it_was_withdrawn(
    net: tuple[str, Owner], site: Cell
) -> None:
    """A site keeps requests in flight while its callbacks run, so one may reach the
    owner just as the object is withdrawn: past the ref lookup, before the producer
    refuses the released object. The answer names the withdrawal, not a bad request."""
    from objdl.downloader import ObjDownloader
    from objdl.downloader._defs import InvalidStateError
    from objdl.objects import ObjectProducer, download_bytes

    owner_cell = Cell("server2", net[0])
    owner_cell.start()
    try:

        class WithdrawnMidRequest(ObjectProducer):
            def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> Any:
                if state and state.get("offset"):  # the interleaving, driven: withdraw, then refuse
                    ObjDownloader.withdraw(ref_id, "superseded by v2")
                    raise InvalidStateError(f"object {ref_id} is no longer offered")
                return super().produce(ref_id, obj, state, requester)

        tx = ObjDownloader.new_transaction(owner_cell, WithdrawnMidRequest(chunk_size=CHUNK), 30.0)
        ref = ObjDownloader.add_download_object(tx, DATA)
        with pytest.raises(Exception, match="withdrawn by server2: superseded by v2"):
            download_bytes(site, "server2", ref, **KW)
    finally:
        ObjDownloader.shutdown()
        owner_cell.stop()
