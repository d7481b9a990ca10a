"""objdl through relay brokers: a tree against one flat broker, and many cells over relays.

How it works, part ``relay``: one owner cell ``server`` at the root broker offers one
random object (``offer_bytes``, 64 MiB by default); R relay brokers (4), each holding
``site-K``, have C site cells each (8), ``site-K.wJ``, as threads of one process per
relay; all start ``download_bytes`` at the same moment and check the sha256 of what
they got. The same run, with the same cells and processes, is then made against one
flat broker (every cell connected to the root), and the two alternate ``--repeat``
times. Reported: aggregate MiB/s (R x C x size / (last end - first start)), CPU
seconds per broker (user+sys of the process) and its peak RSS, and the ratio relay /
flat. Target: through one relay, at least 0.8x the flat broker's throughput.

Part ``many``: N cells (1,000) spread over R relays (8), one site process per relay
by default, each cell fetching one 1 MiB object from the owner at the root. Reported:
how many completed with the right sha256, the time to register all (from the first
site process started to the root's LIST naming every cell), the wall time of the
downloads, and every broker's memory (idle -> peak RSS). Target: all complete, each
broker under 200 MiB peak RSS.

Every broker is ``python -m broker`` (a relay: ``--upstream ROOT --prefix site-K``);
the owner and site processes are bench_scale.py's (roles ``cells-owner`` and
``cells-site``). Every process is ended by its pid in ``finally``, with bounded waits.

Usage::

    python benchmarks/bench_topology.py                          # both parts, defaults
    python benchmarks/bench_topology.py --parts relay --repeat 3
    python benchmarks/bench_topology.py --parts many --many-cells 1000 --many-relays 8
    # the smallest run (seconds): a check that it works, not a measurement
    python benchmarks/bench_topology.py --relays 2 --per-relay 2 --size 1MiB \\
        --many-cells 8 --many-relays 2 --many-size 64KiB --quiet 1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_scale
from benchmarks._transfer import child_argv, end_child
from benchmarks._util import (
    Child,
    ChildError,
    cpu_seconds_fine,
    fmt_size,
    machine_line,
    median,
    parse_size,
    peak_rss_kib,
    print_table,
    reset_peak_rss,
    rss_kib,
    start_objdl_broker,
    wait_quiet,
)
from objdl.downloader import DEFAULT_CHUNK_SIZE

__all__ = ["main"]

_SCALE = os.path.abspath(bench_scale.__file__)  # its cells-owner and cells-site roles
_RATIO_TARGET = 0.8
_RSS_TARGET_MIB = 200
_SETTLE = 0.5
_QUIET_WAIT = 60.0
_MIB = 1024 * 1024


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _groups(relays: int, per_relay: int, procs: int) -> list[tuple[int, list[str]]]:
    """(relay index, cell names) per site process: `procs` processes per relay."""
    out: list[tuple[int, list[str]]] = []
    for k in range(relays):
        names = [f"site-{k + 1}.w{j + 1}" for j in range(per_relay)]
        n = max(1, min(procs, len(names)))
        out.extend((k, names[i::n]) for i in range(n))
    return out


def _listed(root_url: str, want: int, timeout: float) -> float:
    """Seconds until the root's LIST names `want` site cells (a probe cell asks it)."""
    from objdl.cell import Cell

    deadline = time.monotonic() + timeout
    with Cell("bench-probe", root_url, start_timeout=30.0) as probe:
        while True:
            names = probe.list_cells(timeout=10.0)
            if sum(1 for n in names if n.startswith("site-")) >= want:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise ChildError(f"the root lists {len(names)} cells, not {want}, after {timeout}s")
            time.sleep(0.05)


def _run(
    flat: bool,
    relays: int,
    per_relay: int,
    procs: int,
    size: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run: the tree (or, `flat`, the root alone) and its cells; see the docstring."""
    children: list[Child] = []
    n = relays * per_relay
    try:
        root, root_url = start_objdl_broker()
        children.append(root)
        brokers = {"root": root}
        urls = [root_url] * relays
        if not flat:
            for k in range(relays):
                extra = ["--upstream", root_url, "--prefix", f"site-{k + 1}"]
                relay, urls[k] = start_objdl_broker(extra)
                children.append(relay)
                brokers[f"relay-{k + 1}"] = relay
        argv = child_argv(_SCALE, "cells-owner", url=root_url, size=size, chunk=args.chunk)
        owner = Child("owner", argv, stdin=True)
        children.append(owner)
        info = owner.expect("READY", 120.0)
        spawned = time.monotonic()
        sites: list[Child] = []
        for i, (k, names) in enumerate(_groups(relays, per_relay, procs)):
            argv = child_argv(
                _SCALE,
                "cells-site",
                url=urls[k],
                names=names,
                ref=info["ref"],
                digest=info["digest"],
                window=args.window,
                chunk=args.chunk,
                timeout=args.timeout,
            )
            site = Child(f"sites-{i + 1}", argv, stdin=True)
            children.append(site)
            sites.append(site)
        for site in sites:
            site.expect("READY", 120.0 + n * 0.5)
        registered = _listed(root_url, n, 120.0 + n * 0.5) - spawned
        time.sleep(_SETTLE)
        idle = {r: rss_kib(c.pid) for r, c in brokers.items()}
        for c in brokers.values():
            reset_peak_rss(c.pid)
        cpu0 = {r: cpu_seconds_fine(c.pid) for r, c in brokers.items()}
        for site in sites:
            site.send("GO")
        results: list[dict[str, Any]] = []
        started = time.monotonic()
        budget = 120.0 + n * size / _MIB
        for site in sites:
            left = max(1.0, started + budget - time.monotonic())
            results.extend(site.expect("DONE", left)["results"])
        cpu1 = {r: cpu_seconds_fine(c.pid) for r, c in brokers.items()}
        peak = {r: peak_rss_kib(c.pid) for r, c in brokers.items()}
    finally:
        for child in reversed(children):
            end_child(child)
    done = [r for r in results if r]
    whole = max(r["t1"] for r in done) - min(r["t0"] for r in done) if done else float("nan")

    def cpu(role: str) -> float:
        a, b = cpu1.get(role), cpu0.get(role)
        return float("nan") if a is None or b is None else a - b

    relay_roles = [r for r in brokers if r != "root"]
    return {
        "flat": flat,
        "n": n,
        "ok": sum(1 for r in done if r["ok"]),
        "reasons": sorted({r["why"] for r in done if not r["ok"]}),
        "seconds": whole,
        "registered_s": registered,
        "agg_mibps": n * size / _MIB / whole if whole > 0 else float("nan"),
        "root_cpu": cpu("root"),
        "relays_cpu": sum(cpu(r) for r in relay_roles),
        "relay_cpu_max": max((cpu(r) for r in relay_roles), default=0.0),
        "root_idle": (idle["root"] or 0) / 1024,
        "root_peak": (peak["root"] or 0) / 1024,
        "relay_idle_max": max(((idle[r] or 0) / 1024 for r in relay_roles), default=0.0),
        "relay_peak_max": max(((peak[r] or 0) / 1024 for r in relay_roles), default=0.0),
    }


def _relay_part(args: argparse.Namespace) -> bool:
    print()
    print(
        f"part relay: an owner at the root; {args.relays} relays x {args.per_relay} cells each "
        f"fetch {fmt_size(args.size)} (chunk {fmt_size(args.chunk)}, window {args.window}), "
        f"against the same {args.relays * args.per_relay} cells on one flat broker; "
        f"alternated {args.repeat}x"
    )
    sys.stdout.flush()
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for i in range(args.repeat):
        for flat in (True, False):
            wait_quiet(args.quiet, _QUIET_WAIT)
            r = _run(flat, args.relays, args.per_relay, 1, args.size, args)
            runs[flat].append(r)
            what = "flat" if flat else "relay"
            print(
                f"  {what} repeat {i + 1}/{args.repeat}: {r['agg_mibps']:.0f} MiB/s, "
                f"{r['ok']}/{r['n']} ok",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for flat in (True, False):
        reps = runs[flat]
        rows.append(
            [
                "flat" if flat else f"{args.relays} relays",
                median([r["agg_mibps"] for r in reps]),
                f"{sum(r['ok'] for r in reps)}/{sum(r['n'] for r in reps)}",
                median([r["seconds"] for r in reps]),
                median([r["root_cpu"] for r in reps]),
                "-" if flat else median([r["relays_cpu"] for r in reps]),
                "-" if flat else median([r["relay_cpu_max"] for r in reps]),
                f"{median([r['root_idle'] for r in reps]):.0f}→"
                f"{max(r['root_peak'] for r in reps):.0f}",
                "-"
                if flat
                else f"{median([r['relay_idle_max'] for r in reps]):.0f}→"
                f"{max(r['relay_peak_max'] for r in reps):.0f}",
            ]
        )
    print()
    print(
        "MiB/s: cells x size / (last end - first start), median; CPU: user+sys seconds of "
        "the broker process during the downloads; RSS: MiB, idle→peak (relays: the largest)"
    )
    headers = ["topology", "MiB/s", "sha256 ok", "wall s", "root CPU s"]
    headers += ["relays CPU s", "one relay CPU s max", "root RSS", "relay RSS max"]
    print_table(headers, rows)
    flat_mibps = median([r["agg_mibps"] for r in runs[True]])
    relay_mibps = median([r["agg_mibps"] for r in runs[False]])
    ratio = relay_mibps / flat_mibps if flat_mibps > 0 else float("nan")
    complete = all(r["ok"] == r["n"] for rs in runs.values() for r in rs)
    good = complete and ratio >= _RATIO_TARGET
    print()
    print("targets:")
    print(
        f"  through one relay: {ratio:.2f}x the flat broker's MiB/s, all complete: "
        f"{complete} (target: >= {_RATIO_TARGET}x, all): {'PASS' if good else 'MISS'}"
    )
    fails = sorted({why for rs in runs.values() for r in rs for why in r["reasons"]})
    if fails:
        print(f"  failures: {fails[:3]}")
    return good


def _many_part(args: argparse.Namespace) -> bool:
    print()
    per = -(-args.many_cells // args.many_relays)
    n = per * args.many_relays
    print(
        f"part many: {n} cells over {args.many_relays} relays ({per} each, "
        f"{args.many_procs} site process(es) per relay) each fetch {fmt_size(args.many_size)} "
        "from an owner at the root"
    )
    sys.stdout.flush()
    rows = []
    good = True
    for i in range(args.repeat):
        wait_quiet(args.quiet, _QUIET_WAIT)
        r = _run(False, args.many_relays, per, args.many_procs, args.many_size, args)
        print(
            f"  many repeat {i + 1}/{args.repeat}: {r['ok']}/{r['n']} ok, "
            f"registered in {r['registered_s']:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        rows.append(
            [
                r["n"],
                f"{r['ok']}/{r['n']}",
                r["registered_s"],
                r["seconds"],
                r["agg_mibps"],
                f"{r['root_idle']:.0f}→{r['root_peak']:.0f}",
                f"{r['relay_idle_max']:.0f}→{r['relay_peak_max']:.0f}",
                r["root_cpu"],
                r["relays_cpu"],
            ]
        )
        peak = max(r["root_peak"], r["relay_peak_max"])
        ok = r["ok"] == r["n"] and peak < _RSS_TARGET_MIB
        good &= ok
        if r["reasons"]:
            print(f"  failures: {r['reasons'][:3]}")
    print()
    print(
        "register all: first site process started -> the root's LIST names every cell; "
        "wall: last end - first start of the downloads; RSS: MiB, idle→peak (relays: largest)"
    )
    headers = ["cells", "sha256 ok", "register all s", "wall s", "MiB/s"]
    headers += ["root RSS", "relay RSS max", "root CPU s", "relays CPU s"]
    print_table(headers, rows)
    print()
    print("targets:")
    print(
        f"  {n} cells over {args.many_relays} relays: all complete and every broker under "
        f"{_RSS_TARGET_MIB} MiB peak RSS: {'PASS' if good else 'MISS'}"
    )
    return good


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--parts", default="relay,many", help="relay,many (both)")
    p.add_argument("--relays", type=int, default=4, help="relay part: relays (4)")
    p.add_argument("--per-relay", type=int, default=8, help="relay part: cells per relay (8)")
    p.add_argument("--size", type=parse_size, default=64 * _MIB, help="relay part: object (64MiB)")
    p.add_argument("--many-cells", type=int, default=1000, help="many part: cells (1000)")
    p.add_argument("--many-relays", type=int, default=8, help="many part: relays (8)")
    p.add_argument(
        "--many-procs", type=int, default=1, help="many part: site processes per relay (1)"
    )
    p.add_argument("--many-size", type=parse_size, default=_MIB, help="many part: object (1MiB)")
    p.add_argument(
        "--chunk",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"chunk size ({DEFAULT_CHUNK_SIZE >> 20}MiB, the library's default)",
    )
    p.add_argument("--window", type=int, default=8, help="requests in flight per cell (8)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (60)")
    p.add_argument("--repeat", type=int, default=1, help="repeats; medians shown (1)")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each run, wait (up to 60 s) until less than this share of the CPUs "
        "is busy (0.25; 1 to not wait)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    parts = {v.strip() for v in args.parts.split(",") if v.strip()}
    if not parts or parts - {"relay", "many"}:
        p.error("--parts takes relay, many or both")
    counts = (args.relays, args.per_relay, args.many_cells, args.many_relays, args.many_procs)
    if min(counts) < 1 or args.repeat < 1 or args.window < 1:
        p.error("counts, --repeat and --window must be >= 1")
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    print(machine_line())
    started = time.monotonic()
    ok = True
    if "relay" in parts:
        ok &= _relay_part(args)
    if "many" in parts:
        ok &= _many_part(args)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n(took {time.monotonic() - started:.1f} s; load avg now {load})")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
