"""Bytes-like objects: served as slices of the owner's buffer, received into one bytearray."""

from __future__ import annotations

from typing import Any

from objdl.cell import Cell
from objdl.downloader import SizedConsumer, SizedSource, new_hash
from objdl.objects._common import DEFAULT_REQUEST_TIMEOUT, Outcome, run_download

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
    """Receives into one preallocated bytearray; `result` holds it once complete."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.result: bytearray | None = None
        self.outcome = Outcome()

    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        self.buffer = bytearray(size)

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        for p in pieces:
            self.buffer[offset : offset + p.nbytes] = p
            offset += p.nbytes

    def download_completed(self, ref_id: str) -> None:
        self.result = self.buffer
        self.outcome.ok = True

    def download_failed(self, ref_id: str, reason: str) -> None:
        self.buffer = bytearray()
        self.outcome.ok = False
        self.outcome.reason = reason


def download_bytes(
    cell: Cell,
    from_fqcn: str,
    ref_id: str,
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    **kwargs: Any,
) -> bytearray:
    """Download a bytes object offered with :func:`offer_bytes`; return it.

    `kwargs` go to :func:`download_object` (window, chunk_size, tries, abort_signal...).

    Raises:
        DownloadError: the download failed; its ``reason`` says why.
    """
    consumer = BytesConsumer()
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    assert consumer.result is not None
    return consumer.result
