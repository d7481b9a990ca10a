"""What ``objdl serve`` offers: the files named, and the regular files in a folder named.

A folder is not walked: its subdirectories are skipped (each said so), and so is
anything that is not a regular file (a FIFO, a socket, a device). A symlink in it is
served only if it leads to a regular file inside the same folder tree; one leading
out of it is skipped, so a link planted in a shared folder cannot make the owner
serve ``/etc/shadow``. A file named on the command line is served as named (a
symlink there is the user's own choice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from objdl.cli._common import EXIT_USAGE, CliError, check_source

__all__ = ["Skipped", "Source", "expand_sources", "output_name"]


@dataclass(frozen=True)
class Source:
    """A file to offer: `path` is opened; `name` is what the site is told to call it."""

    path: Path
    name: str


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


def _from_folder(folder: Path) -> tuple[list[Source], list[Skipped]]:
    root = os.path.realpath(folder)
    sources: list[Source] = []
    skipped: list[Skipped] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise CliError(f"cannot serve {folder}: {exc.strerror or exc}", EXIT_USAGE) from None
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not _inside(root, target):
                skipped.append(Skipped(path, "a symlink that leads out of the folder"))
            elif not os.path.isfile(target):
                skipped.append(Skipped(path, "a symlink to something that is not a regular file"))
            else:
                sources.append(Source(Path(target), entry.name))
        elif entry.is_dir(follow_symlinks=False):
            skipped.append(Skipped(path, "a subdirectory (not walked: name it as a PATH)"))
        elif entry.is_file(follow_symlinks=False):
            sources.append(Source(path, entry.name))
        else:
            skipped.append(Skipped(path, "not a regular file"))
    if not sources:
        raise CliError(f"cannot serve {folder}: no regular files in that folder", EXIT_USAGE)
    return sources, skipped


def expand_sources(paths: list[str]) -> tuple[list[Source], list[Skipped]]:
    """Every file to offer, in order; raise :class:`CliError` (exit 2) for a bad PATH."""
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            more, skip = _from_folder(p)
            sources += more
            skipped += skip
        else:
            check_source(p)
            sources.append(Source(p, p.name))
    for s in sources:
        try:
            with s.path.open("rb"):
                pass
        except OSError as exc:
            raise CliError(f"cannot serve {s.path}: {exc.strerror or exc}", EXIT_USAGE) from None
    return sources, skipped
