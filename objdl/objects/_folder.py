"""File operations in a folder that other local users may write too.

A site downloads into a folder it does not control alone: anyone who can write there
can plant a symlink, a hard link, a FIFO or a file of their own at a name objdl is
known to use. So every operation here:

- works relative to a descriptor of the folder opened once (:func:`open_folder`), so
  a folder renamed or swapped for a symlink later cannot redirect a write or a rename;
- never follows a symlink at a name it opens (``O_NOFOLLOW``) and creates files only
  with ``O_EXCL``, so it never opens what someone else put there when it means to
  create;
- trusts a file it finds (a resumable part, a state record) only after ``fstat`` on
  the descriptor it opened (not a racy ``stat`` of the name) shows a regular file,
  owned by us, with no other name (:func:`open_own`); opened with ``O_NONBLOCK``, so
  a FIFO at that name cannot block the open;
- replaces a file only by ``rename`` of a fresh one (:func:`write_replace`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

__all__ = [
    "STATE_MAX",
    "check_replaceable",
    "check_space",
    "create",
    "fit_name",
    "name_max",
    "open_folder",
    "open_own",
    "read_small",
    "refuse_mode",
    "write_replace",
]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
DEFAULT_NAME_MAX = 255  # bytes; Linux's NAME_MAX on every common file system
STATE_MAX = 64 * 1024  # a state record is ~300 bytes; anything larger is not ours


def open_folder(folder: Path) -> int:
    """A descriptor of `folder`, for the ``dir_fd=`` of every later operation in it."""
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def name_max(dirfd: int) -> int:
    """The longest file name, in bytes, the folder's file system accepts."""
    try:
        n = os.fpathconf(dirfd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX
    return n if n > 0 else DEFAULT_NAME_MAX


def fit_name(name: str, budget: int) -> str:
    """The longest start of `name` that takes at most `budget` bytes on disk.

    Cut between characters, never inside a multibyte one (a name read from the file
    system with undecodable bytes keeps them, one byte each).
    """
    used = 0
    for i, ch in enumerate(name):
        used += len(os.fsencode(ch))
        if used > budget:
            return name[:i]
    return name


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def refuse_mode(mode: int, dest: Path) -> None:
    """Raise unless `mode` (from an ``lstat`` of `dest`) is a regular file's.

    objdl puts a download in place by renaming over `dest`, which would replace a
    device node, a FIFO or a symbolic link itself: it refuses them instead, so
    ``-o /dev/null`` cannot replace ``/dev/null`` and a link is never followed.
    """
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"destination {dest} is a directory; give a file path")
    raise FileExistsError(
        f"destination {dest} is {_kind(mode)}, not a regular file; objdl only creates "
        "or replaces regular files (it never writes through a link or into a device): "
        "remove it or give another path"
    )


def check_replaceable(dirfd: int, name: str, dest: Path) -> None:
    """Raise unless `name` in the folder is absent or a regular file (see :func:`refuse_mode`)."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    refuse_mode(st.st_mode, dest)


def check_space(dirfd: int, need: int, folder: Path) -> None:
    """Raise ``OSError(ENOSPC)`` if the folder's file system has less than `need` bytes free."""
    st = os.fstatvfs(dirfd)
    free = st.f_bavail * st.f_frsize  # what we may use, not the root-only reserve
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space in {folder}: the file needs {need:,} more bytes and "
            f"{free:,} are free; make room or download elsewhere",
        )


def create(dirfd: int, name: str, mode: int = 0o644) -> int:
    """Create `name` (read-write); fails if anything, even a dangling link, is there."""
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode, dir_fd=dirfd)


def open_own(dirfd: int, name: str, flags: int) -> int:
    """Open an existing `name` only if it is a regular file of ours with one name.

    Raises ``OSError`` (``PermissionError`` with the reason for a file that is there
    but not trusted): a symlink, a FIFO or device, a file of another user, or a hard
    link to some other file (writing into it would change that file too).
    """
    fd = os.open(name, flags | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dirfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{name} is {_kind(st.st_mode)}, not a regular file")
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{name} is owned by uid {st.st_uid}, not by us")
        if st.st_nlink != 1:
            raise PermissionError(f"{name} has {st.st_nlink} names (a hard link to it exists)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(fd: int) -> bytes:
    """The whole content of an open file of at most :data:`STATE_MAX` bytes."""
    data = os.pread(fd, STATE_MAX + 1, 0)
    if len(data) > STATE_MAX:
        raise ValueError(f"larger than {STATE_MAX} bytes")
    return data


def write_replace(dirfd: int, name: str, tmp: str, data: bytes) -> None:
    """Replace `name` atomically with `data`, written first to the fresh file `tmp`.

    A crash leaves either the old or the new content at `name` (and maybe `tmp`);
    whatever was at `name` (even a symlink) is replaced, never written through.
    """
    fd = create(dirfd, tmp, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
