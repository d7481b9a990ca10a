"""Socket-free tests of dicts as byte streams: DictSource (the owner's view of a dict as
one stream of views), unpack_stream and DictConsumer (the site rebuilding it)."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from objdl import wire
from objdl.downloader import DEFAULT_DIGEST, DIGESTS
from objdl.errors import WireError
from objdl.message import Message
from objdl.objects import DictConsumer, DictSource, ObjectProducer
from objdl.objects._dict import INLINE_LIMIT, unpack_stream
from tests.conftest import reference_digest
from tests.test_sized import SITE, seed_download, windowed_download

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def stream_of(d: dict) -> bytes:
    """The documented layout, built independently of DictSource: ``u32 count``,
    ``count`` x ``u64 length`` (big-endian), then the frames of ``wire.encode``."""
    frames = [bytes(f) for f in wire.encode(Message(payload=d), INLINE_LIMIT)]
    table = struct.pack(">I", len(frames)) + b"".join(struct.pack(">Q", len(f)) for f in frames)
    return table + b"".join(frames)


def read_all(src: DictSource, offset: int, length: int) -> bytes:
    pieces = src.read(offset, length)
    assert all(isinstance(p, memoryview) for p in pieces)
    return b"".join(bytes(p) for p in pieces)


def same(got: Any, want: Any) -> None:
    """`got` (decoded) equals `want` (sent), allowing the codec's documented changes:
    tuples come back as lists and bytes-likes as bytes or memoryviews; arrays are
    compared by dtype, shape and raw bytes (so NaNs compare equal)."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, (bytes, bytearray, memoryview)):
        assert isinstance(got, (bytes, memoryview)) and bytes(got) == bytes(want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            same(g, w)
    else:
        assert type(got) is type(want) and got == want


def rng_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    raw = random.Random(seed).randbytes(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def sample_dict() -> dict[str, Any]:
    big = rng_array("<f4", (40, 50), seed=1)  # 8000 bytes: its own frame
    return {
        "weights": big,
        "bias": rng_array("<f8", (7,), seed=2),  # small: inline
        "ids": rng_array(">i4", (3, 4, 5), seed=3),
        "mask": np.array([[True, False], [False, True]]),
        "counts": rng_array("<u2", (3000,), seed=4),
        "when": np.array(["2024-01-02T03:04:05", "NaT"], dtype="datetime64[ns]"),
        "names": np.array(["ab", "cde"], dtype="<U5"),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(3.5),
        "fortran": np.asfortranarray(rng_array("<i8", (30, 20), seed=5)),  # 4800 B, copied once
        "strided": rng_array("<f8", (50, 40), seed=6)[::2, ::3],
        "blob": bytes(range(256)) * 20,  # 5120 bytes: its own frame
        "small_blob": b"\x00\x01tiny",
        "config": {"lr": 0.01, "layers": [64, 32, (1, 2)], "name": "net", "on": True, "x": None},
        "epoch": 7,
        "big_int": 2**63,
    }


# --- the stream and its reads -------------------------------------------------------------


def test_stream_has_the_documented_layout() -> None:
    d = sample_dict()
    src = DictSource(d)
    want = stream_of(d)
    assert src.size == len(want)
    assert read_all(src, 0, src.size) == want
    for algo in DIGESTS:
        assert src.digest(algo) == reference_digest(algo, want)


def test_reads_across_every_segment_boundary() -> None:
    d = sample_dict()
    src = DictSource(d)
    want = stream_of(d)
    (count,) = struct.unpack_from(">I", want)
    lengths = struct.unpack_from(f">{count}Q", want, 4)
    bounds = [0, 4 + 8 * count]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    for b in bounds:
        for off in {max(0, b - 3), max(0, b - 1), b}:
            for length in (1, 2, 5, 7, 64, 10_000):
                assert read_all(src, off, length) == want[off : off + length], (off, length)


def test_reads_at_and_past_the_end_are_empty() -> None:
    src = DictSource({"a": 1})
    assert read_all(src, src.size, 10) == b""
    assert read_all(src, src.size + 5, 10) == b""
    assert read_all(src, 3, 0) == b""
    assert read_all(src, src.size - 2, 100) == stream_of({"a": 1})[-2:]


def test_big_values_are_served_from_their_own_memory() -> None:
    arr = rng_array("<f8", (100, 10), seed=9)  # 8000 bytes, contiguous
    blob = bytearray(b"b" * (INLINE_LIMIT + 1))
    src = DictSource({"arr": arr, "blob": blob, "small": np.arange(3)})
    pieces = src.read(0, src.size)
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), arr) for p in pieces)
    assert any(p.obj is blob for p in pieces if p.nbytes == len(blob))
    arr[0, 0] = 42.0  # documented: do not change what is offered; the change shows
    assert np.float64(42.0).tobytes() in read_all(src, 0, src.size)


def test_dict_source_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(TypeError, match="expected a dict"):
        DictSource([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keys must be str.*int key 3"):
        DictSource({"a": 1, 3: 2})
    with pytest.raises(TypeError, match=r"unsupported type.*\['bad'\]\[0\]"):
        DictSource({"bad": [object()]})
    with pytest.raises(TypeError, match="dtype"):
        DictSource({"obj": np.array([object()], dtype=object)})


def test_object_producer_opens_a_dict_as_a_dict_source() -> None:
    d = {"a": np.arange(5)}
    desc = ObjectProducer(chunk_size=7).prepare("R1", d)
    assert desc["size"] == len(stream_of(d))
    assert desc["digest"] == reference_digest(DEFAULT_DIGEST, stream_of(d))


# --- rebuilding the dict ------------------------------------------------------------------


def test_unpack_stream_rebuilds_the_dict_with_arrays_as_writable_views_of_the_buffer() -> None:
    d = sample_dict()
    buffer = bytearray(stream_of(d))
    out = unpack_stream(buffer)
    same(out, d)
    whole = np.frombuffer(buffer, np.uint8)
    for key in ("weights", "counts", "fortran"):  # >= INLINE_LIMIT: no copy on the site
        assert np.shares_memory(out[key], whole), key
    before = out["counts"].copy()
    out["counts"] += 1  # writable in place: the receive buffer is the site's own
    assert (out["counts"] == before + 1).all()
    assert np.shares_memory(out["counts"], whole)
    assert isinstance(out["blob"], memoryview) and isinstance(out["small_blob"], bytes)


def test_empty_dict_round_trips() -> None:
    src = DictSource({})
    assert unpack_stream(bytearray(read_all(src, 0, src.size))) == {}


@pytest.mark.parametrize("chunk", [7, 64])
def test_seed_exchange_download_of_a_dict(chunk: int) -> None:
    d = sample_dict()
    p = ObjectProducer(chunk_size=chunk)
    c = DictConsumer()
    seed_download(p, "R1", d, c)
    assert c.outcome.ok is True and c.dict is not None
    same(c.dict, d)
    p.release("R1", d)


@pytest.mark.parametrize(("chunk", "length"), [(7, 7), (7, 3), (64, 64), (64, 1000)])
def test_windowed_download_of_a_dict_in_shuffled_order(chunk: int, length: int) -> None:
    d = sample_dict()
    p = ObjectProducer(chunk_size=chunk)
    c = DictConsumer()
    _, final = windowed_download(p, "R1", d, c, length, random.Random(chunk + length))
    assert final[0] == "eof" and c.outcome.ok is True
    same(c.dict, d)


def test_dict_consumer_fails_on_a_stream_that_does_not_decode() -> None:
    c = DictConsumer()
    junk = b"\x00\x00\x00\x02" + b"\xff" * 20
    c.begin("R1", len(junk), None)
    c.write(0, [memoryview(junk)])
    c.download_completed("R1")
    assert c.outcome.ok is False and "does not decode" in c.outcome.reason
    assert c.dict is None and c.result is None


# --- junk is a WireError, never anything else ---------------------------------------------


def _table(*lengths: int, count: int | None = None) -> bytes:
    n = len(lengths) if count is None else count
    return struct.pack(">I", n) + b"".join(struct.pack(">Q", x) for x in lengths)


_HEADERS = msgpack.packb({}, use_bin_type=True)
_LIST_BODY = msgpack.packb([1, 2], use_bin_type=True)
_GOOD = stream_of({"a": b"x" * 10})
JUNK = {
    "empty": b"",
    "short-count": b"\x00\x00\x01",
    "missing-lengths": _table(count=2) + b"\x00" * 7,
    "no-frames": _table(),
    "one-frame": _table(1) + b"\x80",
    "lengths-too-long": _table(1, 5) + b"\x80" + b"\x80",
    "lengths-too-short": _table(1, 1) + b"\x80\x80\x80",
    "trailing-byte": _GOOD + b"\x00",
    "cut-short": _GOOD[:-1],
    "huge-count": struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64,
    "huge-length": _table(2**64 - 1, 1) + b"\x80",
    "junk-headers": _table(1, 1) + b"\xc1\x80",
    "junk-body": _table(1, 1) + b"\x80\xc1",
    "list-payload": _table(len(_HEADERS), len(_LIST_BODY)) + _HEADERS + _LIST_BODY,
    "none-payload": _table(1, 1) + b"\x80\xc0",
    "unused-buffer": _table(1, 1, 3) + b"\x80\x80abc",
}


@pytest.mark.parametrize("junk", JUNK.values(), ids=JUNK.keys())
def test_unpack_stream_of_junk_raises_wire_error(junk: bytes) -> None:
    with pytest.raises(WireError):
        unpack_stream(bytearray(junk))


def test_a_table_of_many_empty_frames_is_refused_before_it_costs_memory() -> None:
    """An owner's stream of 200,000 empty frames (1.6 MB, lengths adding up): each frame
    would be a memoryview of about 200 bytes, twice over in the decoder, so the site
    would hold some 50 times the stream. It is refused before anything is built."""
    import tracemalloc

    n = 200_000
    stream = bytearray(_table(*([0] * n)))  # the table alone: the lengths add up to its size
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="frames"):
            unpack_stream(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(stream) // 4, f"peak {peak} bytes for a {len(stream)}-byte stream"


def test_the_frame_bound_admits_every_buffer_of_the_inline_limit() -> None:
    """The bound is exact for the smallest buffers an owner sends out of band."""
    d = {f"k{i}": bytes([i]) * INLINE_LIMIT for i in range(50)}
    out = unpack_stream(bytearray(stream_of(d)))
    assert {k: bytes(v) for k, v in out.items()} == d


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_unpack_stream_of_random_bytes_raises_only_wire_error(junk: bytes) -> None:
    try:
        out = unpack_stream(bytearray(junk))
    except WireError:
        return
    assert isinstance(out, dict)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 10**6),
)
def test_unpack_stream_of_a_damaged_stream_raises_only_wire_error(
    edits: list[tuple[bool, int, int]], cut: int
) -> None:
    buffer = bytearray(stream_of(sample_dict()))
    for in_head, pos, value in edits:  # the table, headers and body are in the first bytes
        buffer[pos % (200 if in_head else len(buffer))] = value
    if cut % 3 == 0:
        del buffer[cut % len(buffer) :]
    try:
        out = unpack_stream(buffer)
    except WireError:
        return
    assert isinstance(out, dict)


# --- properties over random dicts ---------------------------------------------------------

_DTYPES = [
    "<f4",
    "<f8",
    ">f8",
    "<f2",
    "|i1",
    "<i8",
    ">i4",
    "<u2",
    "|b1",
    "<c8",
    "<M8[ns]",
    "<m8[s]",
]

_arrays = st.sampled_from(_DTYPES).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24)
    )
)
_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
_blobs = st.integers(0, 2 * INLINE_LIMIT).map(
    lambda n: bytes(range(256)) * (n // 256) + b"z" * (n % 256)
)
_dicts = st.dictionaries(st.text(max_size=8), _arrays | _plain | _blobs, max_size=6)


@PROPERTY
@given(d=_dicts, data=st.data())
def test_read_at_random_offsets_equals_slicing_the_stream(d: dict, data: st.DataObject) -> None:
    src = DictSource(d)
    want = stream_of(d)
    assert src.size == len(want)
    for _ in range(5):
        off = data.draw(st.integers(0, src.size))
        length = data.draw(st.integers(1, max(1, src.size)))
        assert read_all(src, off, length) == want[off : off + length]


@PROPERTY
@given(d=_dicts, chunk=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_random_dicts_download_in_any_order(d: dict, chunk: int, seed: int) -> None:
    p = ObjectProducer(chunk_size=chunk)
    c = DictConsumer()
    _, final = windowed_download(p, "R1", d, c, chunk, random.Random(seed), requester=SITE)
    assert final[0] == "eof" and c.outcome.ok is True
    same(c.dict, d)
