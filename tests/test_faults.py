"""Downloads survive faults: a broker restart, a dead owner, a dead or stalled site."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from objdl.cell import Cell
from objdl.downloader import DEFAULT_DIGEST, ObjDownloader, TransferStatus
from objdl.objects import DownloadError, download_file
from tests import _procs
from tests.conftest import wait_for

MiB = 1024 * 1024
FAST = {"broker_timeout": 1.0, "heartbeat_interval": 0.2}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "model.bin"
    p.write_bytes(os.urandom(8 * MiB))
    return p


@pytest.fixture
def mp() -> Iterator[Any]:
    yield multiprocessing.get_context("spawn")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def parts(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".objdl-part")]


class Download(threading.Thread):
    """A download in a thread, with its progress visible to the test."""

    def __init__(self, cell: Cell, ref: str, dest: Path, **kw: Any) -> None:
        super().__init__()
        self.cell, self.ref, self.dest, self.kw = cell, ref, dest, kw
        self.done_bytes = 0
        self.first_bytes = -1
        self.error: str | None = None
        self.ok = False

    def run(self) -> None:
        def progress(ref_id: str, done: int, total: Any, rate: float) -> None:
            self.done_bytes = done
            if self.first_bytes < 0:
                self.first_bytes = done

        try:
            download_file(
                self.cell,
                "server",
                self.ref,
                self.dest,
                progress_cb=progress,
                progress_interval=0.05,
                **self.kw,
            )
            self.ok = True
        except DownloadError as exc:
            self.error = exc.reason


def open_files() -> set[str]:
    """What this process's file descriptors point at now."""
    found = set()
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            found.add(os.readlink(f"/proc/self/fd/{n}"))
    return found


def offer_throttled(
    owner: Cell, path: Path, delay: float = 0.02, digest: str = DEFAULT_DIGEST
) -> str:
    producer = _procs.throttled_producer(delay, chunk_size=64 * 1024, digest=digest)
    tx = ObjDownloader.new_transaction(owner, producer, 60.0)
    return ObjDownloader.add_download_object(tx, path)


def test_broker_restart_mid_download_resumes(src: Path, tmp_path: Path) -> None:
    bproc, url = _procs.start_broker_process()
    try:
        with Cell("server", url, **FAST) as owner, Cell("site-1", url, **FAST) as site:
            ref = offer_throttled(owner, src)
            d = Download(site, ref, tmp_path / "copy.bin", window=2, per_request_timeout=3.0)
            d.start()
            wait_for(lambda: d.done_bytes >= 2 * MiB, timeout=20)
            _procs.stop_process(bproc)  # the broker dies mid-download
            time.sleep(0.5)
            bproc, _ = _procs.start_broker_process(bind=url)  # and comes back on the same address
            d.join(60)
            assert not d.is_alive()
            assert d.ok, d.error
            assert sha(tmp_path / "copy.bin") == sha(src)
            ObjDownloader.shutdown()
    finally:
        _procs.stop_process(bproc)


def test_outage_longer_than_retry_budget_fails_saying_so(src: Path, tmp_path: Path) -> None:
    bproc, url = _procs.start_broker_process()
    try:
        with Cell("server", url, **FAST) as owner, Cell("site-1", url, **FAST) as site:
            ref = offer_throttled(owner, src)
            d = Download(
                site, ref, tmp_path / "copy.bin", window=2, per_request_timeout=1.0, tries=2
            )
            d.start()
            wait_for(lambda: d.done_bytes >= MiB, timeout=20)
            _procs.stop_process(bproc)
            d.join(20)
            assert not d.is_alive() and not d.ok
            assert d.error is not None and "retry budget" in d.error, d.error
            assert not (tmp_path / "copy.bin").exists() and parts(tmp_path) == []
            ObjDownloader.shutdown()
    finally:
        _procs.stop_process(bproc)


def test_owner_killed_mid_download_sites_fail_cleanly(src: Path, tmp_path: Path, mp: Any) -> None:
    bproc, url = _procs.start_broker_process()
    results = mp.Queue()
    owner = mp.Process(target=_procs.slow_owner_main, args=(url, str(src), 0.02, results))
    try:
        owner.start()
        _, ref = results.get(timeout=30)
        with Cell("site-1", url, **FAST) as site:
            d = Download(
                site,
                ref,
                tmp_path / "copy.bin",
                window=2,
                per_request_timeout=2.0,
                tries=3,
                backoff=0.2,
            )
            d.start()
            wait_for(lambda: d.done_bytes >= MiB, timeout=20)
            os.kill(owner.pid, signal.SIGKILL)  # type: ignore[arg-type]
            t0 = time.monotonic()
            d.join(30)
            assert not d.is_alive() and not d.ok
            assert time.monotonic() - t0 < 15  # within the retry budget, not hanging
            assert d.error is not None and (
                "target_unreachable" in d.error or "timeout" in d.error
            ), d.error
            assert not (tmp_path / "copy.bin").exists() and parts(tmp_path) == []
    finally:
        _procs.end_children([owner], results)
        _procs.stop_process(bproc)


def test_site_killed_mid_download_owner_cleans_up(
    src: Path, tmp_path: Path, mp: Any, broker: Any
) -> None:
    results = mp.Queue()
    fired: list[str] = []
    with Cell("server", broker.url, **FAST) as owner:
        producer = _procs.throttled_producer(0.02, chunk_size=64 * 1024)
        tx = ObjDownloader.new_transaction(
            owner, producer, 1.0, timeout_cb=lambda t, o: fired.append(t)
        )
        outcome = ObjDownloader.track_transaction(tx, num_sites=1)
        ref = ObjDownloader.add_download_object(tx, src)
        site = mp.Process(
            target=_procs.fetch_file_progress_main,
            args=("site-1", broker.url, ref, str(tmp_path / "copy.bin"), results, {"window": 2}),
        )
        try:
            site.start()
            while True:
                _name, what, *rest = results.get(timeout=30)
                if what == "progress" and rest[0] >= MiB:
                    break
            fd = producer._prepared[ref].source._fd  # the file is open while it is served
            assert os.readlink(f"/proc/self/fd/{fd}") == str(src)
            site.kill()
            assert outcome.wait(10).status == TransferStatus.TIMEOUT
            assert fired == [tx]
            assert outcome.refs[ref].sites["site-1"].state == "failed"
            assert ObjDownloader.get_outcome(tx) is None  # the owner forgot the transaction
            assert producer._prepared == {}  # and closed the file
            assert str(src) not in open_files()
        finally:
            _procs.end_children([site], results)


def test_stalled_site_does_not_slow_others(tmp_path: Path, mp: Any, broker: Any) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(64 * MiB))
    results = mp.Queue()
    procs = []
    with Cell("server", broker.url, **FAST) as owner:
        from objdl.objects import offer_file

        ref = offer_file(owner, path)

        def start(name: str) -> None:
            p = mp.Process(
                target=_procs.fetch_file_progress_main,
                args=(name, broker.url, ref, str(tmp_path / f"{name}.bin"), results, {}),
            )
            p.start()
            procs.append(p)

        try:
            # Freeze the first site once it has started: it stops reading altogether.
            # The second starts only then, so its whole download meets the stalled one
            # (started together, a fast second site could finish before the first
            # reported any progress, and its "done" went unseen).
            start("site-slow")
            while True:
                name, what, *rest = results.get(timeout=30)
                if name == "site-slow" and what == "progress":
                    os.kill(procs[0].pid, signal.SIGSTOP)
                    break
            start("site-fast")
            t0 = time.monotonic()
            while True:
                name, what, *rest = results.get(timeout=60)
                if name == "site-fast" and what == "done":
                    assert rest[0], rest[1]
                    break
            assert time.monotonic() - t0 < 30
            assert sha(tmp_path / "site-fast.bin") == sha(path)
            assert broker.stats()["routed"] > 0
        finally:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGCONT)  # a stopped site: let it take the kill
            _procs.end_children(procs, results)
            ObjDownloader.shutdown()


@pytest.mark.parametrize("digest", ["xxh3_128", "sha256"])  # sha256: hashed on its own thread
def test_resume_after_site_restart(
    src: Path, tmp_path: Path, mp: Any, broker: Any, digest: str
) -> None:
    """A site process dies mid-download; a new one resumes from its partial file and
    recorded progress, and the whole file is still checked against the full digest."""
    results = mp.Queue()
    dest = tmp_path / "copy.bin"
    with Cell("server", broker.url, **FAST) as owner:
        ref = offer_throttled(owner, src, delay=0.02, digest=digest)
        first = mp.Process(
            target=_procs.fetch_file_progress_main,
            args=("site-1", broker.url, ref, str(dest), results, {"window": 2, "resume": True}),
        )
        try:
            first.start()
            while True:
                _name, what, *rest = results.get(timeout=30)
                if what == "progress" and rest[0] >= 4 * MiB:
                    break
            first.kill()  # crash: no clean-up runs
            first.join(10)
            state_files = [p for p in tmp_path.iterdir() if p.name.endswith(".objdl-state")]
            assert len(parts(tmp_path)) == 1 and len(state_files) == 1
            recorded = json.loads(state_files[0].read_text())["verified"]
            assert recorded > 0
            with Cell("site-1", broker.url, **FAST) as site:  # the restarted site
                d = Download(site, ref, dest, window=2, resume=True)
                d.run()
            assert d.ok, d.error
            assert sha(dest) == sha(src)
            assert parts(tmp_path) == [] and not state_files[0].exists()
            # It resumed: its first progress report already counted the recorded bytes.
            assert d.first_bytes >= recorded
        finally:
            _procs.end_children([first], results)
            ObjDownloader.shutdown()
