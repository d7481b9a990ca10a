"""How a site's file writes cost CPU: objdl's write path alone, no sockets.

How it works: each trial writes SIZE bytes into a new file in ``--dir`` (an ordinary
disk by default) in 2 MiB chunks, the way ``FileConsumer`` does (``ftruncate`` to the
size, then ``write_pieces`` per chunk), from a ring of ``--ring`` chunk buffers as the
receive window would hand them over. Variants change one thing each; they alternate
trial by trial (after a ``--gap`` pause, so every trial starts with memory freed as
long ago) and the file is removed after each. Per trial: the writing thread's CPU
(user+sys), wall time, and the CPU of every 64 MiB, to see where the cost grows;
the whole machine's busy CPU (``/proc/stat``: kernel writeback threads too, and other
work); with ``--sync``, an ``fdatasync`` after the clock so every variant's writeback is
counted; with ``--readback``, what reading the file next costs (cached or not).

Variants: ``base`` (FileConsumer today), ``nocache`` (``FileConsumer(cache=False)``:
objdl's write-behind), ``p64k``..``p2m`` (other write pieces), ``falloc``
(``posix_fallocate`` instead of ``ftruncate``), ``writev`` (one ``pwritev`` of
256 KiB pieces per chunk), ``behind``/``behind32`` (``posix_fadvise`` DONTNEED only,
no waiting), ``sfr`` and ``cb16``..``cb64`` (``sync_file_range`` write-behind by
windows, or per chunk with that many MiB waiting), ``direct`` (``O_DIRECT`` through
an aligned bounce buffer).

Usage::

    python benchmarks/bench_file_write.py --size 1GiB --repeat 3 --sync --readback
    python benchmarks/bench_file_write.py --size 256MiB,1GiB --variants base,p2m,cb32 --segs
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import mmap
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import parse_size
from objdl.objects import _file

CHUNK = 2 * 1024 * 1024
SEG = 64 * 1024 * 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def _busy() -> float:
    """Seconds of CPU the whole machine spent busy (all CPUs, all processes, kernel)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def _vm(keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in keys:
                out[k] = int(v)
    return out


VM_KEYS = ("pgalloc_normal", "pgalloc_dma32", "nr_dirty", "pgfree")


class Writer:
    """One way of writing: open, write(chunk at offset), close."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        os.ftruncate(fd, size)

    def write(self, off: int, view: memoryview) -> None:
        _file.write_pieces(self.fd, view, off)

    def close(self) -> None:
        pass


def pieces(n: int) -> type[Writer]:
    class P(Writer):
        def write(self, off: int, view: memoryview) -> None:
            _file.write_pieces(self.fd, view, off, n)

    return P


class Falloc(Writer):
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        os.posix_fallocate(fd, 0, size)


class Writev(Writer):
    def write(self, off: int, view: memoryview) -> None:
        p = _file.WRITE_PIECE
        parts = [view[i : i + p] for i in range(0, view.nbytes, p)]
        done = os.pwritev(self.fd, parts, off)
        assert done == view.nbytes


class Behind(Writer):
    """Write-behind: start writeback of each finished window, drop it LAG later."""

    window = 8 * 1024 * 1024
    lag = 4

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self.started = 0  # bytes [0, started) handed to writeback
        self.dropped = 0

    def write(self, off: int, view: memoryview) -> None:
        _file.write_pieces(self.fd, view, off)
        end = off + view.nbytes
        w = self.window
        while self.started + w <= end:
            os.posix_fadvise(self.fd, self.started, w, os.POSIX_FADV_DONTNEED)  # writeback
            self.started += w
        while self.dropped + w * self.lag <= self.started:
            os.posix_fadvise(self.fd, self.dropped, w, os.POSIX_FADV_DONTNEED)  # drop clean
            self.dropped += w


class BehindWait(Behind):
    """Write-behind with ``sync_file_range``: wait for a window's writeback, then drop it."""

    def write(self, off: int, view: memoryview) -> None:
        _file.write_pieces(self.fd, view, off)
        end = off + view.nbytes
        w = self.window
        while self.started + w <= end:
            _sfr(self.fd, self.started, w, _SFR_WRITE)
            self.started += w
        while self.dropped + w * self.lag <= self.started:
            _sfr(self.fd, self.dropped, w, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            os.posix_fadvise(self.fd, self.dropped, w, os.POSIX_FADV_DONTNEED)
            self.dropped += w


class ChunkBehind(Writer):
    """Per chunk: start its writeback; once LAG bytes wait, wait for the oldest and drop it."""

    lag = 32 * 1024 * 1024

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self.fifo: collections.deque[tuple[int, int]] = collections.deque()
        self.waiting = 0

    def write(self, off: int, view: memoryview) -> None:
        _file.write_pieces(self.fd, view, off)
        n = view.nbytes
        _sfr(self.fd, off, n, _SFR_WRITE)
        self.fifo.append((off, n))
        self.waiting += n
        while self.waiting > self.lag:
            o, k = self.fifo.popleft()
            self.waiting -= k
            _sfr(self.fd, o, k, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            os.posix_fadvise(self.fd, o, k, os.POSIX_FADV_DONTNEED)


def chunk_behind(lag_mib: int) -> type[Writer]:
    class C(ChunkBehind):
        pass

    C.lag = lag_mib * 1024 * 1024
    return C


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _sfr(fd: int, off: int, n: int, flags: int) -> None:
    if _libc.sync_file_range(fd, off, n, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def behind(window_mib: int, lag: int) -> type[Writer]:
    class B(Behind):
        pass

    B.window = window_mib * 1024 * 1024
    B.lag = lag
    return B


class Direct(Writer):
    """O_DIRECT through an aligned bounce buffer (opened by the runner)."""

    direct = True

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self.buf = mmap.mmap(-1, CHUNK)
        self.bv = memoryview(self.buf)

    def write(self, off: int, view: memoryview) -> None:
        n = view.nbytes
        self.bv[:n] = view
        done = os.pwrite(self.fd, self.bv[:n], off)
        assert done == n

    def close(self) -> None:
        self.bv.release()
        self.buf.close()


class NoCache(Writer):
    """What ``FileConsumer(cache=False)`` does: objdl's own write-behind."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        self.behind = _file._WriteBehind(fd)

    def write(self, off: int, view: memoryview) -> None:
        _file.write_pieces(self.fd, view, off)
        self.behind.wrote(off, view.nbytes)

    def close(self) -> None:
        self.behind.finish()


VARIANTS: dict[str, Callable[[int, int], Writer]] = {
    "base": Writer,
    "nocache": NoCache,
    "p64k": pieces(64 * 1024),
    "p128k": pieces(128 * 1024),
    "p512k": pieces(512 * 1024),
    "p2m": pieces(2 * 1024 * 1024),
    "falloc": Falloc,
    "writev": Writev,
    "behind": behind(8, 4),
    "behind32": behind(32, 2),
    "sfr": BehindWait,
    "direct": Direct,
    "cb16": chunk_behind(16),
    "cb32": chunk_behind(32),
    "cb64": chunk_behind(64),
}


def trial(
    name: str,
    folder: str,
    size: int,
    ring: list[memoryview],
    sync: bool,
    shuffle: bool,
    readback: bool = False,
) -> dict[str, Any]:
    make = VARIANTS[name]
    path = os.path.join(folder, f"w-{name}.bin")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    if getattr(make, "direct", False):
        flags |= os.O_DIRECT
    vm0 = _vm(VM_KEYS)
    b0, t0, c0 = _busy(), time.perf_counter(), _cpu()
    fd = os.open(path, flags, 0o600)
    try:
        w = make(fd, size)
        segs = []
        cs = c0
        offs = list(range(0, size, CHUNK))
        if shuffle:  # as a window of 8 requests answered out of order would
            rnd = random.Random(size)
            for i in range(0, len(offs), 8):
                part = offs[i : i + 8]
                rnd.shuffle(part)
                offs[i : i + 8] = part
        for i, off in enumerate(offs):
            w.write(off, ring[i % len(ring)])
            if (i + 1) * CHUNK % SEG == 0:
                c = _cpu()
                segs.append(c - cs)
                cs = c
        w.close()
        c1, t1, b1 = _cpu(), time.perf_counter(), _busy()
        vm1 = _vm(VM_KEYS)
        if sync:  # every variant ends with its bytes on the disk: writeback counted
            os.fdatasync(fd)
    finally:
        os.close(fd)
    c2, t2, b2 = _cpu(), time.perf_counter(), _busy()
    read_cpu = read_wall = 0.0
    if readback:  # what a reader of the file pays next (cached or not)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        buf = bytearray(8 * 1024 * 1024)
        c3, t3 = _cpu(), time.perf_counter()
        try:
            off = 0
            while got := os.preadv(fd, [buf], off):
                off += got
        finally:
            os.close(fd)
        read_cpu, read_wall = _cpu() - c3, time.perf_counter() - t3
    os.unlink(path)
    return {
        "cpu": c1 - c0,
        "wall": t1 - t0,
        "busy": b1 - b0,
        "sync_cpu": c2 - c1,
        "sync_wall": t2 - t1,
        "sync_busy": b2 - b1,
        "read_cpu": read_cpu,
        "read_wall": read_wall,
        "segs": segs,
        "vm": {k: vm1[k] - vm0[k] for k in VM_KEYS},
        "dirty_end": vm1["nr_dirty"] * 4096 >> 20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="base,nocache,direct", help=", ".join(VARIANTS))
    ap.add_argument("--dir", default="/work/benchtmp/disk-cpu")
    ap.add_argument("--gap", type=float, default=3.0)
    ap.add_argument("--ring", type=int, default=8)
    ap.add_argument("--sync", action="store_true", help="fdatasync after each trial")
    ap.add_argument("--shuffle", action="store_true", help="chunks out of order by 8s")
    ap.add_argument("--readback", action="store_true", help="read the file back, timed")
    ap.add_argument("--segs", action="store_true", help="print CPU per 64 MiB")
    args = ap.parse_args()
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            sys.exit(f"unknown variant {n}; known: {', '.join(VARIANTS)}")
    os.makedirs(args.dir, exist_ok=True)
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(args.ring)]
    for b in bufs:
        b.write(os.urandom(CHUNK))
    ring = [memoryview(b) for b in bufs]
    for size_s in args.size.split(","):
        size = parse_size(size_s)
        res: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.repeat):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                time.sleep(args.gap)
                x = trial(n, args.dir, size, ring, args.sync, args.shuffle, args.readback)
                res[n].append(x)
                mib = size / 2**20
                print(
                    f"  {size_s} {n:9s} rep {r + 1}: cpu {x['cpu']:.3f} s"
                    f" ({float(x['cpu']) / mib * 1024:.2f} s/GiB), "
                    f"{mib / float(x['wall']):.0f} MiB/s, machine busy {x['busy']:.2f} s; "
                    f"sync {x['sync_wall']:.2f} s wall, {x['sync_cpu']:.2f} cpu, "
                    f"{x['sync_busy']:.2f} busy; read back {x['read_cpu']:.2f} cpu "
                    f"{x['read_wall']:.2f} wall; vm {x['vm']}",
                    flush=True,
                )
                if args.segs:
                    print("    per 64MiB ms:", " ".join(f"{s * 1000:.0f}" for s in x["segs"]))
        print(f"\n{size_s}: medians over {args.repeat} (s/GiB: CPU seconds per GiB written)")
        print(
            f"{'variant':9s} {'cpu s/GiB':>9s} {'MiB/s':>7s} {'busy s/GiB':>10s}"
            f" {'+sync busy':>10s} {'sync s':>6s} {'read cpu s':>10s}  cpu s/GiB each"
        )
        gib = size / 2**30
        for n in names:
            xs = res[n]

            def med(key: str, xs: list[dict[str, Any]] = xs) -> float:
                return statistics.median(float(x[key]) for x in xs)

            rate = statistics.median(size / 2**20 / float(x["wall"]) for x in xs)
            total = statistics.median(float(x["busy"]) + float(x["sync_busy"]) for x in xs)
            print(
                f"{n:9s} {med('cpu') / gib:9.2f} {rate:7.0f} {med('busy') / gib:10.2f}"
                f" {total / gib:10.2f} {med('sync_wall'):6.2f} {med('read_cpu'):10.2f}  "
                + " ".join(f"{float(x['cpu']) / gib:.2f}" for x in xs)
            )
        print()


if __name__ == "__main__":
    main()
