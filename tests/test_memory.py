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


@pytest.mark.timeout(180)
def test_512_mib_file_grows_neither_owner_nor_site_past_128_mib(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    src = tmp_path / "big.bin"
    with src.open("wb") as f:  # real data, not a sparse file: the owner must read it all
        block = os.urandom(4 * MiB)
        for _ in range(SIZE // len(block)):
            f.write(block)
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
        site = ctx.Process(
            target=_procs.memory_site_main, args=(url, ref, str(tmp_path / "copy.bin"), results)
        )
        site.start()
        procs.append(site)
        what, site_growth = results.get(timeout=120)
        assert what == "site"
        stop.set()
        what, owner_growth = results.get(timeout=30)
        assert what == "owner"
        assert (tmp_path / "copy.bin").stat().st_size == SIZE
        assert site_growth < LIMIT_KIB, f"site peak RSS grew {site_growth / 1024:.0f} MiB"
        assert owner_growth < LIMIT_KIB, f"owner peak RSS grew {owner_growth / 1024:.0f} MiB"
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        results.close()
        results.join_thread()
        _procs.stop_process(bproc)
