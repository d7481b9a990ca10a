"""objdl at scale: many cells at once through one broker, and long links.

How it works, part ``cells``: one owner process offers one random object
(``offer_bytes``, 4 MiB by default); N site cells, as threads spread over a few
processes (each thread with its own :class:`~objdl.cell.Cell`), all start
``download_bytes`` at the same moment through one broker, and each checks the sha256
of what it got. Reported per N: aggregate MiB/s, how many completed with the right
digest, the broker's and owner's memory (idle→peak), and the owner's CPU per request
(requests counted by the owner's cell) as N grows. Target: 256 cells all complete,
broker peak RSS < 200 MiB.

Part ``links``: the transfer of :mod:`benchmarks._transfer` (broker, owner, sites in
their own processes) with a delaying TCP proxy (:mod:`benchmarks._proxy`) between the
sites and the broker (or the bare relay), at each one-way delay asked for; objdl
windowed, objdl one-at-a-time (the seed's exchange) and the bare relay (its sites go
through the proxy too). Target: at 25 ms one way, windowed >= 5x one-at-a-time.

Usage::

    python benchmarks/bench_scale.py                        # both parts, defaults
    python benchmarks/bench_scale.py --parts cells --cells 1,16,64,256 --procs 4
    python benchmarks/bench_scale.py --parts links --delays 0,10,25 --link-size 64MiB

Every process is ended by its pid in ``finally``, with bounded waits; temporary files
are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._transfer import (
    DEFAULT_MODES,
    MODES,
    Plan,
    child_argv,
    end_child,
    others_share,
    write_source,
)
from benchmarks._util import (
    Child,
    ChildError,
    Commands,
    cpu_seconds_fine,
    emit,
    fmt_size,
    machine_line,
    median,
    parse_size,
    peak_rss_kib,
    print_table,
    reset_peak_rss,
    rss_kib,
    start_objdl_broker,
    system_busy_seconds,
    wait_quiet,
)
from benchmarks.bench_download import quiet_run, summarize, table_rows
from objdl.downloader import DEFAULT_CHUNK_SIZE

__all__ = ["main"]

_THIS = os.path.abspath(__file__)
_OWNER = "server"
_LIFETIME = 3600.0
_BROKER_RSS_TARGET_MIB = 200
_SPEEDUP_TARGET = 5.0  # windowed >= this x one-at-a-time at the target delay
_TARGET_DELAY_MS = 25.0
_SETTLE = 0.5
_QUIET_WAIT = 60.0  # the longest a run waits for the machine to calm down


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- child side


def _cells_owner(url: str, size: int, chunk: int) -> None:
    from objdl.cell import Cell
    from objdl.objects import offer_bytes

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    data = os.urandom(size)
    with Cell(_OWNER, url) as cell:
        ref = offer_bytes(cell, data, chunk_size=chunk, timeout=_LIFETIME)
        digest = hashlib.sha256(data).hexdigest()
        emit("READY", {"pid": os.getpid(), "ref": ref, "digest": digest})
        deadline = time.monotonic() + _LIFETIME
        while time.monotonic() < deadline:
            got = cmds.get(1.0)
            if got == "EXIT":
                return
            if got == "STATS":
                emit("STATS", dict(cell.stats))


def _cells_site(
    url: str, names: list[str], ref: str, digest: str, window: int, chunk: int, timeout: float
) -> None:
    from objdl.cell import Cell
    from objdl.objects import DownloadError, download_bytes

    signal.signal(signal.SIGTERM, _interrupt)
    cmds = Commands()
    cells: list[Cell] = []
    release = threading.Event()
    try:
        for name in names:
            cell = Cell(name, url, start_timeout=30.0)
            cell.start()
            cells.append(cell)
        go = threading.Barrier(len(cells) + 1, timeout=_LIFETIME)
        results: list[dict[str, Any]] = [{} for _ in cells]
        finished = threading.Semaphore(0)
        # The fetch threads stay alive until EXIT (`release`), so that the CPU they used
        # still counts when the parent reads this process's per-thread CPU times.

        def fetch(i: int, cell: Cell) -> None:
            try:
                go.wait()
            except threading.BrokenBarrierError:
                return
            try:
                results[i] = one(cell)
            finally:
                finished.release()
                release.wait(_LIFETIME)

        def one(cell: Cell) -> dict[str, Any]:
            t0 = time.monotonic()
            try:
                got = download_bytes(
                    cell,
                    _OWNER,
                    ref,
                    window=window,
                    chunk_size=chunk,
                    per_request_timeout=timeout,
                )
            except DownloadError as exc:
                return {"t0": t0, "t1": time.monotonic(), "ok": False, "why": exc.reason}
            t1 = time.monotonic()
            ok = hashlib.sha256(got).hexdigest() == digest
            return {"t0": t0, "t1": t1, "ok": ok, "why": "" if ok else "digest"}

        threads = [
            threading.Thread(target=fetch, args=(i, c), name=f"fetch-{i}", daemon=True)
            for i, c in enumerate(cells)
        ]
        for t in threads:
            t.start()
        emit("READY", {"pid": os.getpid()})
        try:
            cmds.expect("GO", _LIFETIME)
        except ChildError:
            go.abort()
            raise
        go.wait()
        deadline = time.monotonic() + _LIFETIME
        for _ in threads:
            if not finished.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        emit("DONE", {"results": results})
        deadline = time.monotonic() + _LIFETIME
        while time.monotonic() < deadline and cmds.get(1.0) != "EXIT":
            pass
        release.set()
        for t in threads:
            t.join(10.0)
    finally:
        release.set()
        for cell in cells:
            cell.stop()


# ---------------------------------------------------------------- parent side: cells


def _spread(n: int, procs: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(min(n, procs))]
    for i in range(n):
        groups[i % len(groups)].append(f"site-{i + 1}")
    return groups


def _owner_stats(owner: Child) -> dict[str, int]:
    owner.send("STATS")
    stats: dict[str, int] = owner.expect("STATS", 15.0)
    return stats


def _run_cells(
    n: int, procs: int, size: int, chunk: int, window: int, timeout: float
) -> dict[str, Any]:
    children: list[Child] = []
    try:
        broker, url = start_objdl_broker()
        children.append(broker)
        argv = child_argv(_THIS, "cells-owner", url=url, size=size, chunk=chunk)
        owner = Child("cells-owner", argv, stdin=True)
        children.append(owner)
        info = owner.expect("READY", 60.0)
        sites: list[Child] = []
        for k, names in enumerate(_spread(n, procs)):
            argv = child_argv(
                _THIS,
                "cells-site",
                url=url,
                names=names,
                ref=info["ref"],
                digest=info["digest"],
                window=window,
                chunk=chunk,
                timeout=timeout,
            )
            site = Child(f"cells-site-{k}", argv, stdin=True)
            children.append(site)
            sites.append(site)
        for site in sites:
            site.expect("READY", 120.0)
        roles = {"owner": owner, "broker": broker}
        roles.update({s.name: s for s in sites})
        time.sleep(_SETTLE)
        idle = {r: rss_kib(c.pid) for r, c in roles.items()}
        for c in roles.values():
            reset_peak_rss(c.pid)
        stats0 = _owner_stats(owner)
        cpu0 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
        busy0, wall0 = system_busy_seconds(), time.monotonic()
        for site in sites:
            site.send("GO")
        results: list[dict[str, Any]] = []
        budget = 120.0 + n * size / (1024 * 1024)
        started = time.monotonic()
        for site in sites:
            left = max(1.0, started + budget - time.monotonic())
            results.extend(site.expect("DONE", left)["results"])
        cpu1 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
        busy1, wall1 = system_busy_seconds(), time.monotonic()
        peak = {r: peak_rss_kib(c.pid) for r, c in roles.items()}
        stats1 = _owner_stats(owner)
    finally:
        for child in reversed(children):
            end_child(child)

    done = [r for r in results if r]
    requests = max(1, stats1["received"] - stats0["received"])
    whole = max(r["t1"] for r in done) - min(r["t0"] for r in done) if done else float("nan")
    total_mib = n * size / (1024 * 1024)

    def cpu(role: str) -> float:
        a, b = cpu1.get(role), cpu0.get(role)
        return float("nan") if a is None or b is None else a - b

    site_roles = [r for r in roles if r.startswith("cells-site")]
    return {
        "n": n,
        "procs": len(site_roles),
        "ok": sum(1 for r in done if r["ok"]),
        "reasons": sorted({r["why"] for r in done if not r["ok"]}),
        "seconds": whole,
        "agg_mibps": total_mib / whole if whole > 0 else float("nan"),
        "per_cell_s": median([r["t1"] - r["t0"] for r in done]) if done else float("nan"),
        "requests": requests,
        "owner_us_per_req": cpu("owner") * 1e6 / requests,
        "owner_ms_per_mib": cpu("owner") * 1e3 / total_mib,
        "broker_us_per_req": cpu("broker") * 1e6 / requests,
        "sites_ms_per_mib": sum(cpu(r) for r in site_roles) * 1e3 / total_mib,
        "idle": {r: (v or 0) / 1024 for r, v in idle.items()},
        "peak": {r: (v or 0) / 1024 for r, v in peak.items()},
        "site_roles": site_roles,
        "others": others_share(busy0, busy1, wall1 - wall0, cpu0, cpu1),
    }


def _quiet_cells(n: int, args: argparse.Namespace, tries: int = 3) -> dict[str, Any]:
    """As :func:`benchmarks.bench_download.quiet_run`, for one many-cells run."""
    best: dict[str, Any] | None = None
    for _ in range(tries):
        wait_quiet(args.quiet, _QUIET_WAIT)
        r = _run_cells(n, args.procs, args.cell_size, args.chunk, args.window, args.timeout)
        if best is None or (r["others"] or 0.0) < (best["others"] or 0.0):
            best = r
        if r["others"] is None or r["others"] <= args.max_others:
            break
        share = 100 * r["others"]
        print(f"  (other work took {share:.0f}% of the CPUs: run again)", file=sys.stderr)
    assert best is not None
    return best


def _cells_part(args: argparse.Namespace) -> bool:
    print()
    print(
        f"part cells: N site cells (threads over up to {args.procs} processes, one Cell each) "
        f"fetch one {fmt_size(args.cell_size)} object at once (offer_bytes/download_bytes, "
        f"chunk {fmt_size(args.chunk)}, window {args.window}) through one broker"
    )
    sys.stdout.flush()
    rows: list[list[Any]] = []
    verdicts: list[str] = []
    all_ok = True
    for n in args.cells:
        reps = []
        for i in range(args.repeat):
            r = _quiet_cells(n, args)
            reps.append(r)
            print(
                f"  cells {n} repeat {i + 1}/{args.repeat}: {r['agg_mibps']:.0f} MiB/s, "
                f"{r['ok']}/{n} ok, {r['seconds']:.2f}s",
                file=sys.stderr,
                flush=True,
            )

        def med(key: str, reps: list[dict[str, Any]] = reps) -> float:
            return median([r[key] for r in reps])

        def mem(role: str, which: str, reps: list[dict[str, Any]] = reps) -> float:
            if role == "sites":
                return median([max(r[which][s] for s in r["site_roles"]) for r in reps])
            return median([r[which][role] for r in reps])

        ok = sum(r["ok"] for r in reps)
        want = n * len(reps)
        bpeak = max(r["peak"]["broker"] for r in reps)
        rows.append(
            [
                n,
                reps[0]["procs"],
                med("agg_mibps"),
                f"{ok}/{want}",
                med("seconds"),
                med("per_cell_s"),
                int(med("requests")),
                med("owner_us_per_req"),
                med("owner_ms_per_mib"),
                med("broker_us_per_req"),
                med("sites_ms_per_mib"),
                f"{mem('broker', 'idle'):.0f}→{mem('broker', 'peak'):.0f}",
                f"{mem('owner', 'idle'):.0f}→{mem('owner', 'peak'):.0f}",
                f"{mem('sites', 'idle'):.0f}→{mem('sites', 'peak'):.0f}",
                round(100 * median([r["others"] or 0.0 for r in reps])),
            ]
        )
        fails = sorted({why for r in reps for why in r["reasons"]})
        if fails:
            verdicts.append(f"cells {n}: failures: {fails[:3]}")
        if n == max(args.cells):
            good = ok == want and bpeak < _BROKER_RSS_TARGET_MIB
            all_ok &= good
            verdicts.append(
                f"{n} cells: {ok}/{want} complete with the right sha256, broker peak RSS "
                f"{bpeak:.0f} MiB (target: all, and < {_BROKER_RSS_TARGET_MIB} MiB): "
                f"{'PASS' if good else 'MISS'}"
            )
        elif ok != want:
            all_ok = False
    headers = ["cells", "procs", "MiB/s", "sha256 ok", "wall s", "per cell s", "requests"]
    headers += ["owner us/req", "owner ms/MiB", "broker us/req", "sites ms/MiB"]
    headers += ["broker RSS", "owner RSS", "site proc RSS max", "others %"]
    print()
    print(
        "MiB/s: N x size / (last end - first start); requests: counted by the owner's cell; "
        "CPU: user+sys of the whole process; RSS: MiB, idle→peak"
    )
    print_table(headers, rows)
    print()
    print("targets:")
    for v in verdicts:
        print(f"  {v}")
    return all_ok


# ---------------------------------------------------------------- parent side: links


def _links_part(args: argparse.Namespace, workdir: str) -> bool:
    print()
    print(
        f"part links: {args.link_sites} site(s) x {fmt_size(args.link_size)}, chunk "
        f"{fmt_size(args.chunk)}, window {args.window}, through a delaying TCP proxy between "
        "the sites and the broker (or the bare relay); delay = one way, each direction"
    )
    sys.stdout.flush()
    src = os.path.join(workdir, "link-src.bin")
    digest = write_source(src, args.link_size)
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for delay_ms in args.delays:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
        for i in range(args.repeat):
            order = args.modes if i % 2 == 0 else list(reversed(args.modes))
            for mode in order:
                plan = Plan(
                    mode=mode,
                    sites=args.link_sites,
                    src=src,
                    size=args.link_size,
                    digest=digest,
                    chunk=args.chunk,
                    window=args.window,
                    workdir=workdir,
                    delay=delay_ms / 1000.0,
                    request_timeout=args.timeout,
                )
                r = quiet_run(plan, args.quiet, args.max_others)
                runs[mode].append(r)
                print(
                    f"  delay {delay_ms:g} ms {mode} repeat {i + 1}/{args.repeat}: "
                    f"{r['agg_mibps']:.1f} MiB/s, sha256 {r['digests_ok']}/{args.link_sites}",
                    file=sys.stderr,
                    flush=True,
                )
        key = (args.link_sites, args.link_size, args.chunk, args.window, delay_ms)
        groups[key] = {m: summarize(rs) for m, rs in runs.items()}
    os.unlink(src)

    headers, rows = table_rows(groups, with_proxy=True)
    headers = ["delay ms", *headers]
    rows = [
        [f"{key[4]:g}", *row] for key, by_mode in groups.items() for row in _rows_of(key, by_mode)
    ]
    print()
    print(
        "MiB/s per site and aggregate; RSS MiB idle→peak; CPU user+sys ms per MiB "
        "(proxy: the delaying proxy itself)"
    )
    print_table(headers, rows)
    print()
    print("windowed / one-at-a-time:")
    all_ok = True
    judged = False
    for key, by_mode in groups.items():
        w, s = by_mode.get("windowed"), by_mode.get("seed")
        if w is None or s is None or s["agg"] <= 0:
            continue
        speedup = w["agg"] / s["agg"]
        line = f"  {key[4]:g} ms: {w['agg']:.1f} / {s['agg']:.1f} MiB/s = {speedup:.1f}x"
        if key[4] == _TARGET_DELAY_MS:
            judged = True
            ok = speedup >= _SPEEDUP_TARGET
            all_ok &= ok
            line += f" (target >= {_SPEEDUP_TARGET:g}x): {'PASS' if ok else 'MISS'}"
        print(line)
    if not judged:
        print(f"  (no {_TARGET_DELAY_MS:g} ms run with both modes: target not judged)")
    wrong = [m for by in groups.values() for m, s in by.items() if s["ok"] < s["n"]]
    if wrong:
        all_ok = False
        print(f"  digest check: wrong or missing files in {sorted(set(wrong))}: MISS")
    else:
        print("  digest check: every destination's sha256 equals the source's: PASS")
    return all_ok


def _rows_of(key: tuple[Any, ...], by_mode: dict[str, dict[str, Any]]) -> list[list[Any]]:
    _, rows = table_rows({key[:4]: by_mode}, with_proxy=True)
    return rows


# ---------------------------------------------------------------- command line


def _num_list(kind: type, text: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


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
    p.add_argument("--parts", default="cells,links", help="cells,links (both)")
    p.add_argument(
        "--cells", type=lambda t: _num_list(int, t), default=[1, 16, 64, 256], help="1,16,64,256"
    )
    p.add_argument("--procs", type=int, default=4, help="site processes for the cells (4)")
    p.add_argument("--cell-size", type=_size, default=4 << 20, help="object per cell (4MiB)")
    p.add_argument(
        "--delays",
        type=lambda t: _num_list(float, t),
        default=[10.0, 25.0],
        help="one-way delays, ms (10,25)",
    )
    p.add_argument("--link-size", type=_size, default=64 << 20, help="object for links (64MiB)")
    p.add_argument("--link-sites", type=int, default=1, help="sites for links (1)")
    p.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help="for links: windowed,seed,seed-views,raw"
    )
    p.add_argument(
        "--chunk",
        type=_size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"chunk size ({DEFAULT_CHUNK_SIZE >> 20}MiB, the library's default)",
    )
    p.add_argument("--window", type=int, default=8, help="requests in flight (8)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (60)")
    p.add_argument("--repeat", type=int, default=1, help="repeats; medians shown (1)")
    p.add_argument("--tmpdir", default=None, help="where the files go (the system's temp dir)")
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
        help="run a case again (3 tries, the quietest kept) while other work took "
        "more than this share of the CPUs (0.2; 1 to never)",
    )
    p.add_argument("--role", choices=["cells-owner", "cells-site"], help=argparse.SUPPRESS)
    p.add_argument("--args", type=json.loads, default={}, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.role:
        try:
            if args.role == "cells-owner":
                _cells_owner(**args.args)
            else:
                _cells_site(**args.args)
        except (KeyboardInterrupt, ChildError):
            return 1
        return 0
    parts = {v.strip() for v in args.parts.split(",") if v.strip()}
    if not parts or parts - {"cells", "links"}:
        p.error("--parts takes cells, links or both")
    args.modes = [m for m in MODES if m in {v.strip() for v in args.modes.split(",")}]
    if args.repeat < 1 or args.procs < 1 or args.window < 1 or args.link_sites < 1:
        p.error("--repeat, --procs, --window and --link-sites must be >= 1")
    if not args.modes:
        p.error(f"--modes takes some of {','.join(MODES)}")
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    print(machine_line())
    started = time.monotonic()
    ok = True
    workdir = tempfile.mkdtemp(prefix="objdl-scale-", dir=args.tmpdir)
    try:
        if "cells" in parts:
            ok &= _cells_part(args)
        if "links" in parts:
            ok &= _links_part(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n(took {time.monotonic() - started:.1f} s; load avg now {load})")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
