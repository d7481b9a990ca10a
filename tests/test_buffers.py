"""The owner's pool of read buffers: reuse only what nothing refers to, stay bounded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import zmq

from objdl.objects import _file
from objdl.objects._buffers import MIN_POOLED, BufferPool
from objdl.objects._file import FileSource
from tests.conftest import wait_for

KiB = 1024
MiB = 1024 * KiB


def test_small_reads_are_not_pooled() -> None:
    assert BufferPool().take(MIN_POOLED - 1) is None


@pytest.mark.parametrize(
    ("length", "size"),
    [(MIN_POOLED, MIN_POOLED), (MIN_POOLED + 1, 2 * MIN_POOLED), (MiB, MiB), (MiB + 1, 2 * MiB)],
)
def test_size_classes(length: int, size: int) -> None:
    view = BufferPool().take(length)
    assert view is not None and view.nbytes == length and not view.readonly
    assert len(view.obj) == size == BufferPool.size_class(length)  # type: ignore[arg-type]


def buffer_id(view: memoryview | None) -> int:
    assert view is not None
    return id(view.obj)


def test_a_buffer_is_reused_only_once_nothing_refers_to_it() -> None:
    pool = BufferPool()
    first = pool.take(MiB)
    first_id = buffer_id(first)
    assert first is not None
    piece = first[:100]  # a view made from the view keeps the buffer busy too
    del first
    assert buffer_id(pool.take(MiB)) != first_id
    del piece
    assert buffer_id(pool.take(MiB)) == first_id
    assert pool.nbytes == 2 * MiB  # the two buffers made; nothing more allocated


def test_a_zmq_frame_keeps_its_buffer_busy() -> None:
    pool = BufferPool()
    view = pool.take(MiB)
    buf_id = buffer_id(view)
    frame = zmq.Frame(view, copy=False)
    del view
    assert buffer_id(pool.take(MiB)) != buf_id
    del frame  # libzmq lets go; pyzmq drops its reference on its own thread
    wait_for(lambda: buffer_id(pool.take(MiB)) == buf_id)
    assert pool.nbytes == 2 * MiB


def test_the_pool_stays_within_its_limit() -> None:
    pool = BufferPool(limit=4 * MiB)
    held = [pool.take(MiB) for _ in range(4)]
    assert all(v is not None for v in held)
    t0 = time.monotonic()
    assert pool.take(MiB, wait=0.1) is None and pool.misses == 1
    assert 0.08 <= time.monotonic() - t0 < 2.0
    assert pool.nbytes == 4 * MiB
    held.pop()
    assert pool.take(MiB) is not None  # one came back
    pool.clear()
    assert pool.nbytes == 0


def test_a_waiting_taker_gets_the_buffer_as_soon_as_it_is_free() -> None:
    pool = BufferPool(limit=4 * MiB)
    held = [pool.take(MiB) for _ in range(4)]
    buf_id = buffer_id(held[-1])
    timer = threading.Timer(0.2, held.pop)
    timer.start()
    try:
        t0 = time.monotonic()
        got = pool.take(MiB, wait=10.0)
        waited = time.monotonic() - t0
    finally:
        timer.cancel()
    assert buffer_id(got) == buf_id and pool.waits >= 1
    assert 0.15 <= waited < 2.0


def test_a_size_too_big_to_reuse_is_refused_at_once() -> None:
    pool = BufferPool(limit=8 * MiB)  # sizes above a quarter of the limit are not pooled
    t0 = time.monotonic()
    assert pool.take(4 * MiB, wait=5.0) is None
    assert time.monotonic() - t0 < 1.0 and pool.waits == 0 and pool.nbytes == 0
    assert pool.take(2 * MiB) is not None


def test_idle_buffers_of_another_size_make_room() -> None:
    pool = BufferPool(limit=4 * MiB)
    views = [pool.take(MiB) for _ in range(4)]  # the pool is full of 1 MiB buffers
    assert all(v is not None for v in views) and pool.nbytes == 4 * MiB
    busy = views.pop()  # three become idle, one stays in use
    views.clear()
    t0 = time.monotonic()
    tail = pool.take(300 * KiB, wait=5.0)  # a short last chunk: 512 KiB class
    assert tail is not None and time.monotonic() - t0 < 1.0 and pool.waits == 0
    assert pool.nbytes == MiB + 512 * KiB  # the busy 1 MiB buffer kept, the idle ones gone
    assert busy is not None and busy.nbytes == MiB


def test_a_new_size_waits_only_when_every_buffer_is_busy() -> None:
    pool = BufferPool(limit=2 * MiB)
    held = [pool.take(512 * KiB) for _ in range(4)]
    assert all(v is not None for v in held)
    assert pool.take(512 * KiB, wait=0.05) is None  # busy: waited, then gave up
    assert pool.waits >= 1 and pool.misses == 1


def test_concurrent_takers_never_share_a_buffer() -> None:
    pool = BufferPool(limit=64 * MiB)
    got: list[list[memoryview]] = [[] for _ in range(8)]

    def taker(mine: list[memoryview]) -> None:
        for _ in range(4):
            view = pool.take(MiB)
            assert view is not None
            mine.append(view)  # held: nobody else may get its buffer

    threads = [threading.Thread(target=taker, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    ids = [buffer_id(v) for g in got for v in g]
    assert len(ids) == 32 and len(set(ids)) == 32


def test_file_reads_held_at_once_keep_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * MiB + 5)
    path.write_bytes(data)
    src = FileSource(path)
    try:
        chunks = [
            (off, src.read(off, min(MiB, len(data) - off))) for off in range(0, len(data), MiB)
        ]
        for off, chunk in chunks:  # every chunk read into its own buffer
            assert bytes(chunk) == data[off : off + MiB]
        small = src.read(0, 100)
        assert bytes(small) == data[:100]
    finally:
        src.close()


def test_the_shared_pool_is_emptied_when_the_last_file_closes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2 * MiB))
    a, b = FileSource(path), FileSource(path)
    try:
        a.read(0, MiB)
        b.read(MiB, MiB)
        assert _file._pool.nbytes >= MiB
        a.close()
        assert _file._pool.nbytes >= MiB  # b is still served
    finally:
        a.close()
        b.close()
    assert _file._pool.nbytes == 0
