"""Helpers shared by the benchmarks: child processes, statistics, machine info, tables.

Every child is started with :class:`Child` (its own process, stdout read line by line
on a reader thread, stderr kept in a temporary file for the post-mortem) and ended
by its pid with :meth:`Child.stop`, which is idempotent and bounded. Children talk
to the parent in single lines ``TAG {json}`` on stdout.
"""

from __future__ import annotations

import contextlib
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
    "cpu_seconds",
    "emit",
    "machine_info",
    "median",
    "peak_rss_kib",
    "percentile",
    "print_table",
    "start_objdl_broker",
]


class ChildError(RuntimeError):
    """A child process failed to start, died, or did not answer in time."""


class Child:
    """A process we started; read its ``TAG {json}`` lines with :meth:`expect`.

    Use as a context manager, or call :meth:`stop` in ``finally``.
    """

    def __init__(self, name: str, argv: Sequence[str], cwd: str | None = None) -> None:
        self.name = name
        # kept open for the child's whole life and closed in stop()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
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

    def stop(self, timeout: float = 5.0) -> None:
        """End the process by its pid (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        proc = self.proc
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


def start_objdl_broker(extra: Sequence[str] = (), timeout: float = 10.0) -> tuple[Child, str]:
    """Run ``python -m broker`` on a free loopback port; return the child and its url."""
    child = Child(
        "objdl-broker",
        [sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:*", *extra],
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"objdl broker did not start within {timeout:g}s")
            try:
                line = child._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ChildError(f"objdl broker exited at start{child._tail()}")
            if "listening on" in line:
                return child, line.rsplit(" ", 1)[-1].strip()
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
