"""Dicts of arrays, tensors and plain values: packed into a byte stream, rebuilt on the site.

The owner encodes the dict with the wire codec (:func:`objdl.wire.encode_lazily`):
plain values go into a msgpack body, and every array, tensor or bytes value of at
least ``INLINE_LIMIT`` bytes stays where it is, referenced by a view. The stream is a
small table of frame lengths followed by the frames, read at any offset as a list of
views, so no item has a size limit and nothing large is copied on the owner. A
tensor whose memory cannot be shared (on a GPU, not contiguous) is copied to the CPU
range by range as it is read (:class:`objdl._tensors.TensorFrame`), so the owner
never holds more than the chunks being served (and the digest's one chunk).

The site receives the stream into one bytearray it owns and decodes it in place:
arrays and tensors come back with their dtype and shape as *writable* views of that
one buffer, without another copy. torch is imported only when a tensor arrives.

Stream layout: ``u32 count``, ``count`` x ``u64 length`` (big-endian), then the frames.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from objdl import _tensors, wire
from objdl.cell import CellLike
from objdl.downloader import DEFAULT_CHUNK_SIZE, SizedSource, new_hash
from objdl.errors import WireError
from objdl.message import Message
from objdl.objects._bytes import BytesConsumer
from objdl.objects._common import DEFAULT_MAX_MEMORY_SIZE, DEFAULT_REQUEST_TIMEOUT, run_download

__all__ = ["DictConsumer", "DictSource", "download_dict"]

INLINE_LIMIT = 4096
_COUNT = struct.Struct(">I")
_LEN = struct.Struct(">Q")


class DictSource(SizedSource):
    """A dict with str keys, seen as one stream of bytes made of views."""

    def __init__(self, obj: dict) -> None:
        if not isinstance(obj, dict):
            raise TypeError(f"expected a dict, got {type(obj).__name__}")
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"dict keys must be str; found {type(bad[0]).__name__} key {bad[0]!r}")
        frames = [
            f if isinstance(f, _tensors.TensorFrame) else memoryview(f).cast("B")
            for f in wire.encode_lazily(Message(payload=obj), INLINE_LIMIT)
        ]
        table = _COUNT.pack(len(frames)) + b"".join(_LEN.pack(f.nbytes) for f in frames)
        self._segments: list[memoryview | _tensors.TensorFrame] = [memoryview(table), *frames]
        self._starts = []
        pos = 0
        for seg in self._segments:
            self._starts.append(pos)
            pos += seg.nbytes
        self.size = pos

    def read(self, offset: int, length: int) -> list[memoryview]:
        out: list[memoryview] = []
        end = offset + length
        for start, seg in zip(self._starts, self._segments, strict=True):
            seg_end = start + seg.nbytes
            if seg_end <= offset:
                continue
            if start >= end:
                break
            lo, hi = max(0, offset - start), min(seg.nbytes, end - start)
            out.append(seg.read(lo, hi) if isinstance(seg, _tensors.TensorFrame) else seg[lo:hi])
        return out

    def digest(self, algo: str) -> str:
        h = new_hash(algo)
        for seg in self._segments:
            if isinstance(seg, _tensors.TensorFrame):  # a chunk at a time, as it is served
                for pos in range(0, seg.nbytes, DEFAULT_CHUNK_SIZE):
                    h.update(seg.read(pos, pos + DEFAULT_CHUNK_SIZE))
            else:
                h.update(seg)
        return h.hexdigest()


def unpack_stream(buffer: bytearray) -> dict:
    """Rebuild the dict from a complete stream.

    Large arrays, tensors and bytes values come back as writable views of `buffer`
    (memoryviews for bytes), which they keep alive; smaller ones are their own.
    """
    view = memoryview(buffer)
    try:
        (count,) = _COUNT.unpack_from(view, 0)
    except struct.error as exc:
        raise WireError(f"dict stream table is truncated: {exc}") from exc
    # Every frame after the headers and the body is a buffer of at least INLINE_LIMIT
    # bytes (smaller ones travel in the body), so the stream's size bounds the count:
    # checked before anything is built, as each frame costs far more memory than its
    # 8 bytes of table (a stream of empty frames would otherwise cost ~50 times itself).
    most = 2 + len(buffer) // INLINE_LIMIT
    if not 2 <= count <= most:
        raise WireError(
            f"dict stream says it holds {count} frames; a stream of {len(buffer)} bytes "
            f"holds 2 to {most} (headers, body, and buffers of {INLINE_LIMIT} bytes or more)"
        )
    pos = _COUNT.size
    try:
        lengths = struct.unpack_from(f">{count}Q", view, pos)
    except struct.error as exc:
        raise WireError(f"dict stream table is truncated: {exc}") from exc
    pos += count * _LEN.size
    if pos + sum(lengths) != len(buffer):
        raise WireError("dict stream lengths do not add up to its size")
    frames = []
    for n in lengths:
        frames.append(view[pos : pos + n])
        pos += n
    payload = wire.decode(frames, writable=True).payload
    if not isinstance(payload, dict):
        raise WireError(f"dict stream holds a {type(payload).__name__}, not a dict")
    return payload


class DictConsumer(BytesConsumer):
    """Receives the stream into one bytearray (grown as it arrives) and rebuilds the dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dict: dict | None = None

    def download_completed(self, ref_id: str) -> None:
        try:
            self.dict = unpack_stream(self.buffer)
        except WireError as exc:
            self.download_failed(ref_id, f"the received dict does not decode: {exc}")
            return
        super().download_completed(ref_id)


def download_dict(
    cell: CellLike,
    from_fqcn: str,
    ref_id: str,
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_size: int | None = DEFAULT_MAX_MEMORY_SIZE,
    map_location: Any = None,
    **kwargs: Any,
) -> dict:
    """Download a dict offered with :func:`offer_dict`; return it.

    numpy arrays come back as numpy arrays and torch tensors as ``torch.Tensor``s,
    with their dtype and shape (a tensor from a GPU arrives on the CPU), nested as
    they were (tuples as lists). Large ones are writable views of the one buffer the
    stream was received into, so ``arr += 1`` or ``t.add_(1)`` changes them in
    place, without a copy; ``model.load_state_dict(result)`` works. A dict holding
    tensors needs torch on the site: without it the download fails with a
    DownloadError whose reason says so.

    Args:
        map_location: where tensors go on arrival, as for ``torch.load``: None (stay
            on the CPU), a device (``"cuda:0"``, ``torch.device``), a dict mapping
            ``"cpu"`` to a device, or a callable ``fn(tensor, "cpu")`` returning the
            tensor to use (None: keep it). Moving off the CPU copies each tensor.
        max_size: the largest packed dict accepted (default
            :data:`DEFAULT_MAX_MEMORY_SIZE`, 8 GiB; None: no limit), as for
            :func:`download_bytes`.
        kwargs: go to :func:`download_object`.

    Raises:
        DownloadError: the download failed; its ``reason`` says why.
        TypeError: `map_location` is none of the kinds above.
    """
    move = _mover(map_location)
    consumer = DictConsumer()
    kwargs["max_size"] = max_size
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    assert consumer.dict is not None
    return consumer.dict if move is None else _move_tensors(consumer.dict, move)


def _mover(map_location: Any) -> Callable[[Any], Any] | None:
    """What to do with each tensor that arrived, per `map_location` (see download_dict)."""
    if map_location is None:
        return None
    if isinstance(map_location, dict):
        target = map_location.get("cpu")
        return None if target is None else _mover(target)
    torch = _tensors.torch_if_loaded()
    if isinstance(map_location, str) or (
        torch is not None and isinstance(map_location, torch.device)
    ):
        return lambda t: t.to(map_location)
    if callable(map_location):

        def call(t: Any) -> Any:
            moved = map_location(t, "cpu")
            return t if moved is None else moved

        return call
    raise TypeError(
        "map_location must be None, a device (str or torch.device), a dict or a callable, "
        f"not {type(map_location).__name__}"
    )


def _move_tensors(obj: Any, move: Callable[[Any], Any]) -> Any:
    """`obj` with every tensor in it replaced by ``move(tensor)``, in place."""
    torch = _tensors.torch_if_loaded()
    if torch is None:  # nothing decoded a tensor
        return obj
    if isinstance(obj, torch.Tensor):
        return move(obj)
    if type(obj) is dict:
        for key, value in obj.items():
            obj[key] = _move_tensors(value, move)
    elif type(obj) is list:
        obj[:] = [_move_tensors(value, move) for value in obj]
    return obj
