"""Code that runs in child processes started by the tests (spawned, never forked)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any


def start_broker_process(
    extra: list[str] | None = None, bind: str = "tcp://127.0.0.1:*"
) -> tuple[subprocess.Popen[str], str]:
    """Run ``python -m broker`` on `bind` (default: a free loopback port); return it and its url."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "--bind", bind, *(extra or [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        proc.wait(5)
        raise AssertionError(
            f"broker did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc, line.rsplit(" ", 1)[-1].strip()


def end_children(procs: list[Any], results: Any) -> None:
    """Kill the multiprocessing children still alive, reap them all, close their queue."""
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)
    results.close()
    results.join_thread()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate a process we started, by its pid, and reap it; kill if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


def echo_cell_main(
    name: str, url: str, peers: list[str], results: Any, stop: Any, seconds: float
) -> None:
    """Serve an echo handler as `name`, ask every peer once, report, serve until `stop`."""
    from objdl.cell import Cell
    from objdl.message import Message, ReturnCode

    with Cell(name, url) as cell:
        cell.register_request_cb("test", "echo", lambda req: Message(payload=req.payload))
        results.put((name, "ready", os.getpid()))
        got: dict[str, Any] = {}
        deadline = time.monotonic() + seconds
        while len(got) < len(peers) and time.monotonic() < deadline:
            for p in peers:
                if p in got:
                    continue
                reply = cell.send_request("test", p, "echo", Message(payload={"from": name}), 2.0)
                if reply.get_header("return_code") == ReturnCode.OK:
                    got[p] = reply.payload
            time.sleep(0.05)
        results.put((name, "done", got))
        stop.wait(max(0.0, deadline - time.monotonic()))


def hold_name_main(name: str, url: str, ready: Any) -> None:
    """Register `name` and then hang until killed (simulates a process that crashes)."""
    from objdl.cell import Cell

    cell = Cell(name, url)
    cell.start()
    ready.put(os.getpid())
    time.sleep(60)


def fetch_file_main(name: str, url: str, ref: str, dest: str, results: Any) -> None:
    """Download file `ref` from "server" to `dest`; report (name, sha256 of dest)."""
    import hashlib

    from objdl.cell import Cell
    from objdl.objects import download_file

    with Cell(name, url) as cell:
        path = download_file(cell, "server", ref, dest)
        results.put((name, hashlib.sha256(path.read_bytes()).hexdigest()))


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident set size (or VmHWM, its peak) in KiB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_owner_main(url: str, path: str, results: Any, stop: Any) -> None:
    """Offer `path`; report (ref, rss before); serve until `stop`; report peak growth."""
    from objdl.cell import Cell
    from objdl.objects import offer_file

    with Cell("server", url) as cell:
        ref = offer_file(cell, path)  # opens and hashes the file before the baseline
        reset_peak_rss()
        base = rss_kib()
        results.put(("owner-ref", ref))
        stop.wait(120)
        results.put(("owner", rss_kib("VmHWM") - base))


def memory_site_main(url: str, ref: str, dest: str, results: Any, name: str = "site-1") -> None:
    """Download `ref` to `dest`; report how much the peak RSS grew during it (KiB)."""
    from objdl.cell import Cell
    from objdl.objects import download_file

    with Cell(name, url) as cell:
        reset_peak_rss()
        base = rss_kib()
        download_file(cell, "server", ref, dest)
        results.put(("site", rss_kib("VmHWM") - base))


def slow_owner_main(url: str, path: str, delay: float, results: Any) -> None:
    """Offer `path` served slowly (`delay` s per chunk); report the ref; serve until killed.

    (No multiprocessing Event to stop it: a process killed while waiting on one leaves
    it unusable, and the test kills this one.)"""
    from pathlib import Path

    from objdl.cell import Cell
    from objdl.downloader import ObjDownloader

    with Cell("server", url, broker_timeout=1.0, heartbeat_interval=0.2) as cell:
        producer = throttled_producer(delay, chunk_size=64 * 1024)
        tx = ObjDownloader.new_transaction(cell, producer, 60.0)
        ref = ObjDownloader.add_download_object(tx, Path(path))
        results.put(("ref", ref))
        time.sleep(120)


def throttled_producer(delay: float, **kwargs: Any) -> Any:
    """An ObjectProducer that sleeps `delay` s per chunk, so a download lasts long enough
    for a test to break something in the middle of it."""
    from objdl.objects import ObjectProducer

    class Throttled(ObjectProducer):
        def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> Any:
            if state and "offset" in state:
                time.sleep(delay)
            return super().produce(ref_id, obj, state, requester)

    return Throttled(**kwargs)


def fetch_file_progress_main(
    name: str, url: str, ref: str, dest: str, results: Any, kwargs: dict[str, Any]
) -> None:
    """Download `ref` to `dest`, reporting progress and then ("done", ok, reason)."""
    from objdl.cell import Cell
    from objdl.objects import DownloadError, download_file

    def progress(ref_id: str, done: int, total: Any, rate: float) -> None:
        results.put((name, "progress", done))

    with Cell(name, url, broker_timeout=1.0, heartbeat_interval=0.2) as cell:
        try:
            download_file(
                cell, "server", ref, dest, progress_cb=progress, progress_interval=0.1, **kwargs
            )
            results.put((name, "done", True, ""))
        except DownloadError as exc:
            results.put((name, "done", False, exc.reason))


def netns_owner_main(url: str, path: str, ref_file: str, delay: str) -> None:
    """Serve `path` (throttled) as "server"; write the ref to `ref_file`; run until killed."""
    from objdl.cell import Cell
    from objdl.downloader import ObjDownloader

    with Cell("server", url, broker_timeout=1.0, heartbeat_interval=0.2, start_timeout=20) as cell:
        from pathlib import Path

        producer = throttled_producer(float(delay), chunk_size=64 * 1024)
        tx = ObjDownloader.new_transaction(cell, producer, 120.0)
        ref = ObjDownloader.add_download_object(tx, Path(path))
        Path(ref_file + ".tmp").write_text(ref)
        os.replace(ref_file + ".tmp", ref_file)
        time.sleep(120)


def netns_site_main(url: str, ref: str, dest: str, progress_file: str) -> int:
    """Download `ref` to `dest`, writing progress to `progress_file`; exit 0 on success."""
    from pathlib import Path

    from objdl.cell import Cell
    from objdl.objects import DownloadError, download_file

    def progress(ref_id: str, done: int, total: Any, rate: float) -> None:
        Path(progress_file).write_text(str(done))

    with Cell("site-1", url, broker_timeout=1.0, heartbeat_interval=0.2, start_timeout=20) as cell:
        try:
            download_file(cell, "server", ref, dest, window=2, per_request_timeout=3.0, tries=4,
                          progress_cb=progress, progress_interval=0.05)  # fmt: skip
        except DownloadError as exc:
            print(f"FAILED: {exc.reason}", flush=True)
            return 1
    print("OK", flush=True)
    return 0


if __name__ == "__main__":  # python -m tests._procs FUNCTION ARG... (for `ip netns exec`)
    raise SystemExit(globals()[sys.argv[1]](*sys.argv[2:]) or 0)


def sealed_server_main(
    tag: str, url: str, keys: dict[str, str], results: Any, stop: Any, seconds: float
) -> None:
    """Serve ``ch/count`` as a keyed cell 'server' that reports each call; report stats at stop.

    `keys` holds the paths: ``secret`` (its key pair), ``broker`` (the broker's public
    key) and ``peers`` (the allow-list directory used as peer_keys).
    """
    from objdl.cell import Cell

    cell = Cell(
        "server",
        url,
        curve_keys=keys["secret"],
        broker_public_key=keys["broker"],
        peer_keys=keys["peers"],
    )
    cell.register_request_cb(
        "ch", "count", lambda req: results.put((tag, "ran", req.payload)) or None
    )
    with cell:
        results.put((tag, "ready", os.getpid()))
        stop.wait(seconds)
        results.put((tag, "stats", cell.secure_stats, cell.stats))


def direct_owner_main(url: str, path: str, results: Any, stop: Any) -> None:
    """Offer file `path` as "server" with a data socket on loopback; report
    ("ref", ref, data_url); serve until `stop`; report ("stats", link_stats)."""
    from objdl.cell import Cell
    from objdl.objects import offer_file

    with Cell("server", url, data_bind="tcp://127.0.0.1:*") as cell:
        ref = offer_file(cell, path)
        results.put(("ref", ref, cell.data_url))
        stop.wait(60)
        results.put(("stats", cell.link_stats))


class PeakRss:
    """The highest RSS of this process while in use (``with PeakRss() as mem``), sampled
    on a thread every `every` seconds; `base` is the RSS at the start, `growth` the
    peak above it."""

    def __init__(self, every: float = 0.002) -> None:
        import psutil  # (a test dependency; only the memory tests need it)

        self._proc = psutil.Process()
        self.base = self.peak = int(self._proc.memory_info().rss)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, int(self._proc.memory_info().rss))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    @property
    def growth(self) -> int:
        return self.peak - self.base
