"""Summarize a py-spy ``raw`` recording: where a process's Python time went, per MiB moved.

How it works: a raw (collapsed-stack) file has one line per distinct stack,
``thread (TID): NAME;frame;frame;... COUNT``, counting samples in which that thread was
active (py-spy leaves idle samples out unless ``--idle``). At ``--rate`` samples per
second a sample stands for ``1000 / rate`` ms of one thread's time; dividing by the
MiB the process moved gives ms per MiB, comparable with the whole-process CPU figures
of the benchmarks (which also count native threads, such as libzmq's, that py-spy
does not see).

Usage: ``python benchmarks/_pyspy.py FILE... --mib 1024 [--rate 250] [--top 15]
[--chunks N]`` (with ``--chunks``, microseconds per chunk instead of ms per MiB).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

__all__ = ["load", "main", "report"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (path/to/file.py)``: group a function's lines."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def load(path: str) -> list[tuple[str, list[str], int]]:
    """The stacks of a raw py-spy file: (thread name, frames outermost first, samples)."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            body, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            parts = body.split(";")
            thread = parts[0]
            if ": " in thread:
                thread = thread.split(": ", 1)[1]
            thread = re.sub(r"-\d+$", "-N", thread)  # handler-3 -> handler-N
            stacks.append((thread, [_short(p) for p in parts[1:]], n))
    return stacks


def report(path: str, mib: float, rate: float, top: int = 15, chunks: int = 0) -> None:
    """Print per-thread totals, then the top functions by self and by inclusive time.

    In ms per MiB, or (with `chunks`, the number of chunks moved) in us per chunk.
    """
    stacks = load(path)
    if chunks:
        per_sample = 1e6 / rate / chunks  # us per chunk that one sample stands for
        unit = "us/chunk"
    else:
        per_sample = 1000.0 / rate / mib  # ms per MiB that one sample stands for
        unit = "ms/MiB"
    threads: Counter[str] = Counter()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for thread, frames, n in stacks:
        threads[thread] += n
        if frames:
            self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    total = sum(threads.values())
    print(f"{path}: {total} active samples = {total * per_sample:.2f} {unit} of Python time")
    print(f"  by thread ({unit}):")
    for thread, n in threads.most_common():
        print(f"    {n * per_sample:7.3f}  {thread}")
    print(f"  top {top} by self time ({unit}, share):")
    for func, n in self_t.most_common(top):
        print(f"    {n * per_sample:7.3f}  {100 * n / total:5.1f}%  {func}")
    print(f"  top {top} by inclusive time ({unit}, share):")
    for func, n in incl.most_common(top):
        print(f"    {n * per_sample:7.3f}  {100 * n / total:5.1f}%  {func}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("files", nargs="+")
    p.add_argument("--mib", type=float, required=True, help="MiB the process moved")
    p.add_argument("--rate", type=float, default=250.0, help="py-spy samples per second (250)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--chunks", type=int, default=0, help="chunks moved: report us per chunk")
    args = p.parse_args(argv)
    for path in args.files:
        report(path, args.mib, args.rate, args.top, args.chunks)
        print()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
