"""One file from one owner to N sites: objdl beside NVFlare 2.9 and a bare pyzmq relay.

How it works: for every case (N sites x a file size), every repeat and every folder,
each system runs once, interleaved (objdl, objdl-direct, nvflare, relay, objdl, ...),
as its own set of processes on 127.0.0.1, through one harness
(:func:`benchmarks._peers_run.run_peer`): the same random source file, the owner and
N sites started and released together, each site timing its own download, every
destination's sha256 checked against the source's after the run. Before each run the
benchmark waits until the machine is quiet (``--quiet``), then ``--gap`` seconds
(memory freed that long ago costs every system the same; see ``bench_download.py``),
and runs again, keeping the quietest of 3 tries, while other work took more than
``--max-others`` of the CPUs during the run.

The systems, each with its defaults:

- ``objdl``: ``objdl.objects.offer_file`` / ``download_file`` through objdl's broker
  (chunk 2 MiB, window 8: the library's defaults, which are also the best settings
  documented for loopback in docs/PERFORMANCE.md; ``--chunk``/``--window`` change them,
  for the relay too);
- ``objdl-direct``: the same, the owner's cell made with ``data_bind`` (a data socket on
  127.0.0.1): the broker carries each site's first reply, which offers the link, and the
  chunks then go owner -> site directly (same chunk and window). Each run is checked:
  every site's link up at its end, and the broker's routed bytes (read from its
  ``--metrics``, so this system needs ``prometheus_client``) at most half the bytes
  moved; otherwise the run fails, loudly (``benchmarks/_direct.py``);
- ``nvflare``: NVFlare 2.9's ``ObjectDownloader`` with ``file_downloader.add_file`` /
  ``download_file`` (5 MiB chunks, its default; one request at a time), the root cell
  ``server`` as owner and a client cell per site (no broker: NVFlare's sites connect
  to the server);
- ``relay``: a bare pyzmq DEALER -> ROUTER -> DEALER relay with objdl's chunk and window
  and objdl's file I/O (``benchmarks/_transfer.py``, mode ``raw``): the ceiling for the
  broker path.

A system whose package is missing is skipped with a message saying how to install it.
Files go to an ordinary file system (a new folder under the current directory, or
``--tmpdir``) and to tmpfs (``--tmpfs``, /dev/shm), one table each. Printed, per case:
aggregate and per-site MiB/s (medians over ``--repeat``), peak RSS per role (idle→peak,
MiB), CPU seconds per GiB moved per role, the share of the bytes moved that crossed
objdl's broker (``via broker``), every ratio between two systems (objdl/objdl-direct,
objdl-direct/nvflare, objdl-direct/relay, ...), and issue 13's targets marked PASS or
MISS. ``--plot PATH`` draws MiB/s against sites for each
system (first folder: the disk) with matplotlib.

Usage::

    pip install -e '.[bench]'                      # nvflare==2.9.0, matplotlib, prometheus
    python benchmarks/bench_peers.py               # every case, disk and tmpfs, 3 repeats
    python benchmarks/bench_peers.py --plot        # ... and docs/peers.png
    python benchmarks/bench_peers.py --cases 1x256MiB,4x256MiB --systems objdl,nvflare
    python benchmarks/bench_peers.py --systems objdl,objdl-direct,relay   # the two paths
    python benchmarks/bench_peers.py --cases 1,4,8 --sizes 64MiB --tmpfs none --repeat 1

Exit status: 0 when every run finished, every destination's sha256 matched and every
objdl-direct run took the link, 1 otherwise (a missed speed or memory target is
printed, not an error), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._peers_report import (
    Groups,
    case_label,
    plot,
    print_ratios,
    print_results,
    print_targets,
    summarize,
)
from benchmarks._peers_run import SYSTEMS, Spec, run_peer
from benchmarks._transfer import write_source
from benchmarks._util import (
    fmt_size,
    free_page_reporting,
    fs_type,
    machine_line,
    parse_size,
    wait_quiet,
)
from objdl.downloader import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW

__all__ = ["DEFAULT_CASES", "main", "parse_cases"]

DEFAULT_CASES = "1x256MiB,1x1GiB,4x256MiB,8x64MiB"  # issue 13's cases
DEFAULT_PLOT = os.path.join("docs", "peers.png")
_SMALLEST_REAL = 256 << 20  # below this, figures are a smoke test, not the cases
_GAP = 3.0  # seconds before each run: longer than free page reporting's 2 s delay
_QUIET_WAIT = 60.0
_TRIES = 3


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_cases(text: str, sizes: list[int] | None) -> list[tuple[int, int]]:
    """``NxSIZE`` items (``N`` alone: with each of `sizes`, or 256MiB); `sizes` replace
    every item's size. Sorted by size, then sites; no duplicates.

    Raises:
        ValueError: an item is not of that form.
    """
    out: set[tuple[int, int]] = set()
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        head, sep, tail = item.lower().partition("x")
        try:
            sites = int(head)
        except ValueError:
            raise ValueError(f"a case is NxSIZE or N, e.g. 4x256MiB; got {item!r}") from None
        if sites < 1:
            raise ValueError(f"a case needs at least one site; got {item!r}")
        own = [parse_size(tail)] if sep else [_SMALLEST_REAL]
        for size in sizes or own:
            out.add((sites, size))
    if not out:
        raise ValueError(f"no case in {text!r} (e.g. {DEFAULT_CASES})")
    return sorted(out, key=lambda c: (c[1], c[0]))


def _sizes(text: str) -> list[int]:
    try:
        return [parse_size(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _systems(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SYSTEMS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"systems are {','.join(SYSTEMS)}; got {text!r}")
    return [s for s in SYSTEMS if s in values]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"NxSIZE,... ({DEFAULT_CASES})")
    p.add_argument("--sizes", type=_sizes, default=None, help="file sizes replacing the cases'")
    p.add_argument(
        "--systems",
        type=_systems,
        default=list(SYSTEMS),
        help=f"some of {','.join(SYSTEMS)} (all)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repeats; medians shown (3)")
    p.add_argument(
        "--tmpdir",
        default=None,
        help="the ordinary file system's folder (a new folder under the current directory)",
    )
    p.add_argument(
        "--tmpfs", default="/dev/shm", help="the tmpfs folder, a second table (/dev/shm; none)"
    )
    p.add_argument(
        "--chunk",
        type=_size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"objdl's and the relay's chunk ({fmt_size(DEFAULT_CHUNK_SIZE)}, objdl's default)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"objdl's and the relay's requests in flight ({DEFAULT_WINDOW}, objdl's default)",
    )
    p.add_argument(
        "--nvflare-chunk", type=_size, default=None, help="NVFlare's chunk (its default, 5MiB)"
    )
    p.add_argument("--fsync", action="store_true", help="sites fsync file and rename (all)")
    p.add_argument("--gap", type=float, default=_GAP, help=f"seconds before each run ({_GAP:g})")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each run, wait (up to 60 s) until less than this share of the CPUs "
        "is busy (0.25; 1 to not wait)",
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        help="run again (3 tries, the quietest kept) while other work took more than this "
        "share of the CPUs during a run (0.2; 1 to never)",
    )
    p.add_argument(
        "--plot",
        nargs="?",
        const=DEFAULT_PLOT,
        default=None,
        metavar="PATH",
        help=f"draw MiB/s against sites into PATH ({DEFAULT_PLOT})",
    )
    return p


def _make_workdirs(tmpdir: str | None, tmpfs: str) -> dict[str, str]:
    """A fresh folder in the disk's folder and in tmpfs, by label (path and file system)."""
    wanted = [tmpdir or os.getcwd()]
    if tmpfs.lower() not in ("", "none"):
        if os.path.isdir(tmpfs):
            wanted.append(tmpfs)
        else:
            print(f"tmpfs: {tmpfs} is not a folder here: no tmpfs table")
    made: dict[str, str] = {}
    try:
        for where in wanted:
            workdir = tempfile.mkdtemp(prefix="objdl-peers-", dir=where)
            label = f"{where} ({fs_type(workdir)})"
            if label in made:
                os.rmdir(workdir)
                continue
            made[label] = workdir
    except BaseException:
        for workdir in made.values():
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    return made


def _quiet_run(args: argparse.Namespace, name: str, spec: Spec) -> dict[str, Any]:
    """Run `spec` when the machine is quiet, at least ``--gap`` s after the last run ended;
    again (3 tries in all, the quietest kept) while other work took more than
    ``--max-others`` of the CPUs during it."""
    best: dict[str, Any] | None = None
    for _ in range(_TRIES):
        t0 = time.monotonic()
        if args.quiet < 1:
            wait_quiet(args.quiet, _QUIET_WAIT)
        time.sleep(max(0.0, args.gap - (time.monotonic() - t0)))
        r = run_peer(SYSTEMS[name], spec)
        others = r.get("others_share")
        if best is None or (others or 0.0) < (best.get("others_share") or 0.0):
            best = r
        if others is None or others <= args.max_others:
            break
        print(f"  (other work took {100 * others:.0f}% of the CPUs: run again)", file=sys.stderr)
        spec = replace(spec, workdir=spec.workdir + "-again")
    assert best is not None
    return best


def _run_all(
    args: argparse.Namespace,
    cases: list[tuple[int, int]],
    systems: list[str],
    workdirs: dict[str, str],
) -> dict[str, Groups]:
    runs: dict[str, dict[tuple[int, int], dict[str, list[dict[str, Any]]]]] = {
        label: {} for label in workdirs
    }
    count = 0
    for size in sorted({c[1] for c in cases}):
        sources = {}
        for label, workdir in workdirs.items():
            src = os.path.join(workdir, f"src-{fmt_size(size)}.bin")
            sources[label] = (src, write_source(src, size))
        for case in [c for c in cases if c[1] == size]:
            for i in range(args.repeat):
                for label, workdir in workdirs.items():
                    src, digest = sources[label]
                    for name in systems:
                        count += 1
                        spec = Spec(
                            sites=case[0],
                            size=size,
                            src=src,
                            digest=digest,
                            workdir=os.path.join(workdir, f"run-{count}"),
                            chunk=args.chunk,
                            window=args.window,
                            nvflare_chunk=args.nvflare_chunk,
                            fsync=args.fsync,
                        )
                        r = _quiet_run(args, name, spec)
                        runs[label].setdefault(case, {}).setdefault(name, []).append(r)
                        agg = r.get("agg_mibps")
                        speed = "failed" if agg is None else f"{agg:.0f} MiB/s"
                        err = r.get("error") or r.get("path_error")
                        share = r.get("broker_share")
                        via = "" if share is None else f", {100 * share:.0f}% via the broker"
                        print(
                            f"  {case_label(*case)} {name} {fs_type(workdir)} repeat "
                            f"{i + 1}/{args.repeat}: {speed}, sha256 {r['digests_ok']}/"
                            f"{case[0]}{via}{f' ({err})' if err else ''}",
                            file=sys.stderr,
                            flush=True,
                        )
        for src, _ in sources.values():
            os.unlink(src)
    return {
        label: {
            case: {name: summarize(rs) for name, rs in by_system.items()}
            for case, by_system in by_case.items()
        }
        for label, by_case in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cases = parse_cases(args.cases, args.sizes)
    except ValueError as exc:
        print(f"--cases: {exc}", file=sys.stderr)
        return 2
    if args.repeat < 1 or args.gap < 0 or args.window < 1:
        print("--repeat and --window must be >= 1, --gap >= 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    print(machine_line())
    note = free_page_reporting()
    if note:
        print(f"memory: {note}")
    probe = Spec(1, 0, "", "", "", args.chunk, args.window, args.nvflare_chunk)
    ran: list[str] = []
    print("systems:")
    for name in args.systems:
        system = SYSTEMS[name]
        why = system.missing()
        if why is None:
            ran.append(name)
            print(f"  {name}: {system.title}; {system.settings(probe)}".rstrip("; "))
        else:
            print(f"  {name}: {why}")
    if not ran:
        print("nothing to run")
        return 0
    print(
        f"run: cases {', '.join(case_label(*c) for c in cases)} | {args.repeat} repeat(s), "
        f"medians shown | interleaved {', '.join(ran)} | fsync {'on' if args.fsync else 'off'} "
        f"| {args.gap:g} s before each run | every process on 127.0.0.1"
    )
    sys.stdout.flush()
    started = time.monotonic()
    workdirs = _make_workdirs(args.tmpdir, args.tmpfs)
    print(f"files in: {'; '.join(workdirs)}")
    sys.stdout.flush()
    try:
        by_folder = _run_all(args, cases, ran, workdirs)
    finally:
        for workdir in workdirs.values():
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        "MiB/s: aggregate = sites x size / (last end - first start), median (range) over "
        "repeats; site = size / its own time. RSS: MiB, idle→peak (VmHWM reset at the "
        "start); site: the largest. CPU: user+sys seconds per GiB moved (all sites "
        "together). others %: share of the machine busy with other work during the run. "
        "via broker: bytes objdl's broker routed / bytes moved (its --metrics). "
        "nvflare has no broker: its sites connect to the server cell."
    )
    ok = True
    for label, groups in by_folder.items():
        print()
        print(f"files in {label}:")
        print_results(groups, ran)
        print()
        print_ratios(groups, ran)
        print()
        ok &= print_targets(groups, ran)
    skipped = [n for n in args.systems if n not in ran]
    if skipped:
        print(f"\nnot run: {', '.join(f'{n} ({SYSTEMS[n].missing()})' for n in skipped)}")
    if max(c[1] for c in cases) < _SMALLEST_REAL:
        print(
            f"\n(smoke only: every file is below {fmt_size(_SMALLEST_REAL)}; issue 13's cases "
            "are 1x256MiB, 1x1GiB, 4x256MiB and 8x64MiB)"
        )
    if args.plot:
        label = next(iter(by_folder))
        title = (
            f"one file, owner -> N sites on 127.0.0.1, files in {label}, medians of {args.repeat}"
        )
        if max(c[1] for c in cases) < _SMALLEST_REAL:
            title += " (smoke only: small files)"
        why = plot(by_folder[label], ran, args.plot, title)
        print(f"\nplot: {why}" if why else f"\nplot: {os.path.abspath(args.plot)}")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n(took {time.monotonic() - started:.1f} s; load avg now {load})")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
