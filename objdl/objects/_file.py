"""Files: served by ``pread`` at any offset, received into a temporary file renamed at the end.

The owner reads with ``os.pread`` rather than ``mmap``: a file truncated while it is
mapped kills the reading process with SIGBUS, while ``pread`` just returns short,
which is reported as a failed download. Every read checks the file's size, so a file
that changes size while being served fails with a clear reason instead of sending
mixed data; a same-size change is caught by the site's digest check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from objdl.cell import Cell
from objdl.downloader import SizedConsumer, SizedSource
from objdl.objects._common import DEFAULT_REQUEST_TIMEOUT, Outcome, run_download

__all__ = ["FileConsumer", "FileSource", "download_file"]

PART_SUFFIX = ".objdl-part"


class FileSource(SizedSource):
    """A regular file, opened once and read at offsets by every site that asks."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a regular file")
        self.size = st.st_size
        self.meta = {"name": self.path.name}

    def read(self, offset: int, length: int) -> bytes:
        now = os.fstat(self._fd).st_size
        if now != self.size:
            raise ValueError(
                f"file {self.path} changed size while being served "
                f"(was {self.size} bytes, now {now}); offer it again once it is complete"
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise ValueError(
                f"file {self.path} returned {len(data)} bytes at {offset}, not {length}"
            )
        return data

    def digest(self, algo: str) -> str:
        h = hashlib.new(algo)
        step = 8 * 1024 * 1024
        for off in range(0, self.size, step):
            h.update(self.read(off, min(step, self.size - off)))
        return h.hexdigest()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class FileConsumer(SizedConsumer):
    """Writes chunks at their offsets into ``.NAME.<random>.objdl-part`` beside `dest`.

    The temporary file becomes `dest` (atomically, by rename) only once every byte
    has arrived and the digest matched; on any failure it is removed.

    Args:
        dest: where the file goes; its folder must exist.
        fsync: flush the data to disk before the rename (slower, survives power loss).
    """

    def __init__(self, dest: str | os.PathLike[str], fsync: bool = False) -> None:
        super().__init__()
        self.dest = Path(dest)
        self.fsync = fsync
        self.part: Path | None = None
        self._fd = -1
        self.outcome = Outcome()

    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        if self.dest.is_dir():
            raise IsADirectoryError(f"destination {self.dest} is a directory; give a file path")
        self.part = self.dest.with_name(f".{self.dest.name}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")
        self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(self._fd, size)

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        for p in pieces:
            done = 0
            while done < p.nbytes:
                done += os.pwrite(self._fd, p[done:], offset + done)
            offset += p.nbytes

    def download_completed(self, ref_id: str) -> None:
        try:
            if self._fd < 0:  # zero-byte object ended before begin? cannot happen, but be safe
                raise RuntimeError("download completed without any data")
            if self.fsync:
                os.fsync(self._fd)
            self._close()
            assert self.part is not None
            os.replace(self.part, self.dest)
            self.part = None
            self.outcome.ok = True
        except Exception as exc:
            self.download_failed(ref_id, f"could not move the file into place: {exc}")

    def download_failed(self, ref_id: str, reason: str) -> None:
        self._close()
        if self.part is not None:
            with contextlib.suppress(FileNotFoundError):
                self.part.unlink()
            self.part = None
        self.outcome.ok = False
        self.outcome.reason = reason

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def download_file(
    cell: Cell,
    from_fqcn: str,
    ref_id: str,
    dest: str | os.PathLike[str],
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    fsync: bool = False,
    **kwargs: Any,
) -> Path:
    """Download a file offered with :func:`offer_file` to `dest`; return its path.

    `kwargs` go to :func:`download_object` (window, chunk_size, tries, abort_signal...).

    Raises:
        DownloadError: the download failed (nothing is left at `dest` or beside it).
        FileNotFoundError / NotADirectoryError: `dest`'s folder does not exist.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"the folder of {dest} does not exist; create it first")
    consumer = FileConsumer(dest, fsync=fsync)
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    return dest
