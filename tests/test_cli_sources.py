"""``objdl serve DIR`` opens what it checked: attacks on the folder between check and open.

The race is made deterministic by swapping the entry after :func:`expand_sources`
has checked it and before ``serve`` offers it (what a user sharing the folder could
do in between), then offering exactly as ``serve`` does.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from objdl.cli._common import CliError
from objdl.cli._serve import _offer
from objdl.cli._sources import expand_sources
from objdl.objects import download_file, new_transaction, offer_file

pytestmark = pytest.mark.timeout(30)

SECRET = b"secret outside the shared folder"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A shared folder (a.bin, sub/deep.bin, link-in -> sub/deep.bin) and a secret outside."""
    folder, outside = tmp_path / "shared", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.bin").write_bytes(b"d" * 1000)
    (folder / "link-in").symlink_to(folder / "sub" / "deep.bin")
    (outside / "deep.bin").write_bytes(SECRET)
    (outside / "a.bin").write_bytes(SECRET)
    yield folder, outside


def _by_name(folder: Path, fds: contextlib.ExitStack) -> dict[str, Any]:
    sources, _ = expand_sources([str(folder)], fds)
    return {s.name: s for s in sources}


def test_an_entry_swapped_for_a_link_out_is_never_opened(
    cells: tuple[Any, Any], shared: tuple[Path, Path]
) -> None:
    owner, _ = cells
    folder, outside = shared
    with contextlib.ExitStack() as fds:
        src = _by_name(folder, fds)["a.bin"]  # checked: a regular file in the folder
        (folder / "a.bin").unlink()
        (folder / "a.bin").symlink_to(outside / "a.bin")  # swapped before the open
        tx = new_transaction(owner, timeout=10)
        with pytest.raises(CliError, match="replaced by a symlink"):
            _offer(offer_file, owner, src, tx)


def test_a_folder_on_a_links_way_swapped_after_the_check_is_never_followed(
    cells: tuple[Any, Any], shared: tuple[Path, Path]
) -> None:
    owner, _ = cells
    folder, outside = shared
    with contextlib.ExitStack() as fds:
        (folder / "a.bin").unlink()  # only the link is left to serve
        sources, _ = expand_sources([str(folder)], fds)
        assert [s.name for s in sources] == ["link-in"]
        # Swap sub/ (on the checked link's way) for a link to a folder outside that has
        # a deep.bin too: the open goes through the descriptor of the sub/ checked.
        (folder / "sub" / "deep.bin").unlink()
        (folder / "sub").rmdir()
        (folder / "sub").symlink_to(outside, target_is_directory=True)
        tx = new_transaction(owner, timeout=10)
        with pytest.raises(CliError, match="no such file"):
            _offer(offer_file, owner, sources[0], tx)


def test_a_folder_swapped_while_a_link_is_resolved_is_not_followed(
    shared: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sub/ becomes a link out right after link-in was resolved to sub/deep.bin."""
    folder, outside = shared
    (folder / "a.bin").unlink()
    real = os.path.realpath

    def resolve_then_swap(path: Any, *args: Any, **kwargs: Any) -> str:
        got = real(path, *args, **kwargs)
        if str(path).endswith("link-in"):
            (folder / "sub" / "deep.bin").unlink()
            (folder / "sub").rmdir()
            (folder / "sub").symlink_to(outside, target_is_directory=True)
        return got

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    with contextlib.ExitStack() as fds, pytest.raises(CliError, match="no regular files"):
        expand_sources([str(folder)], fds)


def test_an_entry_swapped_for_a_fifo_is_refused_without_hanging(
    cells: tuple[Any, Any], shared: tuple[Path, Path]
) -> None:
    owner, _ = cells
    folder, _ = shared
    with contextlib.ExitStack() as fds:
        src = _by_name(folder, fds)["a.bin"]
        (folder / "a.bin").unlink()
        os.mkfifo(folder / "a.bin")  # opening it for reading would block without a writer
        tx = new_transaction(owner, timeout=10)
        with pytest.raises(CliError, match="not a regular file"):
            _offer(offer_file, owner, src, tx)


def test_a_checked_folder_entry_and_link_are_served_by_descriptor(
    cells: tuple[Any, Any], shared: tuple[Path, Path], tmp_path: Path
) -> None:
    owner, site = cells
    folder, _ = shared
    out = tmp_path / "out"
    out.mkdir()
    with contextlib.ExitStack() as fds:
        srcs = _by_name(folder, fds)
        tx = new_transaction(owner, timeout=10)
        refs = {name: _offer(offer_file, owner, srcs[name], tx) for name in ("a.bin", "link-in")}
    for name, ref in refs.items():  # the folder descriptors are closed: the files are open
        download_file(site, "server", ref, out / name)
    assert (out / "a.bin").read_bytes() == b"a" * 1000
    assert (out / "link-in").read_bytes() == b"d" * 1000


def test_offer_file_with_follow_symlinks_false_refuses_a_link(
    cells: tuple[Any, Any], shared: tuple[Path, Path]
) -> None:
    owner, _ = cells
    folder, _ = shared
    dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            offer_file(owner, "link-in", dir_fd=dirfd, follow_symlinks=False)
        assert info.value.errno == errno.ELOOP
        assert offer_file(owner, "link-in", dir_fd=dirfd)  # following is the default
        with pytest.raises(TypeError, match="follow_symlinks"):
            offer_file(owner, "a.bin", dir_fd=dirfd, follow_symlinks=0)  # type: ignore[arg-type]
    finally:
        os.close(dirfd)
