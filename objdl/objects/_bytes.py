"""Bytes-like objects: served as slices of the owner's buffer, received into one bytearray."""

from __future__ import annotations

from typing import Any

from objdl.cell import CellLike
from objdl.downloader import SizedConsumer, SizedSource, new_hash
from objdl.objects._common import (
    DEFAULT_MAX_MEMORY_SIZE,
    DEFAULT_REQUEST_TIMEOUT,
    Outcome,
    run_download,
)

__all__ = ["BytesConsumer", "BytesSource", "download_bytes"]


class BytesSource(SizedSource):
    """A bytes, bytearray or memoryview, read as zero-copy slices."""

    def __init__(self, obj: Any) -> None:
        view = memoryview(obj)
        if not view.c_contiguous:
            raise ValueError("a bytes-like object to offer must be contiguous")
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.size = self._view.nbytes

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def digest(self, algo: str) -> str:
        h = new_hash(algo)
        h.update(self._view)
        return h.hexdigest()

    def close(self) -> None:
        self._view.release()


class BytesConsumer(SizedConsumer):
    """Receives into one bytearray; `result` holds it once complete.

    The buffer grows as chunks arrive, never to the size the owner merely claims:
    a site holds what it received (plus at most two windows of chunks that came
    early, the site's span), so an owner that claims gigabytes and sends little costs it little.
    """

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.size = 0
        self.result: bytearray | None = None
        self.outcome = Outcome()

    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        self.buffer = bytearray()
        self.size = size

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        end = offset + sum(p.nbytes for p in pieces)
        if offset < 0 or end > self.size:
            raise ValueError(f"chunk [{offset}, {end}) lies outside the object (size {self.size})")
        buf = self.buffer
        if offset > len(buf):  # a chunk came before those ahead of it (the window bounds the gap)
            buf.extend(bytes(offset - len(buf)))
        for p in pieces:
            buf[offset : offset + p.nbytes] = p  # grows the buffer at its end
            offset += p.nbytes

    def download_completed(self, ref_id: str) -> None:
        if len(self.buffer) != self.size:
            self.download_failed(
                ref_id, f"received {len(self.buffer)} bytes of an object of {self.size}"
            )
            return
        self.result = self.buffer
        self.outcome.ok = True

    def download_failed(self, ref_id: str, reason: str) -> None:
        self.buffer = bytearray()
        self.outcome.ok = False
        self.outcome.reason = reason


def download_bytes(
    cell: CellLike,
    from_fqcn: str,
    ref_id: str,
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_size: int | None = DEFAULT_MAX_MEMORY_SIZE,
    **kwargs: Any,
) -> bytearray:
    """Download a bytes object offered with :func:`offer_bytes`; return it.

    `max_size` (default :data:`DEFAULT_MAX_MEMORY_SIZE`, 8 GiB; None: no limit) is
    the largest object accepted: a larger one fails as soon as the owner describes
    it, before any more is asked for. `kwargs` go to :func:`download_object`
    (window, chunk_size, tries, overall_timeout, abort_signal...).

    Raises:
        DownloadError: the download failed; its ``reason`` says why.
    """
    consumer = BytesConsumer()
    kwargs["max_size"] = max_size
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    assert consumer.result is not None
    return consumer.result
