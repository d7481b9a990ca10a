"""What ``objdl serve`` offers: the files named, and the regular files in a folder named.

A folder is not walked: its subdirectories are skipped (each said so), and so is
anything that is not a regular file (a FIFO, a socket, a device). A symlink in it is
served only if it leads to a regular file inside the same folder tree; one leading
out of it is skipped, so a link planted in a shared folder cannot make the owner
serve ``/etc/shadow``. A file named on the command line is served as named (a
symlink there is the user's own choice).

What is checked is also what is opened: the folder is opened once and every file in
it is opened relative to that descriptor, never following a symlink at any step
(``O_NOFOLLOW``; a link inside the folder is served by opening its resolved target
the same way, one folder at a time). So a link swapped in between the check and the
open (or a subfolder swapped for a link out) makes that file fail to open; it never
makes the owner serve a file outside the folder.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objdl.cli._common import EXIT_USAGE, CliError, check_source

__all__ = ["Skipped", "Source", "expand_sources", "open_beneath", "output_name"]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW


@dataclass(frozen=True)
class Source:
    """A file to offer: `path` is shown; `name` is what the site is told to call it.

    With `dir_fd`, the file is `open_name` in that folder descriptor, opened without
    following a symlink; without it, `path` itself is opened.
    """

    path: Path
    name: str
    dir_fd: int | None = None
    open_name: str = ""

    def offer_args(self) -> tuple[str | Path, dict[str, Any]]:
        """The path and keyword arguments to give :func:`objdl.objects.offer_file`."""
        if self.dir_fd is None:
            return self.path, {}
        return self.open_name, {"dir_fd": self.dir_fd, "follow_symlinks": False}

    def size(self) -> int:
        """The file's size now (of the file itself, never of what a link points to)."""
        if self.dir_fd is None:
            return self.path.stat().st_size
        return os.stat(self.open_name, dir_fd=self.dir_fd, follow_symlinks=False).st_size


@dataclass(frozen=True)
class Skipped:
    """An entry of a folder that is not offered, and why."""

    path: Path
    reason: str


def output_name(name: str) -> str:
    """`name` with control characters (newlines, tabs...) as ``_``: a pasteable ``-o``."""
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in name) or "_"


def _inside(root: str, target: str) -> bool:
    return os.path.commonpath([root, target]) == root


def open_beneath(dirfd: int, rel: str, fds: contextlib.ExitStack) -> tuple[int, str]:
    """The folder descriptor and last name of `rel` (``a/b/c``) under `dirfd`.

    Each folder on the way is opened relative to the one before with ``O_NOFOLLOW``,
    so a component swapped for a symlink fails (``ELOOP``/``ENOTDIR``) instead of
    leading out. The descriptors opened are closed by `fds`.
    """
    parts = rel.split(os.sep)
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{rel!r} is not a plain relative path")
    for part in parts[:-1]:
        dirfd = os.open(part, _DIR_FLAGS, dir_fd=dirfd)
        fds.callback(os.close, dirfd)
    return dirfd, parts[-1]


def _regular(dirfd: int, name: str) -> bool:
    """Whether `name` in `dirfd` opens, without following a link, as a regular file."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dirfd)
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _from_folder(folder: Path, fds: contextlib.ExitStack) -> tuple[list[Source], list[Skipped]]:
    def fail(exc: OSError) -> CliError:
        return CliError(f"cannot serve {folder}: {exc.strerror or exc}", EXIT_USAGE)

    try:
        dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise fail(exc) from None
    fds.callback(os.close, dirfd)
    root = os.path.realpath(folder)
    try:
        here, there = os.fstat(dirfd), os.stat(root)
        entries = sorted(os.scandir(dirfd), key=lambda e: e.name)
    except OSError as exc:
        raise fail(exc) from None
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        raise CliError(f"cannot serve {folder}: it was moved or replaced while read", EXIT_USAGE)
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for entry in entries:
        path = folder / entry.name
        try:
            if entry.is_symlink():
                target = os.path.realpath(os.path.join(root, entry.name))
                if not _inside(root, target) or target == root:
                    skipped.append(Skipped(path, "a symlink that leads out of the folder"))
                    continue
                at, name = open_beneath(dirfd, os.path.relpath(target, root), fds)
                if _regular(at, name):
                    sources.append(Source(Path(target), entry.name, at, name))
                else:
                    skipped.append(
                        Skipped(path, "a symlink to something that is not a regular file")
                    )
            elif entry.is_dir(follow_symlinks=False):
                skipped.append(Skipped(path, "a subdirectory (not walked: name it as a PATH)"))
            elif entry.is_file(follow_symlinks=False) and _regular(dirfd, entry.name):
                sources.append(Source(path, entry.name, dirfd, entry.name))
            else:
                skipped.append(Skipped(path, "not a regular file"))
        except (OSError, ValueError) as exc:
            if entry.is_symlink():
                reason = "a symlink to something that is not a regular file"
                if isinstance(exc, PermissionError):
                    reason = f"a symlink to a file that cannot be read: {exc.strerror}"
                skipped.append(Skipped(path, reason))
            elif isinstance(exc, PermissionError):
                raise CliError(f"cannot serve {path}: {exc.strerror}", EXIT_USAGE) from None
            else:  # gone, or swapped for a link, since it was listed
                skipped.append(Skipped(path, "changed while the folder was read"))
    if not sources:
        raise CliError(f"cannot serve {folder}: no regular files in that folder", EXIT_USAGE)
    return sources, skipped


def expand_sources(
    paths: list[str], fds: contextlib.ExitStack
) -> tuple[list[Source], list[Skipped]]:
    """Every file to offer, in order; raise :class:`CliError` (exit 2) for a bad PATH.

    The folder descriptors the sources need stay open until `fds` is closed.
    """
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            more, skip = _from_folder(p, fds)
            sources += more
            skipped += skip
        else:
            check_source(p)
            sources.append(Source(p, p.name))
    return sources, skipped
