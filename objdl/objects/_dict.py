"""Dicts of arrays and plain values: packed once into a byte stream, rebuilt on the site.

The owner encodes the dict with the wire codec (:func:`objdl.wire.encode`): plain
values go into a msgpack body, and every array or bytes value of at least
``INLINE_LIMIT`` bytes stays where it is, referenced by a view. The stream is a small
table of frame lengths followed by the frames, read at any offset as a list of
views, so no item has a size limit and nothing large is copied on the owner. The
site receives the stream into one bytearray and decodes it in place: arrays come
back with their dtype and shape as views of that one buffer, without another copy.

Stream layout: ``u32 count``, ``count`` x ``u64 length`` (big-endian), then the frames.
"""

from __future__ import annotations

import struct
from typing import Any

from objdl import wire
from objdl.cell import Cell
from objdl.downloader import SizedSource, new_hash
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
        frames = [memoryview(f).cast("B") for f in wire.encode(Message(payload=obj), INLINE_LIMIT)]
        table = _COUNT.pack(len(frames)) + b"".join(_LEN.pack(f.nbytes) for f in frames)
        self._segments = [memoryview(table), *frames]
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
            out.append(seg[max(0, offset - start) : min(seg.nbytes, end - start)])
        return out

    def digest(self, algo: str) -> str:
        h = new_hash(algo)
        for seg in self._segments:
            h.update(seg)
        return h.hexdigest()


def unpack_stream(buffer: bytearray) -> dict:
    """Rebuild the dict from a complete stream (arrays are views of `buffer`)."""
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
    payload = wire.decode(frames).payload
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
    cell: Cell,
    from_fqcn: str,
    ref_id: str,
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_size: int | None = DEFAULT_MAX_MEMORY_SIZE,
    **kwargs: Any,
) -> dict:
    """Download a dict offered with :func:`offer_dict`; return it.

    Arrays come back with their dtype and shape, as read-only views of one buffer.
    `max_size` (default :data:`DEFAULT_MAX_MEMORY_SIZE`, 8 GiB; None: no limit) is
    the largest packed dict accepted, as for :func:`download_bytes`; `kwargs` go to
    :func:`download_object`.

    Raises:
        DownloadError: the download failed; its ``reason`` says why.
    """
    consumer = DictConsumer()
    kwargs["max_size"] = max_size
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    assert consumer.dict is not None
    return consumer.dict
