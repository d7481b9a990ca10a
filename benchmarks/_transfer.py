"""One file transfer from an owner to N sites, in one of three ways, measured from outside.

How it works: :func:`run_transfer` (the parent side) starts a broker, an owner and N
site processes on 127.0.0.1 (and, for a long link, a delaying proxy between the
sites and the broker), waits until all are idle and ready, records each one's
resident memory, resets its peak-memory mark and reads its CPU time, then tells
every site ``GO`` on its stdin. Each site times its own download and answers ``DONE``.
The parent then reads every process's CPU time and peak memory again, ends every
process by its pid (``finally``, bounded waits), checks the sha256 of every
destination file against the source, and deletes them.

The ways (``mode``):

- ``windowed``: objdl, :func:`objdl.objects.offer_file` / :func:`download_file`
  (a window of chunk requests in flight, digest checked on the site);
- ``direct``: the same, with the owner's cell made with ``data_bind`` (a data socket
  on 127.0.0.1): after the first reply, which goes through the broker and offers the
  link, the chunks go straight from owner to site. The run fails unless every site's
  link was up and the broker routed at most half the bytes (:mod:`benchmarks._direct`);
- ``seed``: objdl, the seed's exchange: :func:`objdl.downloader.download_object` with
  a plain :class:`~objdl.downloader.Consumer` that ``pwrite``s each chunk (one request
  at a time, no digest on the site), taking each chunk as ``bytes`` as the seed did;
- ``seed-views``: the same, with a consumer that sets ``accepts_views``: each chunk as a
  read-only view of the received frame, no copy (``seed`` against it is the copy's cost);
- ``dict``: objdl, the same bytes as a PyTorch-style state dict: the owner reads the
  file and views it as a few hundred fp32 and bf16 tensors of mixed sizes
  (:func:`state_layout`), offered with :func:`objdl.objects.offer_dict`; each site
  takes it with :func:`download_dict` and, after its clock stops, writes the tensors'
  bytes in order, so its file is the source again and its sha256 checks the dict;
- ``raw``: bare pyzmq with the same chunk size and window: a ROUTER relay forwarding by
  a destination frame, an owner DEALER answering ``(offset, length)`` with ``os.pread``,
  site DEALERs keeping `window` requests in flight. No digest, no headers, no handler
  threads: the ceiling.

Every mode does the same file I/O as objdl's :func:`download_file`, so that the
relay is a ceiling for the same work, not for less: the owner reads the file it
serves (``fstat`` and ``pread`` per chunk); the site creates a part file beside the
destination with ``O_EXCL``, sets its size with ``ftruncate``, writes each chunk at
its offset in the pieces objdl writes (``WRITE_PIECE`` of the objdl under test:
the page-cache folios a write allocates depend on its size), with ``fsync`` of the
file and of the rename when the plan says so, as ``download_file(fsync=True)``
does, and renames it into place before its clock stops.

Child processes run this file with ``--role``; they talk to the parent with
``TAG {json}`` lines on stdout and take commands (``GO``, ``STATS``, ``EXIT``) on stdin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._direct import (
    DATA_BIND,
    broker_share,
    direct_problem,
    link_report,
    routed_bytes,
    start_metered_broker,
)
from benchmarks._util import (
    Child,
    ChildError,
    Commands,
    cpu_seconds_fine,
    emit,
    file_sha256,
    peak_rss_kib,
    raw_hello,
    reset_peak_rss,
    rss_kib,
    system_busy_seconds,
    thread_cpu,
    thread_names,
)

__all__ = [
    "DEFAULT_MODES",
    "MODES",
    "Plan",
    "child_argv",
    "end_child",
    "others_share",
    "run_transfer",
    "state_layout",
    "write_source",
]

MODES = ("windowed", "direct", "aio", "seed", "seed-views", "dict", "raw")
DEFAULT_MODES = ("windowed", "seed", "raw")  # seed-views only when asked for
_THIS = os.path.abspath(__file__)
_PROXY = os.path.join(os.path.dirname(_THIS), "_proxy.py")
_OWNER = "server"
_RAW_OWNER = b"owner"
_LIFETIME = 3600.0  # a child ends itself after this long, whatever happens
_HDR = struct.Struct("!QI")  # raw relay request: offset, length
_SETTLE = 0.5  # seconds of quiet before the idle memory is read


# ---------------------------------------------------------------- child side: shared


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _hold(cmds: Commands, stats: Any = None) -> None:
    """Answer ``THREADS`` (and ``STATS`` with `stats()`) until ``EXIT`` or the lifetime bound."""
    deadline = time.monotonic() + _LIFETIME
    while time.monotonic() < deadline:
        if not _answer(cmds.get(1.0), stats):
            return


def _answer(got: str | None, stats: Any = None) -> bool:
    """Answer one command; False for ``EXIT``."""
    if got == "EXIT":
        return False
    if got == "THREADS":
        emit("THREADS", thread_names())
    elif got == "STATS" and stats is not None:
        emit("STATS", stats())
    return True


def _write_piece() -> int:
    """The most bytes objdl (the copy under test) puts in one ``pwrite``; 0 for no limit."""
    try:
        from objdl.objects import _file
    except ImportError:
        return 0
    return int(getattr(_file, "WRITE_PIECE", 0))  # older objdl: one call per chunk


def _pwrite_all(fd: int, data: Any, offset: int, piece: int = 0) -> int:
    """``pwrite`` all of `data` at `offset`, in calls that end on multiples of `piece`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        pos = offset + done
        end = view.nbytes if not piece else min(view.nbytes, done + piece - pos % piece)
        done += os.pwrite(fd, view[done:end], pos)
    return done


class _PartFile:
    """A destination written as objdl's FileConsumer writes one (see the module docstring)."""

    def __init__(self, dest: str, fsync: bool, piece: int) -> None:
        self.dest = dest
        self.fsync = fsync
        self.piece = piece
        folder, name = os.path.split(dest)
        self.part = os.path.join(folder, f".{name}.{os.getpid()}.objdl-part")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.part, flags, 0o644)

    def begin(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def write(self, data: Any, offset: int) -> int:
        return _pwrite_all(self.fd, data, offset, self.piece)

    def finish(self) -> None:
        """Flush (with `fsync`), close and rename into place."""
        if self.fsync:
            os.fsync(self.fd)
        self.close()
        os.rename(self.part, self.dest)
        if self.fsync:
            dirfd = os.open(os.path.dirname(self.dest) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part)


# ---------------------------------------------------------------- child side: objdl


def state_layout(size: int) -> list[tuple[str, str, int]]:
    """``(name, dtype, nbytes)`` of the tensors of a state dict of exactly `size` bytes.

    Sizes are log-uniform from 1 KiB to 16 MiB (a few hundred per GiB, as in a
    transformer's weights, biases and norms); every third tensor is bfloat16.
    """
    import random

    rng = random.Random(16)
    out: list[tuple[str, str, int]] = []
    left = size
    while left:
        n = min(left, int(2 ** rng.uniform(10, 24)) // 4 * 4 or 4)
        if left - n < 4:  # the remainder would be too small for a float32 tensor
            n = left
        dtype = "bfloat16" if len(out) % 3 == 2 and n % 2 == 0 else "float32"
        if n % 4 and dtype == "float32":
            dtype = "uint8"
        out.append((f"layers.{len(out)}.weight", dtype, n))
        left -= n
    return out


def _state_dict(path: str) -> dict[str, Any]:
    """The file's bytes as a state dict (views of one buffer: the dict itself, no more)."""
    import torch

    with open(path, "rb") as f:
        data = bytearray(f.read())
    out: dict[str, Any] = {}
    pos = 0
    for name, dtype, n in state_layout(len(data)):
        t = torch.frombuffer(
            data, dtype=getattr(torch, dtype), count=n // getattr(torch, dtype).itemsize, offset=pos
        )
        out[name] = t.reshape(-1, 64) if t.numel() % 64 == 0 else t
        pos += n
    return out


def _objdl_owner(
    url: str, path: str, chunk: int, mode: str = "windowed", direct: bool = False
) -> None:
    """Offer `path` (or, mode ``dict``, its bytes as a state dict) and hold it.

    With `direct`, the cell binds a data socket (``data_bind``), so that the sites'
    downloads are offered the direct link in their first reply.
    """
    from objdl.cell import Cell
    from objdl.objects import offer_dict, offer_file

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    with Cell(_OWNER, url, data_bind=DATA_BIND if direct else None) as cell:
        if mode == "dict":
            ref = offer_dict(cell, _state_dict(path), chunk_size=chunk, timeout=_LIFETIME)
        else:
            ref = offer_file(cell, path, chunk_size=chunk, timeout=_LIFETIME)
        emit("READY", {"pid": os.getpid(), "ref": ref, "data_url": cell.data_url})
        _hold(cmds, lambda: {**cell.stats, **cell.link_stats})


def _seed_consumer(dest: str, views: bool = False, fsync: bool = False) -> Any:
    """A seed-style Consumer: write each chunk at its offset, hand the owner's state back.

    With `views`, it opts in to read-only views of the received frames (no copy);
    without, it gets ``bytes``, as seed-era consumers do. Its file I/O is objdl's
    (:class:`_PartFile`), so that only the exchange differs from ``windowed``.
    """
    from objdl.downloader import Consumer

    piece = _write_piece()

    class FileSink(Consumer):
        accepts_views = views

        def __init__(self) -> None:
            super().__init__()
            self.file = _PartFile(dest, fsync, piece)
            self.pos = 0
            self.ok: bool | None = None
            self.reason = ""

        def consume(self, ref_id: str, state: dict, data: Any) -> dict:
            if "size" in state:  # the first reply: the object's description and chunk 0
                self.file.begin(state["size"])
            n = self.file.write(data, self.pos) if data is not None else 0
            self.pos += n
            if "size" in state:
                return {"offset": self.pos}
            if state.get("offset") != self.pos:
                raise ValueError(f"owner's offset {state.get('offset')} is not ours, {self.pos}")
            return state  # {"offset": next}, as the owner gave it

        def download_completed(self, ref_id: str) -> None:
            try:
                self.file.finish()
                self.ok = True
            except OSError as exc:
                self.download_failed(ref_id, f"could not move the file into place: {exc}")

        def download_failed(self, ref_id: str, reason: str) -> None:
            self.file.discard()
            self.ok, self.reason = False, reason

    return FileSink()


def _objdl_site(
    url: str,
    name: str,
    ref: str,
    dest: str,
    chunk: int,
    window: int,
    mode: str,
    timeout: float,
    fsync: bool = False,
    links: bool = True,
) -> None:
    """Download `ref` from the owner when told ``GO``; answer ``DONE`` with the times, the
    outcome and the cell's direct link to the owner (`links`: False refuses links, so a
    test can show that a direct run through the broker fails its check)."""
    from objdl.cell import Cell
    from objdl.downloader import download_object
    from objdl.objects import DownloadError, download_dict, download_file

    signal.signal(signal.SIGTERM, _interrupt)
    if mode == "aio":
        _aio_site(url, name, ref, dest, chunk, window, timeout, fsync)
        return
    if mode == "dict":  # as a trainer has: importing torch is not the download's cost
        import torch  # noqa: F401
    cmds = Commands()
    with Cell(name, url, direct_links=links) as cell:
        emit("READY", {"pid": os.getpid()})
        cmds.expect("GO", _LIFETIME)
        ok, reason = True, ""
        t0 = time.monotonic()
        if mode == "dict":
            got: dict[str, Any] = {}
            try:
                got = download_dict(
                    cell,
                    _OWNER,
                    ref,
                    window=window,
                    chunk_size=chunk,
                    per_request_timeout=timeout,
                )
            except DownloadError as exc:
                ok, reason = False, exc.reason
            t1 = time.monotonic()
            _write_tensors(got, dest)
        elif mode in ("windowed", "direct"):  # direct: the owner offered its data socket
            try:
                download_file(
                    cell,
                    _OWNER,
                    ref,
                    dest,
                    window=window,
                    chunk_size=chunk,
                    per_request_timeout=timeout,
                    fsync=fsync,
                )
            except DownloadError as exc:
                ok, reason = False, exc.reason
        else:
            sink = _seed_consumer(dest, views=mode == "seed-views", fsync=fsync)
            download_object(_OWNER, ref, timeout, cell, sink)
            ok, reason = sink.ok is True, sink.reason
        if mode != "dict":
            t1 = time.monotonic()
        link = link_report(cell, _OWNER)
        emit("DONE", {"t0": t0, "t1": t1, "ok": ok, "reason": reason, "link": link})
        _hold(cmds)


def _aio_site(
    url: str, name: str, ref: str, dest: str, chunk: int, window: int, timeout: float, fsync: bool
) -> None:
    """The ``windowed`` site written for asyncio: ``await objdl.aio.download_file``."""
    import asyncio

    from objdl import aio

    cmds = Commands()

    async def main() -> None:
        async with aio.Cell(name, url) as cell:
            emit("READY", {"pid": os.getpid()})
            await asyncio.to_thread(cmds.expect, "GO", _LIFETIME)
            ok, reason = True, ""
            t0 = time.monotonic()
            try:
                await aio.download_file(
                    cell,
                    _OWNER,
                    ref,
                    dest,
                    window=window,
                    chunk_size=chunk,
                    per_request_timeout=timeout,
                    fsync=fsync,
                )
            except aio.DownloadError as exc:
                ok, reason = False, exc.reason
            t1 = time.monotonic()
            emit("DONE", {"t0": t0, "t1": t1, "ok": ok, "reason": reason})
            await asyncio.to_thread(_hold, cmds)

    asyncio.run(main())


def _write_tensors(state: dict[str, Any], dest: str) -> None:
    """Write the tensors' bytes in order to `dest` (views: no copy of the result)."""
    import torch

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pos = 0
        for t in state.values():
            pos += _pwrite_all(fd, t.reshape(-1).view(torch.uint8).numpy(), pos)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- child side: raw pyzmq


def _raw_socket(ctx: Any, kind: int, identity: bytes | None = None) -> Any:
    sock = ctx.socket(kind)
    sock.linger = 0
    if identity is not None:
        sock.routing_id = identity
    return sock


def _raw_relay() -> None:
    import zmq

    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    cmds = Commands()
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.ROUTER)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind("tcp://127.0.0.1:*")
        emit("READY", {"url": sock.getsockopt_string(zmq.LAST_ENDPOINT), "pid": os.getpid()})
        deadline = time.monotonic() + _LIFETIME
        while not stop[0] and time.monotonic() < deadline:
            if not sock.poll(200, zmq.POLLIN):
                if not _answer(cmds.get(0)):
                    return
                continue
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(frames) < 2:
                    continue
                src, dest = frames[0].bytes, frames[1].bytes
                # [dest, ...] from src goes out as [src, ...] to dest; b"" is hello.
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart([dest or src, src, *frames[2:]], zmq.NOBLOCK, copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


def _raw_owner(url: str, path: str) -> None:
    import zmq

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.DEALER, _RAW_OWNER)
    fd = os.open(path, os.O_RDONLY)
    try:
        sock.connect(url)
        raw_hello(sock)
        emit("READY", {"pid": os.getpid()})
        deadline = time.monotonic() + _LIFETIME
        while time.monotonic() < deadline:
            if not sock.poll(200, zmq.POLLIN):
                if not _answer(cmds.get(0)):
                    return
                continue
            for _ in range(256):
                try:
                    src, hdr = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:
                    continue
                offset, length = _HDR.unpack(hdr)
                os.fstat(fd)  # objdl checks the size before every read
                data = os.pread(fd, length, offset)
                sock.send_multipart([src, hdr, data], copy=False)
    finally:
        os.close(fd)
        sock.close(linger=0)
        ctx.term()


def _raw_site(
    url: str,
    name: str,
    dest: str,
    size: int,
    chunk: int,
    window: int,
    timeout: float,
    fsync: bool = False,
) -> None:
    import zmq

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.DEALER, name.encode())
    sock.rcvtimeo = int(timeout * 1000)
    out: _PartFile | None = None
    piece = _write_piece()  # imports objdl: before the clock starts
    try:
        sock.connect(url)
        raw_hello(sock)
        emit("READY", {"pid": os.getpid()})
        cmds.expect("GO", _LIFETIME)
        ok, reason = True, ""
        t0 = time.monotonic()
        out = _PartFile(dest, fsync, piece)  # created in the clock, as objdl's begin() does
        out.begin(size)
        nxt = got = 0
        inflight = 0
        try:
            while got < size:
                while inflight < window and nxt < size:
                    n = min(chunk, size - nxt)
                    sock.send_multipart([_RAW_OWNER, _HDR.pack(nxt, n)])
                    nxt += n
                    inflight += 1
                _, hdr, data = sock.recv_multipart(copy=False)
                offset, length = _HDR.unpack(hdr.bytes)
                if len(data) != length:
                    raise RuntimeError(f"got {len(data)} bytes at {offset}, asked {length}")
                got += out.write(data.buffer, offset)
                inflight -= 1
            out.finish()
        except (zmq.Again, RuntimeError, ValueError, OSError) as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
            out.discard()
        t1 = time.monotonic()
        emit("DONE", {"t0": t0, "t1": t1, "ok": ok, "reason": reason})
        _hold(cmds)
    finally:
        if out is not None:
            out.close()
        sock.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- parent side


def child_argv(script: str, role: str, **kwargs: Any) -> list[str]:
    """The command line that runs `role` of `script` with `kwargs` as its json arguments."""
    return [sys.executable, script, "--role", role, "--args", json.dumps(kwargs)]


def end_child(child: Child, timeout: float = 5.0) -> None:
    """Ask a child to exit (``EXIT`` on stdin), give it `timeout` s, then end it by its pid."""
    if child.proc.poll() is None and child.proc.stdin is not None and child.send("EXIT"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout)
    child.stop()


def write_source(path: str, size: int) -> str:
    """Write `size` random bytes to `path`; return their sha256 (hex)."""
    import hashlib

    h = hashlib.sha256()
    block = 16 * 1024 * 1024
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            f.write(data)
            h.update(data)
            left -= len(data)
    return h.hexdigest()


@dataclass
class Plan:
    """One transfer to run: which way, to how many sites, of which file, how."""

    mode: str
    sites: int
    src: str
    size: int
    digest: str
    chunk: int
    window: int
    workdir: str
    delay: float | None = None  # one-way delay of a proxy between sites and broker
    fsync: bool = False  # the sites fsync the file and the rename (download_file(fsync=True))
    profile_dir: str | None = None  # py-spy the owner, broker and first site into here
    profile_rate: int = 250
    profile_roles: tuple[str, ...] = ("owner", "broker", "site")
    profile_gil: bool = False  # sample only the thread holding the GIL (pure Python time)
    request_timeout: float = 30.0
    tag: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _budget(plan: Plan) -> float:
    """A bound on the transfer: generous (5 MiB/s), so only a real hang trips it."""
    return 120.0 + plan.sites * plan.size / (5 * 1024 * 1024)


def _start_pyspy(plan: Plan, role: str, pid: int) -> subprocess.Popen[bytes] | None:
    assert plan.profile_dir is not None
    out = os.path.join(plan.profile_dir, f"{plan.tag or plan.mode}-{role}.txt")
    argv = ["py-spy", "record", "-p", str(pid), "-f", "raw", "-o", out, "--threads"]
    argv += ["--nonblocking", "-r", str(plan.profile_rate)]
    if plan.profile_gil:
        argv.append("--gil")
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError as exc:
        print(f"  (py-spy not started for {role}: {exc})", file=sys.stderr)
        return None


def _stop_pyspy(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for p in procs:
        try:
            p.wait(20.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5.0)


def run_transfer(plan: Plan) -> dict[str, Any]:
    """Run one transfer; return its measurements (see the module docstring)."""
    if plan.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {plan.mode!r}")
    children: list[Child] = []
    spies: list[subprocess.Popen[bytes]] = []
    dests = [
        os.path.join(plan.workdir, f"dst-{plan.mode}-{i}-{os.getpid()}.bin")
        for i in range(plan.sites)
    ]
    result: dict[str, Any] = {"mode": plan.mode, "sites": plan.sites, "size": plan.size}
    metrics_url: str | None = None
    try:
        if plan.mode == "raw":
            broker = Child("raw-relay", child_argv(_THIS, "raw-relay"), stdin=True)
            children.append(broker)
            url = broker.expect("READY", 30.0)["url"]
        else:
            broker, url, metrics_url = start_metered_broker()
            children.append(broker)
        site_url = url
        proxy = None
        if plan.delay is not None:
            argv = [sys.executable, _PROXY, "--upstream", url, "--delay", str(plan.delay)]
            proxy = Child("proxy", argv, stdin=True)
            children.append(proxy)
            site_url = proxy.expect("READY", 30.0)["url"]

        hash_time = 60.0 + plan.size / (20 * 1024 * 1024)
        if plan.mode == "raw":
            owner = Child(
                "raw-owner", child_argv(_THIS, "raw-owner", url=url, path=plan.src), stdin=True
            )
            children.append(owner)
            owner.expect("READY", 30.0)
        else:
            argv = child_argv(
                _THIS,
                "objdl-owner",
                url=url,
                path=plan.src,
                chunk=plan.chunk,
                mode=plan.mode,
                direct=plan.mode == "direct",
            )
            owner = Child("objdl-owner", argv, stdin=True)
            children.append(owner)
            ref = owner.expect("READY", hash_time)["ref"]

        sites: list[Child] = []
        for i, dest in enumerate(dests):
            name = f"site-{i + 1}"
            if plan.mode == "raw":
                argv = child_argv(
                    _THIS,
                    "raw-site",
                    url=site_url,
                    name=name,
                    dest=dest,
                    size=plan.size,
                    chunk=plan.chunk,
                    window=plan.window,
                    timeout=plan.request_timeout,
                    fsync=plan.fsync,
                )
            else:
                argv = child_argv(
                    _THIS,
                    "objdl-site",
                    url=site_url,
                    name=name,
                    ref=ref,
                    dest=dest,
                    chunk=plan.chunk,
                    window=plan.window,
                    mode=plan.mode,
                    timeout=plan.request_timeout,
                    fsync=plan.fsync,
                )
            site = Child(name, argv, stdin=True)
            children.append(site)
            sites.append(site)
        for site in sites:
            site.expect("READY", 60.0)

        roles = {"owner": owner, "broker": broker}
        roles.update({s.name: s for s in sites})
        time.sleep(_SETTLE)
        idle = {r: rss_kib(c.pid) for r, c in roles.items()}
        peak_reset = all(reset_peak_rss(c.pid) for c in roles.values())
        cpu0 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
        if proxy is not None:
            cpu0["proxy"] = cpu_seconds_fine(proxy.pid)
        threads0 = {r: thread_cpu(c.pid) for r, c in roles.items()}
        busy0, wall0 = system_busy_seconds(), time.monotonic()
        if plan.profile_dir:
            for role, child in (("owner", owner), ("broker", broker), ("site", sites[0])):
                if role not in plan.profile_roles:
                    continue
                spy = _start_pyspy(plan, role, child.pid)
                if spy is not None:
                    spies.append(spy)
            time.sleep(1.0)  # let py-spy attach before the transfer starts

        started = time.monotonic()
        for site in sites:
            site.send("GO")
        budget = _budget(plan)
        done = []
        for site in sites:
            left = max(1.0, started + budget - time.monotonic())
            done.append(site.expect("DONE", left))
        cpu1 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
        if proxy is not None:
            cpu1["proxy"] = cpu_seconds_fine(proxy.pid)
        busy1, wall1 = system_busy_seconds(), time.monotonic()
        threads1 = {r: thread_cpu(c.pid) for r, c in roles.items()}
        peak = {r: peak_rss_kib(c.pid) for r, c in roles.items()}
        _stop_pyspy(spies)
        spies = []
        names: dict[str, dict[str, str]] = {}
        for role, child in roles.items():
            if child.proc.stdin is not None and child.send("THREADS"):
                with contextlib.suppress(ChildError):
                    names[role] = child.expect("THREADS", 10.0)
        result["threads_s"] = _by_thread(roles, threads0, threads1, names, cpu0, cpu1)

        result["ok"] = [d["ok"] for d in done]
        result["reasons"] = [d["reason"] for d in done if not d["ok"]]
        _check_path(plan, result, routed_bytes(metrics_url), [d.get("link") for d in done])
        result["t0"] = [d["t0"] for d in done]
        result["t1"] = [d["t1"] for d in done]
        result["idle_kib"] = idle
        result["peak_kib"] = peak
        result["peak_reset"] = peak_reset
        result["others_share"] = others_share(busy0, busy1, wall1 - wall0, cpu0, cpu1)
        result["cpu_s"] = {
            r: (None if cpu1.get(r) is None or cpu0.get(r) is None else cpu1[r] - cpu0[r])  # type: ignore[operator]
            for r in cpu0
        }
    finally:
        _stop_pyspy(spies)
        for child in reversed(children):  # sites first, the broker last
            end_child(child)

    try:
        digests_ok = 0
        for dest in dests:
            if os.path.exists(dest) and file_sha256(dest) == plan.digest:
                digests_ok += 1
        result["digests_ok"] = digests_ok
    finally:
        for dest in dests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
        for leftover in os.listdir(plan.workdir):  # a part file of a failed run
            if leftover.endswith(".objdl-part"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(plan.workdir, leftover))
    return _derive(result)


def _check_path(plan: Plan, result: dict[str, Any], routed: int | None, links: list[Any]) -> None:
    """Record what crossed the broker; a ``direct`` run that did not take the link fails."""
    moved = plan.sites * plan.size
    result["broker_routed_bytes"] = routed
    result["broker_share"] = broker_share(routed, moved)
    result["links"] = links
    if plan.mode != "direct":
        return
    why = direct_problem(routed, moved, links)
    result["direct_problem"] = why
    if why:
        result["ok"] = [False] * plan.sites
        result["reasons"].append(why)


def _thread_label(tid: int, pid: int, comm: str, names: dict[str, str]) -> str:
    name = names.get(str(tid))
    if name is None:
        if comm.startswith("ZMQbg"):
            name = comm
        elif tid == pid:
            name = "MainThread"
        else:
            name = "other thread"  # e.g. the objdl broker's I/O thread (it takes no commands)
    name = re.sub(r"^objdl-broker .*", "broker io", name)
    name = re.sub(r"^objdl-.*-(io|handler-\d+|txmonitor)$", r"cell \1", name)
    return re.sub(r"-\d+$", "-N", name)


def _by_thread(
    roles: dict[str, Child],
    before: dict[str, dict[int, tuple[str, float]]],
    after: dict[str, dict[int, tuple[str, float]]],
    names: dict[str, dict[str, str]],
    cpu0: dict[str, float | None],
    cpu1: dict[str, float | None],
) -> dict[str, dict[str, float]]:
    """CPU seconds per thread kind per role ("sites" sums every site), during the transfer.

    Threads that ended before the end of the transfer (a download's hashing thread,
    say) are no longer listed: what the process used beyond its live threads is
    shown as "ended threads".
    """
    out: dict[str, dict[str, float]] = {}
    for role, child in roles.items():
        group = out.setdefault("sites" if role.startswith("site-") else role, {})
        live = 0.0
        for tid, (comm, sec) in after[role].items():
            base = before[role].get(tid, (comm, 0.0))[1]
            label = _thread_label(tid, child.pid, comm, names.get(role, {}))
            group[label] = group.get(label, 0.0) + sec - base
            live += sec - base
        c0, c1 = cpu0.get(role), cpu1.get(role)
        # Below a few clock ticks, the difference is the coarser total's rounding.
        if c0 is not None and c1 is not None and c1 - c0 - live > 3 / os.sysconf("SC_CLK_TCK"):
            group["ended threads"] = group.get("ended threads", 0.0) + c1 - c0 - live
    return out


def others_share(
    busy0: float | None,
    busy1: float | None,
    wall: float,
    cpu0: dict[str, float | None],
    cpu1: dict[str, float | None],
) -> float | None:
    """Share of the machine's CPUs busy with other work (not ours) during the transfer."""
    if busy0 is None or busy1 is None or wall <= 0:
        return None
    ours = sum((cpu1[r] or 0.0) - (cpu0[r] or 0.0) for r in cpu0)
    return max(0.0, (busy1 - busy0 - ours) / (wall * (os.cpu_count() or 1)))


def _derive(r: dict[str, Any]) -> dict[str, Any]:
    mib = r["size"] / (1024 * 1024)
    spans = [t1 - t0 for t0, t1 in zip(r["t0"], r["t1"], strict=True)]
    whole = max(r["t1"]) - min(r["t0"])
    r["seconds"] = whole
    r["agg_mibps"] = mib * r["sites"] / whole if whole > 0 else float("inf")
    r["site_mibps"] = [mib / s if s > 0 else float("inf") for s in spans]
    total = mib * r["sites"]
    cpu = r["cpu_s"]
    site_cpu = [v for k, v in cpu.items() if k.startswith("site-")]
    r["cpu_ms_per_mib"] = {
        "owner": None if cpu.get("owner") is None else cpu["owner"] * 1000 / total,
        "broker": None if cpu.get("broker") is None else cpu["broker"] * 1000 / total,
        "sites": None if None in site_cpu else sum(site_cpu) * 1000 / total,
    }
    if "proxy" in cpu and cpu["proxy"] is not None:
        r["cpu_ms_per_mib"]["proxy"] = cpu["proxy"] * 1000 / total
    r["thread_ms_per_mib"] = {
        role: {label: sec * 1000 / total for label, sec in threads.items()}
        for role, threads in r.get("threads_s", {}).items()
    }
    return r


# ---------------------------------------------------------------- child entry point


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a child role of the download benchmarks")
    p.add_argument(
        "--role",
        required=True,
        choices=["objdl-owner", "objdl-site", "raw-relay", "raw-owner", "raw-site"],
    )
    p.add_argument("--args", type=json.loads, default={})
    args = p.parse_args(argv)
    kw = args.args
    try:
        if args.role == "objdl-owner":
            _objdl_owner(**kw)
        elif args.role == "objdl-site":
            _objdl_site(**kw)
        elif args.role == "raw-relay":
            _raw_relay()
        elif args.role == "raw-owner":
            _raw_owner(**kw)
        else:
            _raw_site(**kw)
    except (KeyboardInterrupt, ChildError):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
