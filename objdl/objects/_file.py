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
import json
import os
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from objdl.cell import Cell
from objdl.downloader import SizedConsumer, SizedSource, new_hash
from objdl.objects._buffers import BufferPool
from objdl.objects._common import DEFAULT_REQUEST_TIMEOUT, Outcome, run_download

__all__ = ["FileConsumer", "FileSource", "download_file"]

PART_SUFFIX = ".objdl-part"
STATE_SUFFIX = ".objdl-state"
SAVE_INTERVAL = 0.5  # seconds between records of a resumable download's progress

# How long serving a chunk waits for a pooled buffer when all are on their way to
# the socket, before it reads into a one-off buffer instead.
POOL_WAIT = 0.5
_pool = BufferPool()
_pool_lock = threading.Lock()
_serving = 0  # FileSources open; the pool is cleared when the last one closes


class FileSource(SizedSource):
    """A regular file, opened once and read at offsets by every site that asks.

    Chunks are read into buffers from a pool shared by every file served (see
    :class:`~objdl.objects._buffers.BufferPool`), released when the last file
    being served is closed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a regular file")
        self.size = st.st_size
        self.meta = {"name": self.path.name}
        global _serving
        with _pool_lock:
            _serving += 1

    def _check_size(self) -> None:
        now = os.fstat(self._fd).st_size
        if now != self.size:
            raise ValueError(
                f"file {self.path} changed size while being served "
                f"(was {self.size} bytes, now {now}); offer it again once it is complete"
            )

    def _short(self, got: int, offset: int, length: int) -> ValueError:
        return ValueError(f"file {self.path} returned {got} bytes at {offset}, not {length}")

    def read(self, offset: int, length: int) -> bytes | memoryview:
        self._check_size()
        view = _pool.take(length, wait=POOL_WAIT)
        if view is None:
            data = os.pread(self._fd, length, offset)
            if len(data) != length:
                raise self._short(len(data), offset, length)
            return data
        got = os.preadv(self._fd, [view], offset)
        if got != length:
            raise self._short(got, offset, length)
        return view

    def digest(self, algo: str) -> str:
        h = new_hash(algo)
        step = 8 * 1024 * 1024
        for off in range(0, self.size, step):
            self._check_size()
            n = min(step, self.size - off)
            data = os.pread(self._fd, n, off)
            if len(data) != n:
                raise self._short(len(data), off, n)
            h.update(data)
        return h.hexdigest()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            global _serving
            with _pool_lock:
                _serving -= 1
                if _serving == 0:
                    _pool.clear()  # nothing served any more: give the memory back


class FileConsumer(SizedConsumer):
    """Writes chunks at their offsets into ``.NAME.<tag>.objdl-part`` beside `dest`.

    The temporary file becomes `dest` (atomically, by rename) only once every byte
    has arrived and the digest matched; on any failure it is removed.

    With `resume`, the temporary file's name comes from the ref id and a small
    ``.objdl-state`` file beside it records how far the data is complete and
    verified. A download that fails for any reason but a digest mismatch keeps both,
    and a later download of the same ref (in this or a new process) continues from
    there; all bytes, old and new, are still checked against the full digest.

    Args:
        dest: where the file goes; its folder must exist.
        fsync: flush the data to disk before the rename (slower, survives power loss).
        resume: keep and reuse partial downloads, as above.
    """

    def __init__(
        self, dest: str | os.PathLike[str], fsync: bool = False, resume: bool = False
    ) -> None:
        super().__init__()
        self.dest = Path(dest)
        self.fsync = fsync
        self.resume = resume
        self.part: Path | None = None
        self.state_file: Path | None = None
        self._fd = -1
        self._desc: dict[str, Any] = {}
        self._ref_id = ""
        self._saved_at = 0.0
        self.outcome = Outcome()

    def _names(self, ref_id: str) -> tuple[Path, Path]:
        if self.resume:
            tag = hashlib.sha256(ref_id.encode()).hexdigest()[:16]
        else:
            tag = uuid.uuid4().hex[:12]
        part = self.dest.with_name(f".{self.dest.name}.{tag}{PART_SUFFIX}")
        return part, part.with_name(part.name + STATE_SUFFIX)

    def resume_from(self, ref_id: str, desc: dict[str, Any]) -> int:
        self._desc = {k: desc.get(k) for k in ("size", "algo", "digest")}
        self._ref_id = ref_id
        if not self.resume:
            return 0
        part, state_file = self._names(ref_id)
        try:
            saved = json.loads(state_file.read_text())
            upto = int(saved["verified"])
            same = saved.get("ref_id") == ref_id and all(
                saved.get(k) == v for k, v in self._desc.items()
            )
            if not same or not 0 < upto <= desc["size"] or part.stat().st_size != desc["size"]:
                return 0
            self._fd = os.open(part, os.O_RDWR)
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # nothing usable kept: start afresh
        self.part, self.state_file = part, state_file
        return upto

    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        if self.dest.is_dir():
            raise IsADirectoryError(f"destination {self.dest} is a directory; give a file path")
        self.part, self.state_file = self._names(ref_id)
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if self.resume else os.O_EXCL)
        self._fd = os.open(self.part, flags, 0o644)
        os.ftruncate(self._fd, size)
        if self.resume:
            self._save(ref_id, 0)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        for p in pieces:
            done = 0
            while done < p.nbytes:
                done += os.pwrite(self._fd, p[done:], offset + done)
            offset += p.nbytes

    def verified(self, upto: int) -> None:
        if self.resume and self.state_file is not None:
            now = time.monotonic()
            if now >= self._saved_at + SAVE_INTERVAL:
                self._saved_at = now
                self._save(self._ref_id, upto)

    def _save(self, ref_id: str, upto: int) -> None:
        # Written only after the bytes it vouches for were written, and replaced
        # atomically, so a crash leaves either the old or the new record.
        assert self.state_file is not None
        record = {"ref_id": ref_id, "verified": upto, **self._desc}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.state_file)

    def download_completed(self, ref_id: str) -> None:
        try:
            if self._fd < 0:
                raise RuntimeError("download completed without any data")
            if self.fsync:
                os.fsync(self._fd)
            self._close()
            assert self.part is not None
            os.replace(self.part, self.dest)
            self.part = None
            self._remove_state()
            self.outcome.ok = True
        except Exception as exc:
            self.download_failed(ref_id, f"could not move the file into place: {exc}")

    def download_failed(self, ref_id: str, reason: str) -> None:
        self._close()
        keep = self.resume and "digest mismatch" not in reason
        if self.part is not None and not keep:
            with contextlib.suppress(FileNotFoundError):
                self.part.unlink()
            self.part = None
            self._remove_state()
        self.outcome.ok = False
        self.outcome.reason = reason

    def _remove_state(self) -> None:
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            self.state_file = None

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
    resume: bool = False,
    **kwargs: Any,
) -> Path:
    """Download a file offered with :func:`offer_file` to `dest`; return its path.

    `kwargs` go to :func:`download_object` (window, chunk_size, tries, abort_signal...).
    With `resume`, a failed download keeps what it has (hidden beside `dest`) and a
    later call for the same ref continues from there (see :class:`FileConsumer`).

    Raises:
        DownloadError: the download failed (without `resume`, nothing is left at
            `dest` or beside it).
        FileNotFoundError: `dest`'s folder does not exist.
        IsADirectoryError / PermissionError: `dest` is a folder, or its folder is not
            writable.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"the folder of {dest} does not exist; create it first")
    if dest.is_dir():
        raise IsADirectoryError(f"destination {dest} is a directory; give a file path")
    try:  # find out now, not after the owner has been asked for data
        with tempfile.TemporaryFile(dir=dest.parent):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write in {dest.parent}: {exc.strerror}") from exc
    consumer = FileConsumer(dest, fsync=fsync, resume=resume)
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    return dest
