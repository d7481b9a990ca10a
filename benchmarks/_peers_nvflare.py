"""NVFlare 2.9's file download as child processes for :mod:`benchmarks.bench_peers`.

How it works: NVFlare's f3 cellnet outside a job, as its own tests and ``dev_tools/f3``
benchmarks run it: the owner is the root cell ``server`` listening on a loopback port
(the FL server's place: NVFlare's sites connect to the server directly, so there is
no broker process), holding an ``ObjectDownloader`` transaction for N receivers with
the file added by ``file_downloader.add_file`` (its default chunk, 5 MiB). Each site
is a client cell ``site-N`` connected to that url; on ``GO`` it calls
``file_downloader.download_file`` (one request at a time, the file written with
``open(..., "wb")`` under a random name in the folder it is given), then renames the
file to its destination, as objdl's ``download_file`` does, before its clock stops.

The roles speak the benchmarks' child protocol (:mod:`benchmarks._util`): ``TAG
{json}`` lines on stdout, commands (``GO``, ``EXIT``) on stdin. nvflare is imported
only inside a role, so this module imports without it; :func:`nvflare_missing` says
whether it can run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import ChildError, Commands, emit

__all__ = ["NVFLARE_VERSION", "SCRIPT", "nvflare_missing", "nvflare_version"]

NVFLARE_VERSION = "2.9.0"  # the version the issue compares with (the `bench` extra pins it)
SCRIPT = os.path.abspath(__file__)
_OWNER = "server"
_LIFETIME = 3600.0  # a child ends itself after this long, whatever happens
_CONNECT = 30.0  # seconds a site waits for its cell to reach the server cell


def nvflare_version() -> str | None:
    """The installed nvflare's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("nvflare")
    except metadata.PackageNotFoundError:
        return None


def nvflare_missing() -> str | None:
    """Why NVFlare's file downloader cannot run here (None when it can)."""
    version = nvflare_version()
    if version is None:
        return (
            f"nvflare is not installed: pip install -e '.[bench]' (or pip install "
            f"nvflare=={NVFLARE_VERSION})"
        )
    try:
        from nvflare.fuel.f3.cellnet.cell import Cell  # noqa: F401
        from nvflare.fuel.f3.streaming.file_downloader import add_file  # noqa: F401
    except Exception as exc:  # a broken install: say what, never fail the benchmark
        return f"nvflare {version} is installed but its file downloader does not import: {exc}"
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _hold(cmds: Commands) -> None:
    """Wait for ``EXIT`` (or end of stdin, or the lifetime bound)."""
    deadline = time.monotonic() + _LIFETIME
    while time.monotonic() < deadline:
        if cmds.get(1.0) == "EXIT":
            return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _owner(path: str, sites: int, chunk: int | None) -> None:
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.streaming.file_downloader import add_file
    from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    url = f"tcp://127.0.0.1:{_free_port()}"
    cell = Cell(_OWNER, url, secure=False, credentials={})
    cell.start()
    try:
        downloader = ObjectDownloader(cell=cell, timeout=_LIFETIME, num_receivers=sites)
        ref = add_file(downloader, path, chunk_size=chunk)  # None: NVFlare's default
        emit("READY", {"pid": os.getpid(), "url": url, "ref": ref})
        _hold(cmds)
    finally:
        cell.stop()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _site(url: str, name: str, ref: str, dest: str, timeout: float, fsync: bool = False) -> None:
    from nvflare.fuel.f3.cellnet.cell import Cell
    from nvflare.fuel.f3.streaming.file_downloader import download_file

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    folder = os.path.dirname(dest)
    cell = Cell(name, url, secure=False, credentials={})
    connected = threading.Event()
    cell.set_cell_connected_cb(lambda *args, **kwargs: connected.set())
    cell.start()
    try:
        if not connected.wait(_CONNECT):
            raise ChildError(f"{name}: not connected to the server cell at {url} in {_CONNECT:g}s")
        emit("READY", {"pid": os.getpid()})
        cmds.expect("GO", _LIFETIME)
        ok, reason = True, ""
        t0 = time.monotonic()
        error, got = download_file(_OWNER, ref, timeout, cell, location=folder)
        if error is None and got:
            if fsync:
                _fsync_file(got)
            os.rename(got, dest)
            if fsync:
                _fsync_dir(folder)
        else:
            ok, reason = False, f"nvflare download_file: {error}"
            if got:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(got)
        t1 = time.monotonic()
        emit("DONE", {"t0": t0, "t1": t1, "ok": ok, "reason": reason})
        _hold(cmds)
    finally:
        cell.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="an NVFlare child role of bench_peers.py")
    p.add_argument("--role", required=True, choices=["nvflare-owner", "nvflare-site"])
    p.add_argument("--args", type=json.loads, default={})
    args = p.parse_args(argv)
    kw: dict[str, Any] = args.args
    try:
        if args.role == "nvflare-owner":
            _owner(**kw)
        else:
            _site(**kw)
    except (KeyboardInterrupt, ChildError) as exc:
        print(f"{args.role}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
