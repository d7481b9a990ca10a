"""Ready downloads of bytes, files and dicts.

They run on objdl.testing's fake network (the objects' logic needs request/reply, not
sockets); one download of each kind also goes through a real broker (50 MiB of bytes,
a 200 MB file, a dict of arrays) and one file to three site processes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from objdl.cell import Cell, CellLike
from objdl.downloader import DownloadStatus, ObjDownloader, sized
from objdl.objects import (
    DownloadError,
    FileConsumer,
    ObjectProducer,
    _file,
    download_bytes,
    download_dict,
    download_file,
    new_transaction,
    offer_bytes,
    offer_dict,
    offer_file,
)
from objdl.objects._file import WRITE_PIECE, write_pieces
from objdl.testing import FakeCell
from tests import _procs
from tests.conftest import wait_for

MiB = 1024 * 1024
CHUNK = MiB


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".objdl-part"))


@pytest.mark.parametrize(
    ("any_cells", "size"),
    [*(("fake", n) for n in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 50 * MiB)), ("broker", 50 * MiB)],
    indirect=["any_cells"],
)
def test_bytes_sizes(any_cells: tuple[CellLike, CellLike], size: int) -> None:
    owner, site = any_cells
    data = os.urandom(size)
    done: list[str] = []
    ref = offer_bytes(owner, data, obj_downloaded_cb=lambda r, s, st, o: done.append(st))
    got = download_bytes(site, "server", ref)
    assert len(got) == size and got == data
    wait_for(lambda: done == [DownloadStatus.SUCCESS])


def test_bytes_with_blake2b_small_chunks_and_window(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    owner, site = fake_cells
    data = bytearray(os.urandom(3 * MiB + 17))
    ref = offer_bytes(owner, memoryview(data), digest="blake2b", chunk_size=64 * 1024)
    got = download_bytes(site, "server", ref, chunk_size=100_000, window=3)  # clipped to 64 KiB
    assert got == data


def _digest_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "objdl-digest"]


def test_hashing_thread_ends_with_the_download(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    # 2 MiB in 64 KiB chunks with a window of 4 is hashed on a thread of its own.
    owner, site = fake_cells
    data = os.urandom(2 * MiB)
    ref = offer_bytes(owner, data, digest="sha256", chunk_size=64 * 1024)
    assert download_bytes(site, "server", ref, window=4) == data
    assert _digest_threads() == []
    withdrawn = offer_bytes(owner, data, digest="sha256", chunk_size=64 * 1024)
    seen: list[int] = []

    def withdraw_midway(ref_id: str, done: int, total: int | None, rate: float) -> None:
        seen.append(done)
        if len(seen) == 1:
            ObjDownloader.withdraw(withdrawn, "test")

    with pytest.raises(DownloadError, match="withdrawn"):
        download_bytes(
            site, "server", withdrawn, window=4, progress_cb=withdraw_midway,
            progress_interval=0.0,
        )  # fmt: skip
    assert _digest_threads() == []


def test_a_hashing_failure_fails_the_download_cleanly(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hash breaks on the very last piece, on the hashing thread: the download must
    # still end in download_failed (no part file left, no thread left), not raise.
    owner, site = fake_cells
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(MiB))
    ref = offer_file(owner, src, digest="sha256", chunk_size=64 * 1024)  # hashed now
    real = sized.new_hash

    class BreaksAtTheEnd:
        def __init__(self) -> None:
            self.h = real("sha256")
            self.fed = 0

        def update(self, data: Any) -> None:
            self.fed += memoryview(data).nbytes
            if self.fed >= MiB:
                raise OSError("simulated failure while hashing")
            self.h.update(data)

        def hexdigest(self) -> str:
            return str(self.h.hexdigest())

    monkeypatch.setattr(sized, "new_hash", lambda algo: BreaksAtTheEnd())
    with pytest.raises(DownloadError, match="could not hash the received bytes"):
        download_file(site, "server", ref, tmp_path / "copy.bin", window=4)
    assert leftovers(tmp_path) == [] and not (tmp_path / "copy.bin").exists()
    assert _digest_threads() == []


def test_file_zero_bytes(fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path) -> None:
    owner, site = fake_cells
    src = tmp_path / "empty.bin"
    src.write_bytes(b"")
    ref = offer_file(owner, src)
    out = download_file(site, "server", ref, tmp_path / "copy.bin")
    assert out.read_bytes() == b""
    assert leftovers(tmp_path) == []


def test_file_200_mb_with_digest(cells: tuple[Cell, Cell], tmp_path: Path) -> None:
    owner, site = cells
    src = tmp_path / "model.bin"
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with src.open("wb") as f:
        for i in range(200):
            chunk = block[i:] + block[:i]
            f.write(chunk)
            h.update(chunk)
    ref = offer_file(owner, src)
    dest = tmp_path / "copy.bin"
    download_file(site, "server", ref, dest)
    d = hashlib.sha256()
    with dest.open("rb") as f:
        while piece := f.read(8 * MiB):
            d.update(piece)
    assert d.hexdigest() == h.hexdigest()
    assert leftovers(tmp_path) == []


def test_file_chunks_reach_the_file_in_aligned_pieces(
    cells: tuple[Cell, Cell], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each pwrite fills whole page-cache folios of at most WRITE_PIECE bytes (big
    # writes draw 2 MiB folios, which cost a VM host page faults): an odd chunk size
    # must not make a call straddle a piece boundary, and every byte still lands.
    owner, site = cells
    src = tmp_path / "src.bin"
    data = os.urandom(5 * MiB + 777)
    src.write_bytes(data)
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def spy(fd: int, buf: Any, offset: int) -> int:
        calls.append((offset, memoryview(buf).nbytes))
        return real(fd, buf, offset)

    ref = offer_file(owner, src, chunk_size=MiB + 12345)
    monkeypatch.setattr(os, "pwrite", spy)
    dest = download_file(site, "server", ref, tmp_path / "copy.bin", window=3)
    monkeypatch.undo()
    assert dest.read_bytes() == data
    assert sum(n for _, n in calls) == len(data)
    assert all(0 < n <= WRITE_PIECE for _, n in calls)
    assert all(off // WRITE_PIECE == (off + n - 1) // WRITE_PIECE for off, n in calls)


def test_write_pieces_continues_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pwrite may write less than asked (a signal, a full pipe of a FUSE file
    # system): the rest goes on from where it stopped, at the right offsets.
    data = np.arange(300_000, dtype=np.int32)  # a view whose format is not "B"
    real = os.pwrite
    asked: list[tuple[int, int]] = []

    def short(fd: int, buf: Any, offset: int) -> int:
        asked.append((offset, memoryview(buf).nbytes))
        return real(fd, memoryview(buf)[:1000], offset)

    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        monkeypatch.setattr(os, "pwrite", short)
        assert write_pieces(fd, memoryview(data), 100, piece=64 * 1024) == data.nbytes
        monkeypatch.undo()
        assert os.pread(fd, data.nbytes, 100) == data.tobytes()
    finally:
        os.close(fd)
    piece = 64 * 1024
    assert asked[0] == (100, piece - 100)  # the first piece ends on a piece boundary
    assert all(off // piece == (off + n - 1) // piece for off, n in asked)
    for (off, n), (nxt, _) in itertools.pairwise(asked):
        assert nxt == off + min(n, 1000)  # on from where the short write stopped


def test_file_consumer_writes_pieces_of_every_buffer(tmp_path: Path) -> None:
    # A chunk may arrive as several frames; each is written at its own offset.
    c = FileConsumer(tmp_path / "out.bin")
    c.begin("ref", 3 * WRITE_PIECE, None)
    parts = [os.urandom(WRITE_PIECE + 5), os.urandom(3), os.urandom(WRITE_PIECE - 8)]
    c.write(WRITE_PIECE, [memoryview(p) for p in parts])
    assert c.read(WRITE_PIECE, 2 * WRITE_PIECE) == b"".join(parts)
    assert c.read(0, WRITE_PIECE) == bytes(WRITE_PIECE)  # untouched: still the hole
    part = c.part
    assert part is not None
    c.download_failed("ref", "test over")  # removes the part file, closes the descriptors
    assert not part.exists()


# ---------------------------------------------------------- cache=False: write-behind


def _in_page_cache(path: Path, offset: int = 0) -> bool:
    """Whether the page at `offset` of `path` is in the page cache (no disk read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT) > 0
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _page_cache_seen(folder: Path) -> bool:
    """Whether `_in_page_cache` can tell here: RWF_NOWAIT reads work and written-out
    pages go on POSIX_FADV_DONTNEED (not so on tmpfs)."""
    probe = folder / "probe.bin"
    probe.write_bytes(os.urandom(64 * 1024))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        cached = _in_page_cache(probe)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return cached and not _in_page_cache(probe)
    except OSError:  # EOPNOTSUPP: no RWF_NOWAIT here
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_file_without_cache_is_written_out_and_not_left_in_memory(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks come out of order (window 4); every byte still lands, and neither the
    # early chunks nor the last WRITE_BEHIND bytes stay in the page cache.
    owner, site = fake_cells
    monkeypatch.setattr(_file, "WRITE_BEHIND", 2 * MiB)
    src = tmp_path / "src.bin"
    data = os.urandom(9 * MiB + 4321)
    src.write_bytes(data)
    ref = offer_file(owner, src, chunk_size=MiB)
    dest = download_file(site, "server", ref, tmp_path / "copy.bin", window=4, cache=False)
    if _page_cache_seen(tmp_path):
        assert not any(_in_page_cache(dest, off) for off in range(0, len(data), MiB))
    assert dest.read_bytes() == data
    assert leftovers(tmp_path) == []


def test_file_with_cache_stays_in_memory(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path
) -> None:
    owner, site = fake_cells
    src = tmp_path / "src.bin"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    dest = download_file(site, "server", offer_file(owner, src, chunk_size=MiB), tmp_path / "c")
    if _page_cache_seen(tmp_path):
        assert all(_in_page_cache(dest, off) for off in range(0, len(data), MiB))
    assert dest.read_bytes() == data


class RecordedSyncRange:
    """Stands in for libc's sync_file_range: records calls, answers `fail` errno if set."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.fail = fail

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((offset, length, flags))
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        return 0


def test_write_behind_waits_for_each_range_before_dropping_it_in_written_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = RecordedSyncRange()
    monkeypatch.setattr(_file, "_libc_sync_range", lambda: sync)
    monkeypatch.setattr(_file, "WRITE_BEHIND", 2 * WRITE_PIECE)
    dropped: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        dropped.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    c = FileConsumer(tmp_path / "out.bin", cache=False)
    c.resume_from("ref", {})
    c.begin("ref", 5 * WRITE_PIECE, None)
    order = [1, 0, 3, 2, 4]  # as a window answers
    blocks = {i: os.urandom(WRITE_PIECE) for i in order}
    for i in order:
        c.write(i * WRITE_PIECE, [memoryview(blocks[i])])
    write, wait = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
    started = [(o // WRITE_PIECE, f) for o, n, f in sync.calls if f == write]
    assert started == [(i, write) for i in order]  # each range handed to the disk at once
    assert [o // WRITE_PIECE for o, _ in dropped] == [1, 0, 3]  # over 2 pieces wait
    c.download_completed("ref")  # the rest is written out and dropped too
    assert [o // WRITE_PIECE for o, _ in dropped] == order
    waited = [(o, n) for o, n, f in sync.calls if f == wait]
    assert waited == dropped  # every range dropped was waited for first
    assert c.outcome.ok
    assert (tmp_path / "out.bin").read_bytes() == b"".join(blocks[i] for i in range(5))


def test_write_error_found_writing_behind_fails_the_download(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error the disk reports while the data goes out must fail the download,
    # not pass unnoticed as it would in the page cache until a later writeback.
    owner, site = fake_cells
    monkeypatch.setattr(_file, "_libc_sync_range", lambda: RecordedSyncRange(errno.EIO))
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB))
    ref = offer_file(owner, src, chunk_size=MiB)
    dest = tmp_path / "copy.bin"
    with pytest.raises(DownloadError, match=r"could not write at offset.*Input/output error"):
        download_file(site, "server", ref, dest, cache=False)
    assert not dest.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("answer", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_write_behind_stops_where_the_file_system_cannot_do_it(
    fake_cells: tuple[FakeCell, FakeCell],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: int,
) -> None:
    owner, site = fake_cells
    sync = RecordedSyncRange(answer)
    monkeypatch.setattr(_file, "_libc_sync_range", lambda: sync)
    src = tmp_path / "src.bin"
    data = os.urandom(4 * MiB + 1)
    src.write_bytes(data)
    ref = offer_file(owner, src, chunk_size=MiB)
    dest = download_file(site, "server", ref, tmp_path / "copy.bin", cache=False)
    assert dest.read_bytes() == data
    assert len(sync.calls) == 1  # tried once, then written as with cache=True


class Corrupting(ObjectProducer):
    """Flips one byte of the chunk at `offset` (as a bad link or disk would)."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.at = offset

    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        rc, data, new_state = super().produce(ref_id, obj, state, requester)
        if state and state.get("offset") == self.at and "length" in state:
            bad = bytearray(data)
            bad[10] ^= 0xFF
            data = bytes(bad)
        return rc, data, new_state


def offer_with(owner: CellLike, producer: ObjectProducer, obj: Any, **kw: Any) -> str:
    tx = ObjDownloader.new_transaction(owner, producer, 30.0)
    ref = ObjDownloader.add_download_object(tx, obj, **kw)
    producer.prepare(ref, obj)
    return ref


def test_corrupted_chunk_fails_and_leaves_no_file(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path
) -> None:
    owner, site = fake_cells
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5 * MiB))
    statuses: list[str] = []
    ref = offer_with(
        owner, Corrupting(2 * MiB), src, obj_downloaded_cb=lambda r, s, st, o: statuses.append(st)
    )
    dest = tmp_path / "dest.bin"
    with pytest.raises(DownloadError, match="digest mismatch"):
        download_file(site, "server", ref, dest)
    assert not dest.exists() and leftovers(tmp_path) == []
    wait_for(lambda: statuses == [DownloadStatus.FAILED])  # the owner was told


class Truncating(ObjectProducer):
    """Truncates the served file right after serving its first chunk."""

    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        result = super().produce(ref_id, obj, state, requester)
        if not state or "offset" not in state:
            os.truncate(obj, MiB + 5)
        return result


def test_file_truncated_while_served_fails_cleanly(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path
) -> None:
    owner, site = fake_cells
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(6 * MiB))
    ref = offer_with(owner, Truncating(), src)
    dest = tmp_path / "dest.bin"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="changed size"):
        download_file(site, "server", ref, dest)
    assert time.monotonic() - t0 < 3.0
    assert not dest.exists() and leftovers(tmp_path) == []


def test_file_destination_errors(fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path) -> None:
    owner, site = fake_cells
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    ref = offer_file(owner, src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download_file(site, "server", ref, tmp_path / "no-such-dir" / "x")
    with pytest.raises(IsADirectoryError, match="directory"):
        download_file(site, "server", ref, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        offer_file(owner, tmp_path / "missing")


def test_unknown_ref_raises_download_error(fake_cells: tuple[FakeCell, FakeCell]) -> None:
    owner, site = fake_cells
    offer_bytes(owner, b"something else")
    with pytest.raises(DownloadError, match="no such ref") as info:
        download_bytes(site, "server", "R-unknown", tries=1)
    assert info.value.ref_id == "R-unknown" and "invalid_request" in info.value.reason


def test_dict_of_arrays_and_plain_values(any_cells: tuple[CellLike, CellLike]) -> None:
    owner, site = any_cells
    rng = np.random.default_rng(7)
    model: dict[str, Any] = {
        f"layer{i}.w": rng.standard_normal((i % 7 + 1, 5)).astype(np.float32) for i in range(1000)
    }
    model["big"] = rng.standard_normal(30 * MiB // 8)  # one 30 MB float64 array, > many chunks
    model["ints"] = np.arange(12, dtype=np.int16).reshape(3, 4)
    model["meta"] = {"round": 3, "names": ["a", "b"], "lr": 0.01, "none": None, "blob": b"\x00\x01"}
    ref = offer_dict(owner, model)
    got = download_dict(site, "server", ref)
    assert set(got) == set(model)
    for k, v in model.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert np.array_equal(got[k], v), k
    assert got["meta"] == model["meta"]


def test_objects_share_one_transaction(
    fake_cells: tuple[FakeCell, FakeCell], tmp_path: Path
) -> None:
    owner, site = fake_cells
    fired: list[tuple[str, int]] = []
    tx_id = new_transaction(owner, timeout=30.0, timeout_cb=lambda t, o: fired.append((t, len(o))))
    src = tmp_path / "f.bin"
    src.write_bytes(b"file")
    ref1 = offer_bytes(owner, b"one", transaction_id=tx_id)
    ref2 = offer_file(owner, src, transaction_id=tx_id)
    ref3 = offer_dict(owner, {"k": 1}, transaction_id=tx_id)
    assert download_bytes(site, "server", ref1) == b"one"
    assert download_file(site, "server", ref2, tmp_path / "g.bin").read_bytes() == b"file"
    assert download_dict(site, "server", ref3) == {"k": 1}
    ObjDownloader.delete_transaction(tx_id, call_cb=True)
    assert fired == [(tx_id, 3)]
    with pytest.raises(ValueError, match="no such transaction"):
        offer_bytes(owner, b"late", transaction_id=tx_id)


def test_three_site_processes_fetch_one_file(tmp_path: Path) -> None:
    bproc, url = _procs.start_broker_process()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs: list[Any] = []
    try:
        src = tmp_path / "model.bin"
        src.write_bytes(os.urandom(20 * MiB))
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        done: list[str] = []
        with Cell("server", url) as owner:
            ref = offer_file(owner, src, obj_downloaded_cb=lambda r, s, st, o: done.append(s))
            procs = [
                ctx.Process(
                    target=_procs.fetch_file_main,
                    args=(f"site-{i}", url, ref, str(tmp_path / f"site-{i}.bin"), results),
                )
                for i in range(1, 4)
            ]
            for p in procs:
                p.start()
            got = {}
            for _ in procs:
                name, digest = results.get(timeout=60)
                got[name] = digest
            assert got == {f"site-{i}": want for i in range(1, 4)}
            wait_for(lambda: sorted(done) == ["site-1", "site-2", "site-3"])
            ObjDownloader.shutdown()
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        _procs.end_children(procs, results)
        _procs.stop_process(bproc)
