"""Memory is bounded by the window, never by the object: a 512 MiB file, measured."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from tests import _procs

MiB = 1024 * 1024
SIZE = 512 * MiB
LIMIT_KIB = 128 * 1024


def write_file(path: Path, size: int) -> None:
    with path.open("wb") as f:  # real data, not a sparse file: the owner must read it all
        block = os.urandom(4 * MiB)
        for _ in range(size // len(block)):
            f.write(block)


def run(tmp_path: Path, size: int, sites: int) -> tuple[int, list[int]]:
    """Serve a `size`-byte file to `sites` site processes at once; peak growths in KiB."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    src = tmp_path / "big.bin"
    write_file(src, size)
    bproc, url = _procs.start_broker_process()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    stop = ctx.Event()
    procs: list[Any] = []
    try:
        owner = ctx.Process(target=_procs.memory_owner_main, args=(url, str(src), results, stop))
        owner.start()
        procs.append(owner)
        what, ref = results.get(timeout=60)
        assert what == "owner-ref"
        for i in range(1, sites + 1):
            site = ctx.Process(
                target=_procs.memory_site_main,
                args=(url, ref, str(tmp_path / f"copy-{i}.bin"), results, f"site-{i}"),
            )
            site.start()
            procs.append(site)
        site_growths = []
        for _ in range(sites):
            what, growth = results.get(timeout=120)
            assert what == "site"
            site_growths.append(growth)
        stop.set()
        what, owner_growth = results.get(timeout=30)
        assert what == "owner"
        for i in range(1, sites + 1):
            assert (tmp_path / f"copy-{i}.bin").stat().st_size == size
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return owner_growth, site_growths
    finally:
        stop.set()
        _procs.end_children(procs, results)
        _procs.stop_process(bproc)


@pytest.mark.timeout(180)
def test_512_mib_file_grows_neither_owner_nor_site_past_128_mib(tmp_path: Path) -> None:
    owner_growth, (site_growth,) = run(tmp_path, SIZE, 1)
    assert site_growth < LIMIT_KIB, f"site peak RSS grew {site_growth / 1024:.0f} MiB"
    assert owner_growth < LIMIT_KIB, f"owner peak RSS grew {owner_growth / 1024:.0f} MiB"


@pytest.mark.timeout(180)
def test_four_sites_at_once_grow_the_owner_by_less_than_64_mib(tmp_path: Path) -> None:
    # Four windows in flight at once: the owner reads into its bounded buffer pool
    # instead of a fresh buffer per chunk (which grew it past 100 MiB).
    owner_growth, site_growths = run(tmp_path, 256 * MiB, 4)
    assert owner_growth < 64 * 1024, f"owner peak RSS grew {owner_growth / 1024:.0f} MiB"
    worst = max(site_growths)
    assert worst < 64 * 1024, f"a site's peak RSS grew {worst / 1024:.0f} MiB"
