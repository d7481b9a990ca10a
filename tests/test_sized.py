"""Socket-free tests of the "sized" exchange: SizedProducer (through ObjectProducer), the
ready sources for bytes and files, OrderedDigest and SizedConsumer (through
BytesConsumer).

Downloads are driven by calling ``produce`` and feeding its replies to a consumer, the
way the owner's handler and the site's loop would, in order (the seed's exchange) and
out of order (the site's window).
"""

from __future__ import annotations

import array
import hashlib
import itertools
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objdl.downloader import sized
from objdl.downloader._defs import InvalidStateError, ProduceRC
from objdl.downloader.sized import (
    MAX_CHUNK_SIZE,
    OrderedDigest,
    SizedProducer,
    SizedSource,
    as_pieces,
)
from objdl.errors import ObjdlError
from objdl.objects import BytesConsumer, BytesSource, FileSource, ObjectProducer
from objdl.objects._dict import DictSource
from tests.conftest import reference_digest

PROPERTY = settings(max_examples=100, deadline=None)
CHUNK = 7
SITE = "site-1"
DESC_KEYS = {"offset", "size", "chunk", "algo", "digest", "meta"}


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def joined(data: Any) -> bytes:
    return b"".join(bytes(p) for p in as_pieces(data))


def sizes_for(chunk: int) -> list[int]:
    return [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 2]


SIZE_CASES = [(c, n) for c in (CHUNK, 64) for n in sizes_for(c)]


def seed_download(
    producer: SizedProducer, ref: str, obj: Any, consumer: BytesConsumer, requester: str = SITE
) -> int:
    """The seed's exchange, one request at a time until EOF; returns the OK replies."""
    state: dict | None = None
    for replies in range(100_000):
        rc, data, new_state = producer.produce(ref, obj, state, requester)  # type: ignore[arg-type]
        if rc == ProduceRC.EOF:
            assert data is None and new_state == {}
            consumer.download_completed(ref)
            return replies
        assert rc == ProduceRC.OK
        state = consumer.consume(ref, new_state, data)
    raise AssertionError("the exchange never reached EOF")


def windowed_download(
    producer: SizedProducer,
    ref: str,
    obj: Any,
    consumer: BytesConsumer,
    length: int,
    rng: random.Random,
    requester: str = SITE,
) -> tuple[dict, tuple[str, Any, dict]]:
    """The site's window: chunks asked for and arriving in shuffled orders.

    Returns the description and the owner's answer to the final request.
    """
    rc, data, desc = producer.produce(ref, obj, {"length": length}, requester)
    assert rc == ProduceRC.OK and set(desc) == DESC_KEYS and desc["offset"] == 0
    size = desc["size"]
    step = min(length, desc["chunk"])
    first = as_pieces(data)
    assert sum(p.nbytes for p in first) == min(step, size)
    consumer.begin(ref, size, desc["meta"])
    offsets = list(range(min(step, size), size, step))
    rng.shuffle(offsets)
    arrivals = [(0, first)]
    for off in offsets:
        rc, data, state = producer.produce(ref, obj, {"offset": off, "length": length}, requester)
        n = min(step, size - off)
        assert rc == ProduceRC.OK and state == {"offset": off + n}
        pieces = as_pieces(data)
        assert sum(p.nbytes for p in pieces) == n
        arrivals.append((off, pieces))
    rng.shuffle(arrivals)
    digest = OrderedDigest(desc["algo"])
    for off, pieces in arrivals:
        consumer.write(off, pieces)
        digest.add(off, pieces)
    assert digest.upto == size
    got = digest.hexdigest()
    ok = got == desc["digest"]
    final = producer.produce(
        ref, obj, {"offset": size, "ok": ok, "reason": "" if ok else "digest mismatch"}, requester
    )
    if ok:
        consumer.download_completed(ref)
    return desc, final


# --- sources that count what the producer does with them ----------------------------------


class TrackedSource(SizedSource):
    """Bytes served as several pieces, counting closes; digest can be made to block or fail."""

    def __init__(
        self,
        data: bytes,
        entered: threading.Event | None = None,
        gate: threading.Event | None = None,
        fail_digest: bool = False,
    ) -> None:
        self.data = data
        self.size = len(data)
        self.meta = {"kind": "tracked"}
        self.closes = 0
        self.entered = entered
        self.gate = gate
        self.fail_digest = fail_digest

    def read(self, offset: int, length: int) -> list[bytes]:
        end = min(offset + length, self.size)
        mid = (offset + end) // 2
        return [self.data[offset:mid], self.data[mid:end]]

    def digest(self, algo: str) -> str:
        if self.entered is not None and self.gate is not None:
            self.entered.set()
            assert self.gate.wait(10.0)
        if self.fail_digest:
            raise OSError("disk on fire")
        return super().digest(algo)  # the base class's chunked digest

    def close(self) -> None:
        self.closes += 1


class TrackedProducer(SizedProducer):
    def __init__(self, chunk_size: int = CHUNK, open_delay: float = 0.0) -> None:
        super().__init__(chunk_size)
        self.open_delay = open_delay
        self.source_kw: dict[str, dict[str, Any]] = {}  # ref id -> TrackedSource kwargs
        self.opened: list[tuple[str, TrackedSource]] = []

    def open_source(self, ref_id: str, obj: Any) -> SizedSource:
        if self.open_delay:
            time.sleep(self.open_delay)  # widens any race between threads
        src = TrackedSource(obj, **self.source_kw.get(ref_id, {}))
        self.opened.append((ref_id, src))
        return src


# --- the producer's side of the exchange --------------------------------------------------


@pytest.mark.parametrize("state", [None, {}, {"length": 3}, {"length": 10**9}])
def test_first_request_describes_the_object_and_sends_the_first_chunk(state: Any) -> None:
    data = payload(20)
    p = ObjectProducer(chunk_size=CHUNK)
    rc, chunk, desc = p.produce("R1", data, state, SITE)
    assert rc == ProduceRC.OK
    assert desc == {
        "offset": 0,
        "size": 20,
        "chunk": CHUNK,
        "algo": "xxh3_128",
        "digest": reference_digest("xxh3_128", data),
        "meta": None,
    }
    want = min((state or {}).get("length", CHUNK), CHUNK)
    assert joined(chunk) == data[:want]


def test_first_request_of_an_empty_object() -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    rc, chunk, desc = p.produce("R1", b"", None, SITE)
    assert rc == ProduceRC.OK and joined(chunk) == b""
    assert desc["size"] == 0 and desc["digest"] == reference_digest("xxh3_128", b"")
    assert p.produce("R1", b"", {"offset": 0}, SITE) == (ProduceRC.EOF, None, {})


def test_description_is_a_copy_each_time() -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    _, _, desc = p.produce("R1", b"abcdef", None, SITE)
    desc["size"] = 999
    desc["digest"] = "forged"
    _, _, again = p.produce("R1", b"abcdef", None, SITE)
    assert again["size"] == 6 and again["digest"] == reference_digest("xxh3_128", b"abcdef")


@pytest.mark.parametrize("length", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 1000])
def test_any_chunk_by_offset_with_length_clipped_to_chunk_size(length: int) -> None:
    data = payload(3 * CHUNK + 2)
    p = ObjectProducer(chunk_size=CHUNK)
    for off in range(len(data)):
        rc, chunk, state = p.produce("R1", data, {"offset": off, "length": length}, SITE)
        n = min(length, CHUNK, len(data) - off)
        assert rc == ProduceRC.OK
        assert joined(chunk) == data[off : off + n]
        assert state == {"offset": off + n}


def test_seed_style_state_without_length_gets_full_chunks() -> None:
    data = payload(20)
    p = ObjectProducer(chunk_size=CHUNK)
    assert joined(p.produce("R1", data, {"offset": 0}, SITE)[1]) == data[:CHUNK]
    assert p.produce("R1", data, {"offset": 14}, SITE)[2] == {"offset": 20}


@pytest.mark.parametrize("final", [{"offset": 9}, {"offset": 9, "ok": True, "reason": ""}])
def test_final_request_is_eof(final: dict) -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    assert p.produce("R1", payload(9), final, SITE) == (ProduceRC.EOF, None, {})


def test_final_request_not_ok_is_an_error_with_the_reason() -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    data = payload(9)
    state = {"offset": 9, "ok": False, "reason": "digest mismatch"}
    assert p.produce("R1", data, state, SITE) == (ProduceRC.ERROR, "digest mismatch", {})
    rc, reason, new_state = p.produce("R1", data, {"offset": 9, "ok": False}, SITE)
    assert rc == ProduceRC.ERROR and isinstance(reason, str) and reason and new_state == {}
    rc, reason, _ = p.produce("R1", data, {"offset": 9, "ok": False, "reason": "x" * 5000}, SITE)
    assert rc == ProduceRC.ERROR and reason == "x" * 500  # a site cannot flood the log
    rc, reason, _ = p.produce("R1", data, {"offset": 9, "ok": False, "reason": 42}, SITE)
    assert (rc, reason) == (ProduceRC.ERROR, "42")


def test_ok_false_before_the_end_is_just_a_chunk_request() -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    data = payload(9)
    rc, chunk, state = p.produce("R1", data, {"offset": 2, "ok": False, "reason": "no"}, SITE)
    assert rc == ProduceRC.OK and joined(chunk) == data[2:9] and state == {"offset": 9}


@pytest.mark.parametrize("offset", [-1, 10, 10**12, 1.0, 0.5, True, False, "0", None, [0]])
def test_offset_outside_the_object_or_not_an_int_is_invalid_state(offset: Any) -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    with pytest.raises(InvalidStateError, match="offset"):
        p.produce("R1", payload(9), {"offset": offset, "length": 3}, SITE)


@pytest.mark.parametrize("length", [0, -1, 1.0, 2.5, True, False, "7", None])
@pytest.mark.parametrize("offset", [None, 0, 4, 9])
def test_bad_length_is_invalid_state(length: Any, offset: int | None) -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    state: dict[str, Any] = {"length": length}
    if offset is not None:
        state["offset"] = offset
    with pytest.raises(InvalidStateError, match="length"):
        p.produce("R1", payload(9), state, SITE)


def test_invalid_state_error_is_an_objdl_error() -> None:
    assert issubclass(InvalidStateError, ObjdlError)


def test_many_sites_interleaved_on_one_ref() -> None:
    data = payload(5 * CHUNK + 3)
    p = ObjectProducer(chunk_size=CHUNK)
    consumers = {f"site-{i}": BytesConsumer() for i in range(3)}
    states: dict[str, Any] = dict.fromkeys(consumers)
    live = set(consumers)
    while live:
        for site in sorted(live):
            rc, chunk, new_state = p.produce("R1", data, states[site], site)
            if rc == ProduceRC.EOF:
                consumers[site].download_completed("R1")
                live.discard(site)
            else:
                states[site] = consumers[site].consume("R1", new_state, chunk)
    assert all(c.result == data for c in consumers.values())


@pytest.mark.parametrize("chunk_size", [0, -1, MAX_CHUNK_SIZE + 1])
def test_chunk_size_out_of_range_is_rejected(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ObjectProducer(chunk_size=chunk_size)


def test_chunk_size_limits_are_accepted() -> None:
    assert ObjectProducer(chunk_size=1).chunk_size == 1
    assert ObjectProducer(chunk_size=MAX_CHUNK_SIZE).chunk_size == MAX_CHUNK_SIZE


@pytest.mark.parametrize("chunk_size", [7.0, 7.5, True, "7", None])
def test_chunk_size_that_is_not_an_int_is_rejected(chunk_size: Any) -> None:
    # Regression: 7.0 once passed the range check; every seed-style request then failed
    # with InvalidStateError (blaming the site) and chunk reads with TypeError.
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        ObjectProducer(chunk_size=chunk_size)


@pytest.mark.parametrize("algo", ["md5", "sha1", "SHA256", ""])
def test_unknown_digest_is_rejected(algo: str) -> None:
    with pytest.raises(ValueError, match="digest"):
        ObjectProducer(digest=algo)
    with pytest.raises(ValueError, match="digest"):
        OrderedDigest(algo)


def test_blake2b_digest() -> None:
    data = payload(100)
    p = ObjectProducer(chunk_size=CHUNK, digest="blake2b")
    desc = p.prepare("R1", data)
    assert desc["algo"] == "blake2b" and desc["digest"] == hashlib.blake2b(data).hexdigest()
    c = BytesConsumer()
    seed_download(p, "R1", data, c)
    assert c.result == data


# --- prepare and release: open once per ref, close once -----------------------------------


def test_prepare_opens_and_hashes_once_per_ref() -> None:
    p = TrackedProducer()
    data = payload(30)
    desc = p.prepare("R1", data)
    assert desc["digest"] == reference_digest("xxh3_128", data)
    assert desc["meta"] == {"kind": "tracked"}
    assert p.prepare("R1", data) == desc
    for off in range(0, 30, 3):
        p.produce("R1", data, {"offset": off, "length": 3}, SITE)
    p.produce("R1", data, None, SITE)
    assert [r for r, _ in p.opened] == ["R1"]
    p.produce("R2", data, None, SITE)  # the same object under another ref is opened again
    assert [r for r, _ in p.opened] == ["R1", "R2"]


def test_concurrent_first_requests_open_the_source_once() -> None:
    p = TrackedProducer(open_delay=0.05)
    data = payload(50)
    n = 8
    barrier = threading.Barrier(n, timeout=5.0)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def site(i: int) -> None:
        try:
            barrier.wait()
            rc, chunk, _ = p.produce("R1", data, {"offset": i, "length": 5}, f"site-{i}")
            assert rc == ProduceRC.OK
            results.append(joined(chunk))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=site, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10.0)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(results) == sorted(data[i : i + 5] for i in range(n))
    assert len(p.opened) == 1


def test_concurrent_first_requests_all_fail_when_opening_fails() -> None:
    p = TrackedProducer(open_delay=0.05)
    p.source_kw["R1"] = {"fail_digest": True}
    n = 6
    barrier = threading.Barrier(n, timeout=5.0)
    outcomes: list[str] = []

    def site(i: int) -> None:
        barrier.wait()
        try:
            p.produce("R1", b"abcdef", None, f"site-{i}")
            outcomes.append("served")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=site, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10.0)
    assert not any(t.is_alive() for t in threads)  # nobody waits forever on a failed open
    assert len(outcomes) == n and "served" not in outcomes
    assert all(src.closes == 1 for _, src in p.opened)
    del p.source_kw["R1"]
    assert p.prepare("R1", b"abcdef")["size"] == 6  # the failure was not remembered


def test_release_closes_the_source_once() -> None:
    p = TrackedProducer()
    p.prepare("R1", b"abc")
    p.prepare("R2", b"def")
    (_, src1), (_, src2) = p.opened
    p.release("R1", b"abc")
    assert (src1.closes, src2.closes) == (1, 0)
    p.release("R1", b"abc")
    assert src1.closes == 1
    p.release("R-unknown", None)
    assert src2.closes == 0


def test_failed_digest_closes_the_source_and_caches_nothing() -> None:
    p = TrackedProducer()
    p.source_kw["R1"] = {"fail_digest": True}
    with pytest.raises(OSError, match="disk on fire"):
        p.prepare("R1", b"abc")
    (_, src) = p.opened[0]
    assert src.closes == 1
    del p.source_kw["R1"]
    assert p.prepare("R1", b"abc")["size"] == 3  # tried again, not remembered as failed
    assert len(p.opened) == 2


def test_preparing_one_ref_does_not_stall_requests_for_another() -> None:
    # Regression: open_source and the digest ran under the producer-wide lock that
    # produce() also takes, so hashing a new object stalled every request in service.
    p = TrackedProducer()
    data = payload(30)
    p.prepare("fast", data)
    entered, gate = threading.Event(), threading.Event()
    p.source_kw["slow"] = {"entered": entered, "gate": gate}
    served: list[bytes] = []
    hashing = threading.Thread(target=p.prepare, args=("slow", data))
    serving = threading.Thread(
        target=lambda: served.append(joined(p.produce("fast", data, {"offset": 0}, SITE)[1]))
    )
    hashing.start()
    try:
        assert entered.wait(5.0)
        serving.start()
        serving.join(timeout=2.0)
        answered_while_hashing = not serving.is_alive()
    finally:
        gate.set()
        hashing.join(timeout=5.0)
        if serving.ident is not None:
            serving.join(timeout=5.0)
    assert not hashing.is_alive() and not serving.is_alive()
    assert served == [data[:CHUNK]]
    assert answered_while_hashing


def test_default_digest_reads_in_chunks_and_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sized, "DEFAULT_CHUNK_SIZE", 7)
    data = payload(45)
    src = TrackedSource(data)
    for algo in sized.DIGESTS:
        assert src.digest(algo) == reference_digest(algo, data)


# --- ObjectProducer: which source for which object ----------------------------------------


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview])
def test_object_producer_serves_bytes_likes(make: Any) -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    obj = make(b"0123456789")
    src = p.open_source("R1", obj)
    try:
        assert isinstance(src, BytesSource) and src.size == 10
    finally:
        src.close()


def test_object_producer_serves_paths_and_dicts(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights")
    p = ObjectProducer(chunk_size=CHUNK)
    src = p.open_source("R1", f)
    try:
        assert isinstance(src, FileSource) and src.size == 7
        assert src.meta == {"name": "model.bin"}
    finally:
        src.close()
    d = p.open_source("R2", {"a": 1})
    assert isinstance(d, DictSource)


@pytest.mark.parametrize(
    "obj", ["/etc/hostname", 42, None, [b"a", b"b"], (b"a",), np.zeros(3), object()]
)
def test_object_producer_refuses_other_types(obj: Any) -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    with pytest.raises(TypeError, match="cannot offer a"):
        p.open_source("R1", obj)
    with pytest.raises(TypeError, match="cannot offer a"):
        p.produce("R1", obj, None, SITE)
    assert p.prepare("R1", b"fine")["size"] == 4  # the failure was not remembered


# --- BytesSource --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [bytes, bytearray])
def test_bytes_source_reads_are_views_not_copies(make: Any) -> None:
    data = make(payload(30))
    src = BytesSource(data)
    piece = src.read(5, 10)
    assert isinstance(piece, memoryview) and piece.obj is data
    assert bytes(piece) == bytes(data[5:15])
    assert src.digest("sha256") == hashlib.sha256(data).hexdigest()
    src.close()


@pytest.mark.parametrize(
    "obj",
    [
        array.array("i", range(10)),
        np.arange(12, dtype=">f4").reshape(3, 4),
        np.arange(6, dtype=np.int64).reshape(2, 3, 1),
        memoryview(b"abcdef").cast("B", (2, 3)),
    ],
    ids=["array-i", "numpy-2d-be-f4", "numpy-3d-i8", "memoryview-2d"],
)
def test_bytes_source_of_typed_buffers_serves_their_raw_bytes(obj: Any) -> None:
    raw = memoryview(obj).tobytes()
    p = ObjectProducer(chunk_size=5)
    view = memoryview(obj)
    c = BytesConsumer()
    seed_download(p, "R1", view, c)
    assert bytes(c.result or b"") == raw and len(raw) == view.nbytes
    p.release("R1", view)


def test_bytes_source_refuses_non_contiguous_views() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        BytesSource(memoryview(b"abcdefgh")[::2])
    with pytest.raises(ValueError, match="contiguous"):
        BytesSource(memoryview(np.zeros((4, 4))[:, 1]))


def test_closing_a_bytes_source_lets_go_of_the_buffer() -> None:
    data = bytearray(b"x" * 50)
    src = BytesSource(data)
    with pytest.raises(BufferError):
        data.extend(b"y")  # exported while offered: its size cannot change under the sites
    src.close()
    data.extend(b"y")  # `src` is still referenced: close() itself let go
    assert len(data) == 51


def test_release_of_offered_bytes_closes_their_source() -> None:
    class Keeping(ObjectProducer):
        def open_source(self, ref_id: str, obj: Any) -> SizedSource:
            self.kept = super().open_source(ref_id, obj)  # outlives the producer's table
            return self.kept

    data = bytearray(b"x" * 50)
    p = Keeping(chunk_size=CHUNK)
    p.prepare("R1", data)
    with pytest.raises(BufferError):
        data.extend(b"y")
    p.release("R1", data)
    data.extend(b"y")
    assert len(data) == 51 and p.kept is not None


# --- FileSource ---------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def test_file_source_reads_and_digests(tmp_path: Path) -> None:
    data = payload(1000)
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    src = FileSource(f)
    try:
        assert src.size == 1000 and src.meta == {"name": "data.bin"}
        assert src.read(0, 0) == b""
        assert src.read(990, 10) == data[990:]
        assert src.read(123, 77) == data[123:200]
        assert src.digest("blake2b") == hashlib.blake2b(data).hexdigest()
    finally:
        src.close()
    src.close()  # idempotent


@pytest.mark.parametrize("change", ["grow", "shrink", "empty"])
def test_file_that_changes_size_fails_naming_it(tmp_path: Path, change: str) -> None:
    f = tmp_path / "growing.log"
    data = payload(40)
    f.write_bytes(data)
    p = ObjectProducer(chunk_size=CHUNK)
    assert joined(p.produce("R1", f, None, SITE)[1]) == data[:CHUNK]
    if change == "grow":
        with f.open("ab") as fh:
            fh.write(b"more")
    else:
        os.truncate(f, 10 if change == "shrink" else 0)
    with pytest.raises(ValueError, match="changed size") as info:
        p.produce("R1", f, {"offset": CHUNK}, SITE)
    assert str(f) in str(info.value)
    p.release("R1", f)


def test_file_changed_in_place_fails_the_digest_check(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    data = payload(3 * CHUNK + 2)
    f.write_bytes(data)
    p = ObjectProducer(chunk_size=CHUNK)
    p.prepare("R1", f)  # hashed now
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, last byte differs
    with pytest.raises(ValueError, match="digest mismatch"):
        seed_download(p, "R1", f, BytesConsumer())
    p.release("R1", f)


@needs_proc
def test_file_source_of_a_directory_is_refused_without_leaking(tmp_path: Path) -> None:
    before = _open_fds()
    with pytest.raises(ValueError, match="not a regular file"):
        FileSource(tmp_path)
    with pytest.raises(FileNotFoundError):
        FileSource(tmp_path / "missing")
    assert _open_fds() == before


@needs_proc
def test_producer_release_closes_the_file(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    p = ObjectProducer(chunk_size=CHUNK)
    before = _open_fds()
    p.prepare("R1", f)
    p.produce("R1", f, None, SITE)
    p.produce("R1", f, {"offset": 0}, SITE)
    assert _open_fds() == before + 1  # one descriptor per ref, however many requests
    p.release("R1", f)
    assert _open_fds() == before


# --- OrderedDigest ------------------------------------------------------------------------


def test_ordered_digest_holds_chunks_until_the_gap_fills() -> None:
    data = b"0123456789"
    d = OrderedDigest("sha256")
    d.add(6, [memoryview(data[6:])])
    d.add(3, [memoryview(data[3:6])])
    assert d.upto == 0
    assert d.hexdigest() == hashlib.sha256(b"").hexdigest()  # nothing hashed out of order
    d.add(0, [memoryview(data[:1]), memoryview(data[1:3])])
    assert d.upto == 10
    assert d.hexdigest() == hashlib.sha256(data).hexdigest()


def test_ordered_digest_of_nothing() -> None:
    d = OrderedDigest("blake2b")
    d.add(0, [])
    assert d.upto == 0 and d.hexdigest() == hashlib.blake2b(b"").hexdigest()


@PROPERTY
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=40),
    splits=st.lists(st.integers(0, 600), max_size=40),
    algo=st.sampled_from(sized.DIGESTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_ordered_digest_in_any_order_equals_hashing_the_whole(
    data: bytes, cuts: list[int], splits: list[int], algo: str, seed: int
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = []
    for start, end in itertools.pairwise(bounds):
        inner = sorted({start, end, *(s for s in splits if start < s < end)})
        pieces = [memoryview(data)[a:b] for a, b in itertools.pairwise(inner)]
        chunks.append((start, pieces))
    random.Random(seed).shuffle(chunks)
    d = OrderedDigest(algo)
    for off, pieces in chunks:
        d.add(off, pieces)
    assert d.upto == len(data)
    assert d.hexdigest() == reference_digest(algo, data)


@PROPERTY
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=20),
    seed=st.integers(0, 2**32 - 1),
)
def test_background_digest_equals_hashing_inline(data: bytes, cuts: list[int], seed: int) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [(a, [memoryview(data)[a:b]]) for a, b in itertools.pairwise(bounds)]
    random.Random(seed).shuffle(chunks)
    steps: list[int] = []
    d = OrderedDigest("sha256", background=True, on_hashed=lambda: steps.append(1))
    try:
        for off, pieces in chunks:
            d.add(off, pieces)
        assert d.upto == len(data)
        assert d.hexdigest(5.0) == hashlib.sha256(data).hexdigest()
        assert d.hashed == len(data)
    finally:
        d.close()
    assert len(steps) == len(chunks)  # close() let the thread finish its queue


def test_background_digest_thread_ends_on_close() -> None:
    d = OrderedDigest("sha256", background=True)
    d.add(0, [memoryview(b"x" * 100_000)])
    assert d.wait(5.0) and d.hashed == 100_000
    d.close()
    d.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "objdl-digest"]


class _BrokenHash:
    def update(self, data: Any) -> None:
        raise OSError("simulated hashing failure")


def test_background_digest_reports_a_hashing_error() -> None:
    d = OrderedDigest("sha256", background=True)
    d._h = _BrokenHash()  # type: ignore[assignment]
    try:
        d.add(0, [memoryview(b"abc")])
        with pytest.raises(RuntimeError, match="hashing failed"):
            d.hexdigest(5.0)
        assert isinstance(d.error, OSError)
    finally:
        d.close()


def test_background_digest_wait_is_bounded() -> None:
    gate = threading.Event()
    d = OrderedDigest("sha256", background=True, on_hashed=lambda: gate.wait(5.0))
    try:
        d.add(0, [memoryview(b"a")])
        d.add(1, [memoryview(b"b")])  # queued behind the first step, whose callback blocks
        t0 = time.monotonic()
        assert d.wait(0.2) is False
        assert 0.15 <= time.monotonic() - t0 < 2.0
        with pytest.raises(TimeoutError, match="did not catch up"):
            d.hexdigest(0.05)
        gate.set()
        assert d.hexdigest(5.0) == hashlib.sha256(b"ab").hexdigest()
    finally:
        gate.set()
        d.close()


# --- whole downloads: producer -> consumer ------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "file"])
@pytest.mark.parametrize(("chunk", "size"), SIZE_CASES)
def test_seed_exchange_download(tmp_path: Path, kind: str, chunk: int, size: int) -> None:
    data = payload(size)
    obj: Any
    if kind == "file":
        obj = tmp_path / "obj.bin"
        obj.write_bytes(data)
    else:
        obj = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind](data)
    p = ObjectProducer(chunk_size=chunk)
    c = BytesConsumer()
    replies = seed_download(p, "R1", obj, c)
    assert c.result == data and c.outcome.ok is True
    assert replies == max(1, math.ceil(size / chunk))  # one chunk per round trip
    p.release("R1", obj)


@pytest.mark.parametrize("length", [1, 3, CHUNK, 100])
@pytest.mark.parametrize(("chunk", "size"), SIZE_CASES)
def test_windowed_download_in_shuffled_order(chunk: int, size: int, length: int) -> None:
    data = payload(size, seed=1)
    p = ObjectProducer(chunk_size=chunk)
    c = BytesConsumer()
    desc, final = windowed_download(p, "R1", data, c, length, random.Random(size * 31 + length))
    assert final == (ProduceRC.EOF, None, {})
    assert c.result == data and desc["size"] == size


def test_windowed_download_from_a_multi_piece_source() -> None:
    data = payload(5 * CHUNK + 4, seed=2)
    p = TrackedProducer()
    c = BytesConsumer()
    desc, final = windowed_download(p, "R1", data, c, CHUNK, random.Random(5))
    assert final[0] == ProduceRC.EOF and c.result == data and desc["meta"] == {"kind": "tracked"}


@PROPERTY
@given(
    size=st.integers(0, 700),
    chunk=st.integers(1, 80),
    length=st.integers(1, 120),
    seed=st.integers(0, 2**32 - 1),
)
def test_windowed_download_property(size: int, chunk: int, length: int, seed: int) -> None:
    data = payload(size, seed=seed % 97)
    p = ObjectProducer(chunk_size=chunk)
    c = BytesConsumer()
    _, final = windowed_download(p, "R1", bytearray(data), c, length, random.Random(seed))
    assert final[0] == ProduceRC.EOF and c.result == data


def test_windowed_download_that_got_wrong_bytes_reports_failure_to_the_owner() -> None:
    data = payload(4 * CHUNK)

    class Corrupting(ObjectProducer):
        def produce(self, *a: Any) -> tuple[str, Any, dict]:
            rc, chunk, state = super().produce(*a)
            if rc == ProduceRC.OK and (a[2] or {}).get("offset") == 2 * CHUNK:
                chunk = b"\0" * len(bytes(chunk))  # same length, wrong bytes
            return rc, chunk, state

    c = BytesConsumer()
    _, final = windowed_download(
        Corrupting(chunk_size=CHUNK), "R1", data, c, CHUNK, random.Random()
    )
    assert final == (ProduceRC.ERROR, "digest mismatch", {})
    assert c.result is None


# --- SizedConsumer in the seed's exchange -------------------------------------------------


def test_consume_checks_the_digest_when_the_last_byte_arrives() -> None:
    data = payload(3 * CHUNK + 1)
    p = ObjectProducer(chunk_size=CHUNK)
    c = BytesConsumer()
    _, chunk, desc = p.produce("R1", data, None, SITE)
    state = c.consume("R1", desc, chunk)
    assert state == {"offset": CHUNK}
    state = c.consume("R1", {"offset": 2 * CHUNK}, bytes(CHUNK))  # corrupted in transit
    assert state == {"offset": 2 * CHUNK}  # not the last byte yet: no verdict
    state = c.consume("R1", {"offset": 3 * CHUNK}, data[2 * CHUNK : 3 * CHUNK])
    with pytest.raises(ValueError, match="digest mismatch") as info:
        c.consume("R1", {"offset": 3 * CHUNK + 1}, data[3 * CHUNK :])
    assert desc["digest"] in str(info.value)


def test_consume_with_a_forged_description_digest_fails() -> None:
    data = payload(10)
    p = ObjectProducer(chunk_size=CHUNK)
    _, chunk, desc = p.produce("R1", data, None, SITE)
    desc["digest"] = hashlib.sha256(b"something else").hexdigest()
    c = BytesConsumer()
    c.consume("R1", desc, chunk)
    with pytest.raises(ValueError, match="digest mismatch"):
        c.consume("R1", {"offset": 10}, p.produce("R1", data, {"offset": CHUNK}, SITE)[1])


def test_consume_of_an_empty_object_verifies_at_once() -> None:
    c = BytesConsumer()
    desc = {"offset": 0, "size": 0, "chunk": 7, "algo": "sha256", "meta": None}
    with pytest.raises(ValueError, match="digest mismatch"):
        c.consume("R1", {**desc, "digest": "00"}, b"")
    assert c.consume("R1", {**desc, "digest": hashlib.sha256().hexdigest()}, b"") == {"offset": 0}


def test_consume_needs_the_description_first() -> None:
    with pytest.raises(InvalidStateError, match="did not describe"):
        BytesConsumer().consume("R1", {"offset": 7}, b"abcdefg")


def test_a_consumer_can_be_used_for_a_second_download() -> None:
    p = ObjectProducer(chunk_size=CHUNK)
    c = BytesConsumer()
    first, second = payload(20, seed=3), payload(9, seed=4)
    seed_download(p, "R1", first, c)
    assert c.result == first
    seed_download(p, "R2", second, c)
    assert c.result == second


# --- as_pieces ----------------------------------------------------------------------------


def test_as_pieces_of_nothing_one_or_several_buffers() -> None:
    assert as_pieces(None) == []
    (one,) = as_pieces(b"abc")
    assert bytes(one) == b"abc"
    several = as_pieces([b"ab", bytearray(b"cd"), memoryview(b"ef")])
    assert [bytes(p) for p in several] == [b"ab", b"cd", b"ef"]
    assert [bytes(p) for p in as_pieces((b"x", b""))] == [b"x", b""]


def test_as_pieces_flattens_typed_buffers_without_copying() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for p in [*as_pieces(arr), *as_pieces([arr, array.array("h", [1, 2])])]:
        assert p.format == "B" and p.ndim == 1
    (flat,) = as_pieces(arr)
    assert flat.nbytes == arr.nbytes and bytes(flat) == arr.tobytes()
    buf = bytearray(b"abc")
    (view,) = as_pieces(buf)
    buf[0] = ord("z")
    assert bytes(view) == b"zbc"
    view.release()
