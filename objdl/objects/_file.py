"""Files: served by ``pread`` at any offset, received into a temporary file renamed at the end.

The owner reads with ``os.pread`` rather than ``mmap``: a file truncated while it is
mapped kills the reading process with SIGBUS, while ``pread`` just returns short,
which is reported as a failed download. Every read checks the file's size, so a file
that changes size while being served fails with a clear reason instead of sending
mixed data; a same-size change is caught by the site's digest check.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from objdl.cell import CellLike
from objdl.downloader import SizedConsumer, SizedSource, new_hash
from objdl.objects import _folder
from objdl.objects._buffers import BufferPool
from objdl.objects._common import DEFAULT_REQUEST_TIMEOUT, Outcome, run_download

__all__ = [
    "WRITE_BEHIND",
    "WRITE_PIECE",
    "FileConsumer",
    "FileSource",
    "check_destination",
    "download_file",
    "write_pieces",
]

PART_SUFFIX = ".objdl-part"
STATE_SUFFIX = ".objdl-state"
TMP_SUFFIX = ".objdl-tmp"
# The longest ending after ".{name}.{tag}": a temporary's ".{8 hex}.objdl-tmp" (the
# part's and state's suffixes are shorter), so every derived name fits once this does.
TMP_EXTRA = max(len(PART_SUFFIX), len(STATE_SUFFIX), 1 + 8 + len(TMP_SUFFIX))
SAVE_INTERVAL = 0.5  # seconds between records of a resumable download's progress
# The most bytes one ``pwrite`` puts into the page cache. Recent Linux kernels give
# ext4 and XFS files page-cache folios as large as each write, up to 2 MiB, and a
# 2 MiB folio takes a free 2 MiB block of memory. A VM that reports free memory to
# its host (virtio-balloon free page reporting) hands such blocks back about 2 s
# after they are freed, and each costs host page faults when it is next written:
# there, a 2 MiB chunk written in one call cost 2.6-3.4 ms of CPU per MiB, pieces of
# 512 KiB or less 0.25-0.3 ms, as their smaller folios come from memory the host
# still backs (docs/PERFORMANCE.md, "the disk path"). A piece costs one system call,
# about a microsecond: nothing, on any machine.
WRITE_PIECE = 256 * 1024
# With ``cache=False``, how many bytes of the file at most wait in the page cache for
# the disk: each chunk's writeback starts as soon as it is written, and once this
# much more was written it is waited for and dropped from the cache. A download then
# reuses the same few MiB of memory instead of filling gigabytes of new page cache,
# which on a VM whose host takes freed memory back costs host page faults, about
# 2.4 ms of CPU per MiB (benchmarks/bench_file_write.py measures it). The file is then
# not in memory afterwards: whoever reads it next reads it from the disk (and there
# pays for the page cache instead). 32 MiB: some milliseconds of any SSD's writing.
WRITE_BEHIND = 32 * 1024 * 1024

# How long serving a chunk waits for a pooled buffer when all are on their way to
# the socket, before it reads into a one-off buffer instead.
POOL_WAIT = 0.5
_pool = BufferPool()
_pool_lock = threading.Lock()
_serving = 0  # FileSources open; the pool is cleared when the last one closes
log = logging.getLogger("objdl.objects")


class FileSource(SizedSource):
    """A regular file, opened once and read at offsets by every site that asks.

    Chunks are read into buffers from a pool shared by every file served (see
    :class:`~objdl.objects._buffers.BufferPool`), released when the last file
    being served is closed.

    `dir_fd` and `follow_symlinks` are as for :func:`os.open`/:func:`os.stat`: with
    `dir_fd`, a relative `path` is opened relative to that folder descriptor; with
    ``follow_symlinks=False`` a symlink at the last component of `path` is not
    followed (``O_NOFOLLOW``: the open fails with ``OSError(ELOOP)``). Together they let
    a caller that checked a name in a folder others can write open exactly that name,
    not whatever a link swapped in since points to. The file is opened non-blocking,
    so a FIFO swapped in cannot hang the open; anything but a regular file is refused
    by ``fstat`` on the descriptor opened.

    Raises:
        OSError: `path` cannot be opened (``ELOOP``: a symlink, with
            ``follow_symlinks=False``).
        ValueError: `path` is not a regular file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dir_fd: int | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        self.path = Path(path)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        self._fd = os.open(self.path, flags, dir_fd=dir_fd)
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

    With `resume`, the temporary file's name comes from `dest`'s name and the ref id
    (see :meth:`resume_paths`) and a small ``.objdl-state`` file beside it records how
    far the data is complete and verified. A download that fails for any reason but
    bad data (see :meth:`data_rejected`) keeps both, and a later download of the same
    ref to the same `dest` (in this or a new process) continues from there; all
    bytes, old and new, are still checked against the full digest.

    The folder may be shared with users we do not trust (see ``_folder``): every file
    is created with ``O_EXCL | O_NOFOLLOW`` relative to a descriptor of the folder
    opened once, a kept file is reused only if it is a regular file of ours with no
    other name, and `dest` itself must be absent or a regular file (a symlink, FIFO,
    device or directory there is refused, never replaced or written through). Names
    fit the file system's NAME_MAX whatever the length of `dest`'s name. Free space
    is checked as soon as the size is known.

    Args:
        dest: where the file goes; its folder must exist.
        fsync: flush the data (and the rename) to disk before reporting success
            (slower, survives power loss).
        resume: keep and reuse partial downloads, as above.
        cache: leave the file in the page cache (the kernel writes it out later);
            False: write it out while downloading and drop it from the cache behind
            (at most :data:`WRITE_BEHIND` bytes wait), for a file not read again
            soon: the download needs no more memory than that, and less CPU where
            new page-cache memory is costly (a VM), but a reader reads it from disk.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        fsync: bool = False,
        resume: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.dest = Path(dest)
        if self.dest.name in ("", ".", ".."):
            raise IsADirectoryError(f"destination {self.dest} is a directory; give a file path")
        self.fsync = fsync
        self.resume = resume
        self.cache = cache
        self._behind: _WriteBehind | None = None
        self._fd = -1
        self._dirfd = -1
        self._dir_id: tuple[int, int] = (0, 0)
        self._name_max = _folder.DEFAULT_NAME_MAX
        self._part_name = ""  # ours in the folder while set: removed on failure
        self._state_name = ""
        self._rejected = False
        self._desc: dict[str, Any] = {}
        self._ref_id = ""
        self._saved_at = 0.0
        self.outcome = Outcome()

    @property
    def part(self) -> Path | None:
        """The temporary file being written, while there is one."""
        return self.dest.parent / self._part_name if self._part_name else None

    @property
    def state_file(self) -> Path | None:
        """The progress record of a resumable download, while there is one."""
        return self.dest.parent / self._state_name if self._state_name else None

    def resume_paths(self, ref_id: str) -> tuple[Path, Path]:
        """The part and state files a resumable download of `ref_id` to `dest` keeps.

        The same in every process (so a restarted one finds them), different for
        every (dest, ref) pair, and short enough for the file system.
        """
        if self._dirfd >= 0:
            limit = self._name_max
        else:
            fd = _folder.open_folder(self.dest.parent)
            try:
                limit = _folder.name_max(fd)
            finally:
                os.close(fd)
        part, state = _kept_names(self.dest.name, _resume_tag(self.dest.name, ref_id), limit)
        return self.dest.parent / part, self.dest.parent / state

    def _open_folder(self) -> int:
        if self._dirfd < 0:
            self._dirfd = _folder.open_folder(self.dest.parent)
            st = os.fstat(self._dirfd)
            self._dir_id = (st.st_dev, st.st_ino)
            self._name_max = _folder.name_max(self._dirfd)
        return self._dirfd

    def _names(self, ref_id: str) -> tuple[str, str]:
        name = self.dest.name
        tag = _resume_tag(name, ref_id) if self.resume else secrets.token_hex(8)
        return _kept_names(name, tag, self._name_max)

    def _tmp_name(self, of: str) -> str:
        stem = of.rsplit(".", 1)[0]  # a kept name without its suffix fits with TMP_EXTRA
        return f"{stem}.{secrets.token_hex(4)}{TMP_SUFFIX}"

    def resume_from(self, ref_id: str, desc: dict[str, Any]) -> int:
        self._desc = {k: desc.get(k) for k in ("size", "algo", "digest")}
        self._ref_id = ref_id
        if not self.resume:
            return 0
        dirfd = self._open_folder()
        part, state = self._names(ref_id)
        upto = self._reopen(dirfd, part, state, desc.get("size"))
        if not upto:
            return 0
        self._part_name, self._state_name = part, state
        kept = os.fstat(self._fd).st_blocks * 512
        _folder.check_space(dirfd, max(0, desc["size"] - kept), self.dest.parent)
        return upto

    def _reopen(self, dirfd: int, part: str, state: str, size: Any) -> int:
        """Reopen a kept part file and return how far it is verified (0: nothing usable)."""
        try:
            fd = _folder.open_own(dirfd, state, os.O_RDONLY)
            try:
                saved = json.loads(_folder.read_small(fd))
            finally:
                os.close(fd)
            if not isinstance(saved, dict) or saved.get("ref_id") != self._ref_id:
                raise ValueError("the record is for another object")
            if any(saved.get(k) != v for k, v in self._desc.items()):
                raise ValueError("the object changed since")
            upto = saved.get("verified")
            if not isinstance(size, int) or type(upto) is not int or not 0 < upto <= size:
                raise ValueError(f"verified {upto!r} is outside the object")
            fd = _folder.open_own(dirfd, part, os.O_RDWR)
            if os.fstat(fd).st_size != size:
                os.close(fd)
                raise ValueError("the part file has the wrong size")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("download %s: not resuming from %s: %s", self._ref_id, part, exc)
            return 0  # start afresh: begin() replaces both names
        self._fd = fd
        return upto

    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        dirfd = self._open_folder()
        _folder.check_replaceable(dirfd, self.dest.name, self.dest)
        _folder.check_space(dirfd, size, self.dest.parent)
        part, state = self._names(ref_id)
        if self.resume:
            # Created afresh under a random name, then renamed over whatever is at
            # the known name (a planted link or file is replaced, never opened).
            tmp = self._tmp_name(part)
            fd = _folder.create(dirfd, tmp)
            try:
                os.ftruncate(fd, size)
                os.rename(tmp, part, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dirfd)
                raise
            self._fd, self._part_name, self._state_name = fd, part, state
            self._save(0)  # a stale record must not vouch for the new, empty part
        else:
            self._fd = _folder.create(dirfd, part)
            self._part_name = part
            os.ftruncate(self._fd, size)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, pieces: list[memoryview]) -> None:
        """Write `pieces` at `offset`, in calls of at most :data:`WRITE_PIECE` bytes."""
        start = offset
        for p in pieces:
            write_pieces(self._fd, p, offset)
            offset += p.nbytes
        if not self.cache and offset > start:
            if self._behind is None:
                self._behind = _WriteBehind(self._fd)
            self._behind.wrote(start, offset - start)

    def verified(self, upto: int) -> None:
        if self.resume and self._state_name:
            now = time.monotonic()
            if now >= self._saved_at + SAVE_INTERVAL:
                self._saved_at = now
                self._save(upto)

    def data_rejected(self, ref_id: str) -> None:
        """The bytes failed the digest check: the part is removed even with `resume`."""
        self._rejected = True

    def _save(self, upto: int) -> None:
        # Written only after the bytes it vouches for were written, and replaced
        # atomically, so a crash leaves either the old or the new record.
        record = {"ref_id": self._ref_id, "verified": upto, **self._desc}
        name = self._state_name
        _folder.write_replace(self._dirfd, name, self._tmp_name(name), json.dumps(record).encode())

    def download_completed(self, ref_id: str) -> None:
        try:
            if self._fd < 0:
                raise RuntimeError("download completed without any data")
            if self._behind is not None:
                self._behind.finish()
            if self.fsync:
                os.fsync(self._fd)
            self._check_folder()
            dirfd, part = self._dirfd, self._part_name
            _folder.check_replaceable(dirfd, self.dest.name, self.dest)
            mine, there = os.fstat(self._fd), os.stat(part, dir_fd=dirfd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                self._part_name = ""  # not ours any more: leave it alone
                raise FileExistsError(f"{part} was replaced by another file during the download")
            os.rename(part, self.dest.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            self._part_name = ""
            if self.fsync:
                os.fsync(dirfd)  # the rename itself
            self._remove_state()
            self._remove_stale_tmps(part)
            self.outcome.ok = True
        except Exception as exc:
            self.download_failed(ref_id, f"could not move the file into place: {exc}")
        finally:
            self._close()

    def _check_folder(self) -> None:
        """Fail if `dest`'s folder is no longer the one written into (moved or swapped)."""
        try:
            st = os.stat(self.dest.parent)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the folder {self.dest.parent} was removed during the download"
            ) from None
        if (st.st_dev, st.st_ino) != self._dir_id:
            raise FileExistsError(
                f"the folder {self.dest.parent} was moved or replaced during the download"
            )

    def download_failed(self, ref_id: str, reason: str) -> None:
        self.outcome.ok = False
        self.outcome.reason = reason
        try:
            if not (self.resume and not self._rejected):
                self._remove_stale_tmps(self._part_name)
                self._remove(self._part_name)
                self._part_name = ""
                self._remove_state()
        finally:
            self._close()

    def _remove(self, name: str) -> None:
        if name and self._dirfd >= 0:
            try:
                os.unlink(name, dir_fd=self._dirfd)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the reason for the failure matters more
                log.warning("could not remove %s: %s", self.dest.parent / name, exc)

    def _remove_stale_tmps(self, kept: str) -> None:
        """Remove temporaries of this resumable download left by a process that died.

        A resumable download writes its records through ``{stem}.{8 hex}.objdl-tmp``
        beside the kept names; one killed between creating and renaming such a file
        leaves it behind, and only this (dest, ref) can know the name is its own.
        """
        if not (self.resume and kept) or self._dirfd < 0:
            return
        prefix = kept.rsplit(".", 1)[0] + "."
        try:
            names = os.listdir(self._dirfd)
        except OSError as exc:
            log.warning("could not list %s to tidy up: %s", self.dest.parent, exc)
            return
        for name in names:
            hexpart = name[len(prefix) : -len(TMP_SUFFIX)]
            if (
                name.startswith(prefix)
                and name.endswith(TMP_SUFFIX)
                and len(hexpart) == 8
                and all(c in "0123456789abcdef" for c in hexpart)
            ):
                self._remove(name)

    def _remove_state(self) -> None:
        self._remove(self._state_name)
        self._state_name = ""

    def _close(self) -> None:
        self._behind = None
        for attr in ("_fd", "_dirfd"):
            fd = getattr(self, attr)
            setattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)


def write_pieces(fd: int, data: memoryview, offset: int, piece: int = WRITE_PIECE) -> int:
    """``pwrite`` all of `data` at `offset` in calls of at most `piece` bytes; return its size.

    Piece boundaries fall on multiples of `piece` in the file (not of `data`), so each
    call fills whole folios of that size whatever the chunk size; a short write is
    continued where it stopped.
    """
    view = data if data.format == "B" and data.ndim == 1 else data.cast("B")
    done, total = 0, view.nbytes
    while done < total:
        pos = offset + done
        n = min(piece - pos % piece, total - done)
        done += os.pwrite(fd, view[done : done + n], pos)
    return total


class _SyncRange(Protocol):
    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int: ...


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4  # <linux/fs.h>
_SFR_ALL = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
# What a file system that cannot do ``sync_file_range`` answers: write-behind is off.
_NOT_SUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE}


@functools.cache
def _libc_sync_range() -> _SyncRange | None:
    """libc's ``sync_file_range`` (Linux; not in :mod:`os`), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _sync_range(fd: int, offset: int, length: int, flags: int) -> bool:
    """``sync_file_range``; False where it cannot be done; OSError for a write error."""
    fn = _libc_sync_range()
    if fn is None:
        return False
    err = errno.EINTR
    while err == errno.EINTR:
        if fn(fd, offset, length, flags) == 0:
            return True
        err = ctypes.get_errno()
    if err in _NOT_SUPPORTED:
        return False
    raise OSError(err, f"writing the file out failed: {os.strerror(err)}")


class _WriteBehind:
    """Start writing each range out at once; drop the oldest once `lag` more bytes wait.

    Ranges are taken in the order written (chunks may come out of order), each waited
    for (``SYNC_FILE_RANGE_WAIT_AFTER``) before it is dropped, since only clean pages
    can be; a write error found on the way raises, so the download fails instead of
    reporting success for bytes the disk refused. Where the file system or libc
    cannot do it, it stops and the file stays cached as with ``cache=True``.
    """

    def __init__(self, fd: int, lag: int | None = None) -> None:
        self._fd = fd
        self._lag = WRITE_BEHIND if lag is None else lag
        self._waiting: collections.deque[tuple[int, int]] = collections.deque()
        self._held = 0
        self._on = hasattr(os, "posix_fadvise")

    def wrote(self, offset: int, length: int) -> None:
        if not self._on:
            return
        if not _sync_range(self._fd, offset, length, _SFR_WRITE):
            self._on = False
            return
        self._waiting.append((offset, length))
        self._held += length
        while self._on and self._held > self._lag:
            self._drop(*self._waiting.popleft())

    def finish(self) -> None:
        """Write out and drop what still waits (the last `lag` bytes)."""
        while self._on and self._waiting:
            self._drop(*self._waiting.popleft())

    def _drop(self, offset: int, length: int) -> None:
        self._held -= length
        if not _sync_range(self._fd, offset, length, _SFR_ALL):
            self._on = False
            return
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)


def _resume_tag(name: str, ref_id: str) -> str:
    key = f"{name}\0{ref_id}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:16]


def _kept_names(name: str, tag: str, limit: int) -> tuple[str, str]:
    """Part and state file names for `name`, cut so that every name derived fits `limit`."""
    stem = _folder.fit_name(name, limit - len(f"..{tag}") - TMP_EXTRA)
    return f".{stem}.{tag}{PART_SUFFIX}", f".{stem}.{tag}{STATE_SUFFIX}"


def check_destination(dest: str | os.PathLike[str]) -> Path:
    """Check that :func:`download_file` could write `dest`, before any request; return it.

    For a caller that wants to refuse a bad destination before connecting (the
    ``objdl get`` command does). It looks without following a symlink at `dest`, so it
    is advice, not a guarantee: the download checks again, relative to a descriptor of
    the folder, when it creates and renames its files.

    Raises:
        FileNotFoundError: `dest`'s folder does not exist.
        NotADirectoryError: `dest`'s folder is not a folder.
        IsADirectoryError: `dest` is a folder (or ends in ``.`` or ``..``).
        FileExistsError: `dest` is a symbolic link, a FIFO, a device or a socket.
        PermissionError: the folder is not writable.
    """
    dest = Path(dest)
    if dest.name in ("", ".", ".."):
        raise IsADirectoryError(f"destination {dest} is a directory; give a file path")
    folder = dest.parent
    if not folder.exists():
        raise FileNotFoundError(f"the folder of {dest} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"the folder of {dest}, {folder}, is not a folder")
    with contextlib.suppress(FileNotFoundError):
        _folder.refuse_mode(os.lstat(dest).st_mode, dest)
    try:  # find out now, not after the owner has been asked for data
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write in folder {folder}: {exc.strerror}") from exc
    return dest


def download_file(
    cell: CellLike,
    from_fqcn: str,
    ref_id: str,
    dest: str | os.PathLike[str],
    *,
    per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    fsync: bool = False,
    resume: bool = False,
    cache: bool = True,
    **kwargs: Any,
) -> Path:
    """Download a file offered with :func:`offer_file` to `dest`; return its path.

    `kwargs` go to :func:`download_object` (window, chunk_size, tries, abort_signal...).
    With `resume`, a failed download keeps what it has (hidden beside `dest`) and a
    later call for the same ref continues from there (see :class:`FileConsumer`).
    ``cache=False`` writes the file out as it arrives and leaves it out of the page
    cache, for a file not read again soon (see :class:`FileConsumer`).

    Raises:
        DownloadError: the download failed (without `resume`, nothing is left at
            `dest` or beside it).
        OSError: ``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``,
            ``FileExistsError`` or ``PermissionError``, as for :func:`check_destination`,
            called first (objdl only creates or replaces regular files: it never writes
            through a link, never replaces a device such as ``/dev/null``).
    """
    dest = check_destination(dest)
    consumer = FileConsumer(dest, fsync=fsync, resume=resume, cache=cache)
    run_download(cell, from_fqcn, ref_id, consumer, consumer.outcome, per_request_timeout, kwargs)
    return dest
