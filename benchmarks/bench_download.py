"""One file from one owner to N sites: objdl windowed, direct, one-at-a-time, and a bare relay.

How it works: for every combination of sites, size, chunk and window asked for, and
every repeat, each mode runs as its own set of processes on 127.0.0.1 (broker or
relay, owner, N sites; see :mod:`benchmarks._transfer`), the modes alternating which
goes first so drift hits them alike. The files go on an ordinary file system by
default (a new folder under the current directory; ``--tmpdir`` names others, e.g.
``--tmpdir .,/dev/shm`` for the disk and tmpfs side by side, interleaved). The source
file (random bytes) is written once per size in each folder; every destination is
checked against its sha256 and deleted after its run; the folders go at the end.
Before each run the benchmark waits ``--gap`` seconds (3), so that every mode starts
with memory freed as long ago: in a VM that hands free memory back to its host
(free page reporting, about 2 s after it is freed), a run that starts sooner after
the previous run's files were deleted writes into memory the host still backs, and
is faster for it. One table per folder, medians over repeats:

- ``windowed``: ``offer_file`` / ``download_file`` (window of requests, site-side digest);
- ``direct``: the same, the owner's cell made with ``data_bind`` (a data socket on
  127.0.0.1): after the first reply, which goes through the broker and offers the link,
  the chunks go owner -> site directly. Each run is checked: every site's link up at its
  end and at most half the bytes moved routed by the broker (read from its
  ``--metrics``; needs ``prometheus_client``), or the run fails, loudly; a last line
  gives direct against windowed;
- ``aio``: the same file, each site an ``objdl.aio.Cell`` awaiting ``objdl.aio.download_file``;
- ``seed``: ``download_object`` with a plain ``Consumer`` that ``pwrite``s (one at a time);
- ``seed-views`` (only when asked for): the same consumer with ``accepts_views = True``,
  so each chunk arrives as a view of the received frame instead of a ``bytes`` copy; with
  both, a last line gives what the seed's ``bytes`` cost against views;
- ``raw``: a bare pyzmq DEALER -> ROUTER -> DEALER relay, same chunk and window, no
  digest: the ceiling that ``vs raw`` compares with. It does objdl's file I/O (the
  owner reads the file it serves, the site writes a part file in objdl's pieces and
  renames it; ``--fsync`` for both).

``via broker`` is the share of the bytes moved that the objdl broker routed (its
``--metrics``): about 100% through the broker, what the first replies and the first
window took for ``direct``.

Memory: each process's RSS is read when idle, just before the transfer, and its peak
(VmHWM, reset at that moment) after it; ``idle→peak`` shows growth. CPU: user+sys of
each whole process during the transfer, per MiB moved (all sites together).

Usage::

    python benchmarks/bench_download.py                      # quick: 1,4 sites x 256MiB, 3x
    python benchmarks/bench_download.py --tmpdir .,/dev/shm  # disk and tmpfs, interleaved
    python benchmarks/bench_download.py --sites 1,4,8 --size 256MiB,1GiB --repeat 1  # full
    python benchmarks/bench_download.py --sites 1 --chunk 256KiB,1MiB,2MiB,4MiB \\
        --window 4,8,16 --modes windowed,raw                  # chunk/window sweep
    python benchmarks/bench_download.py --sites 1 --modes seed,seed-views  # bytes vs views
    python benchmarks/bench_download.py --sites 1,4 --modes windowed,direct,raw  # the paths

``--dict`` compares a PyTorch-style state dict (a few hundred fp32 and bf16 tensors of
mixed sizes, 1 GiB unless ``--size`` says otherwise: mode ``dict``) with the same bytes
as one file (``windowed``), same run, and prints its targets: at least 0.9x the file's
MiB/s; owner peak RSS within 64 MiB above the dict it holds; each site's within 64 MiB
above the dict it received. It needs torch::

    python benchmarks/bench_download.py --dict --sites 1,4 --repeat 1

``--profile DIR`` also records the owner, the broker and the first site with py-spy
(raw format, ``--threads``) into DIR; throughput of such runs is not comparable.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._direct import MAX_BROKER_SHARE, metrics_missing
from benchmarks._transfer import DEFAULT_MODES, MODES, Plan, run_transfer, write_source
from benchmarks._util import (
    fmt_size,
    free_page_reporting,
    fs_type,
    machine_line,
    median,
    parse_size,
    print_table,
    wait_quiet,
)
from objdl.downloader import DEFAULT_CHUNK_SIZE

__all__ = ["main", "print_threads", "quiet_run", "summarize", "table_rows"]

_RATIO_TARGET = 0.8  # objdl windowed >= this x the bare relay's MiB/s
_GROWTH_TARGET_MIB = 64  # peak RSS at most this far above idle, 1 GiB file
_BROKER_SCALE_MIB = 16  # broker "flat": growth at 1 GiB within this of growth at 256 MiB
_GIB = 1 << 30
_DICT_RATIO_TARGET = 0.9  # a state dict >= this x the same bytes as a file
_DICT_GROWTH_MIB = 64  # owner above the dict it holds; site above the dict it received
_QUIET_WAIT = 60.0  # the longest a run waits for the machine to calm down
_GAP = 3.0  # seconds before each run: longer than free page reporting's 2 s delay


def quiet_run(
    plan: Plan, quiet: float, max_others: float, tries: int = 3, gap: float = 0.0
) -> dict[str, Any]:
    """Run `plan` when the machine is quiet; run again (up to `tries` in all) while other
    work took more than `max_others` of the CPUs during it, and keep the quietest run.

    Each try starts at least `gap` seconds after the previous run ended (see the
    module docstring: memory freed that long ago costs every mode the same).
    """
    best: dict[str, Any] | None = None
    for _ in range(tries):
        t0 = time.monotonic()
        if quiet < 1:  # (1: do not wait, as --quiet says; a sample alone takes a second)
            wait_quiet(quiet, _QUIET_WAIT)
        time.sleep(max(0.0, gap - (time.monotonic() - t0)))
        r = run_transfer(plan)
        others = r.get("others_share")
        if best is None or (others or 0.0) < (best.get("others_share") or 0.0):
            best = r
        if others is None or others <= max_others:
            break
        print(f"  (other work took {100 * others:.0f}% of the CPUs: run again)", file=sys.stderr)
    assert best is not None
    return best


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _mib(kib: int | None) -> float:
    return float("nan") if kib is None else kib / 1024


def _med(values: Sequence[float | None]) -> float:
    got = [v for v in values if v is not None]
    return median(got) if got else float("nan")


def _growth(r: dict[str, Any], role: str) -> float:
    idle, peak = r["idle_kib"].get(role), r["peak_kib"].get(role)
    if idle is None or peak is None:
        return float("nan")
    return (peak - idle) / 1024


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one (mode, sites, size, chunk, window)."""
    first = runs[0]
    site_roles = [k for k in first["idle_kib"] if k.startswith("site-")]

    def med_of(fn: Callable[[dict[str, Any]], float | None]) -> float:
        return _med([fn(r) for r in runs])

    return {
        "mode": first["mode"],
        "sites": first["sites"],
        "size": first["size"],
        "agg": med_of(lambda r: r["agg_mibps"]),
        "agg_range": (min(r["agg_mibps"] for r in runs), max(r["agg_mibps"] for r in runs)),
        "site_min": med_of(lambda r: min(r["site_mibps"])),
        "site_med": med_of(lambda r: median(r["site_mibps"])),
        "ok": sum(r["digests_ok"] for r in runs),
        "n": sum(r["sites"] for r in runs),
        "failed": sum(not ok for r in runs for ok in r["ok"]),
        "reasons": [x for r in runs for x in r["reasons"]],
        "idle": {
            "owner": med_of(lambda r: _mib(r["idle_kib"]["owner"])),
            "broker": med_of(lambda r: _mib(r["idle_kib"]["broker"])),
            "site": med_of(lambda r: max(_mib(r["idle_kib"][s]) for s in site_roles)),
        },
        "peak": {
            "owner": med_of(lambda r: _mib(r["peak_kib"]["owner"])),
            "broker": med_of(lambda r: _mib(r["peak_kib"]["broker"])),
            "site": med_of(lambda r: max(_mib(r["peak_kib"][s]) for s in site_roles)),
        },
        "growth": {
            "owner": med_of(lambda r: _growth(r, "owner")),
            "broker": med_of(lambda r: _growth(r, "broker")),
            "site": med_of(lambda r: max(_growth(r, s) for s in site_roles)),
        },
        "cpu": {
            role: med_of(lambda r, role=role: r["cpu_ms_per_mib"].get(role))  # type: ignore[misc]
            for role in ("owner", "broker", "sites", "proxy")
        },
        "peak_reset": all(r["peak_reset"] for r in runs),
        "others": med_of(lambda r: r.get("others_share")),
        "via_broker": med_of(lambda r: r.get("broker_share")),
        "direct_problems": [r["direct_problem"] for r in runs if r.get("direct_problem")],
        "threads": _thread_medians(runs),
    }


def _thread_medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for role in runs[0].get("thread_ms_per_mib", {}):
        labels = {lab for r in runs for lab in r["thread_ms_per_mib"].get(role, {})}
        out[role] = {
            lab: _med([r["thread_ms_per_mib"].get(role, {}).get(lab, 0.0) for r in runs])
            for lab in sorted(labels)
        }
    return out


def print_threads(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> None:
    """CPU ms per MiB of each kind of thread, per role: where each process spends it."""
    print()
    print("CPU by thread (ms per MiB moved, all sites together; ZMQbg/IO = libzmq's I/O thread)")
    for key, by_mode in groups.items():
        for mode in MODES:
            s = by_mode.get(mode)
            if s is None:
                continue
            head = f"{key[0]} site(s) {fmt_size(key[1])} {fmt_size(key[2])} w{key[3]} {mode}"
            print(f"  {head}:")
            for role, threads in s["threads"].items():
                parts = sorted(threads.items(), key=lambda kv: -kv[1])
                text = ", ".join(f"{lab} {v:.2f}" for lab, v in parts if v >= 0.005)
                print(f"    {role:6} {sum(threads.values()):5.2f} = {text}")


def _arrow(idle: float, peak: float) -> str:
    return f"{idle:.0f}→{peak:.0f}"


def table_rows(
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]], with_proxy: bool = False
) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the main table; `groups` maps a case to {mode: summary}."""
    headers = ["sites", "size", "chunk", "win", "mode", "MiB/s", "range", "site min", "site med"]
    headers += ["vs raw", "sha256 ok", "via broker", "owner RSS", "broker RSS", "site RSS max"]
    headers += ["owner ms/MiB", "broker ms/MiB", "sites ms/MiB", "others %"]
    if with_proxy:
        headers.append("proxy ms/MiB")
    rows: list[list[Any]] = []
    for key, by_mode in groups.items():
        sites, size, chunk, window = key[:4]
        raw = by_mode.get("raw")
        for mode in MODES:
            s = by_mode.get(mode)
            if s is None:
                continue
            ratio = f"{s['agg'] / raw['agg']:.2f}x" if raw and raw["agg"] > 0 else "-"
            checked = f"{s['ok']}/{s['n']}"
            if s["failed"]:
                checked += f" ({s['failed']} failed)"
            row: list[Any] = [sites, fmt_size(size), fmt_size(chunk), window, mode]
            lo, hi = s["agg_range"]
            row += [s["agg"], f"{lo:.0f}-{hi:.0f}", s["site_min"], s["site_med"], ratio, checked]
            via = s["via_broker"]
            row.append(f"{100 * via:.0f}%" if via == via else "-")  # (nan: not measured)
            row += [_arrow(s["idle"][r], s["peak"][r]) for r in ("owner", "broker", "site")]
            row += [s["cpu"]["owner"], s["cpu"]["broker"], s["cpu"]["sites"]]
            row.append(round(100 * s["others"]) if s["others"] == s["others"] else "-")
            if with_proxy:
                row.append(s["cpu"]["proxy"])
            rows.append(row)
    return headers, rows


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _targets(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]], chunk: int) -> bool:
    """Print the targets that the cases run can judge; True if none missed."""
    lines: list[str] = []
    all_ok = True
    for key, by_mode in groups.items():
        sites, size, c, window = key[:4]
        w, raw = by_mode.get("windowed"), by_mode.get("raw")
        if w is None or raw is None or c != chunk or raw["agg"] <= 0:
            continue
        ratio = w["agg"] / raw["agg"]
        ok = ratio >= _RATIO_TARGET
        all_ok &= ok
        what = "one site" if sites == 1 else f"{sites} sites aggregate"
        lines.append(
            f"{what}, {fmt_size(size)}, chunk {fmt_size(c)} window {window}: windowed "
            f"{w['agg']:.0f} MiB/s = {ratio:.2f}x raw {raw['agg']:.0f} "
            f"(target >= {_RATIO_TARGET:g}x): {_verdict(ok)}"
        )
    for key, by_mode in groups.items():
        sites, size, c, window = key[:4]
        w = by_mode.get("windowed")
        if w is None or size < _GIB:
            continue
        g = w["growth"]
        ok = g["owner"] <= _GROWTH_TARGET_MIB and g["site"] <= _GROWTH_TARGET_MIB
        all_ok &= ok
        lines.append(
            f"memory, {sites} site(s), {fmt_size(size)}, chunk {fmt_size(c)} window {window}: "
            f"peak above idle owner +{g['owner']:.0f} MiB, worst site +{g['site']:.0f} MiB "
            f"(target <= {_GROWTH_TARGET_MIB} MiB): {_verdict(ok)}"
        )
        small = next(
            (
                m["windowed"]
                for k, m in groups.items()
                if k[0] == sites and k[2:4] == (c, window) and k[1] < size and "windowed" in m
            ),
            None,
        )
        flat = g["broker"] <= _GROWTH_TARGET_MIB
        note = f"broker +{g['broker']:.0f} MiB"
        if small is not None:
            flat &= g["broker"] <= small["growth"]["broker"] + _BROKER_SCALE_MIB
            note += f" (at {fmt_size(small['size'])}: +{small['growth']['broker']:.0f} MiB)"
        all_ok &= flat
        lines.append(
            f"  broker flat, {sites} site(s): {note} (target: <= {_GROWTH_TARGET_MIB} MiB and "
            f"within {_BROKER_SCALE_MIB} MiB of the smaller object's): {_verdict(flat)}"
        )
    for key, by_mode in groups.items():
        d = by_mode.get("direct")
        if d is None:
            continue
        taken = not d["direct_problems"]
        all_ok &= taken
        via = f"{100 * d['via_broker']:.0f}%" if d["via_broker"] == d["via_broker"] else "-"
        lines.append(
            f"direct link taken, {key[0]} site(s), {fmt_size(key[1])}, chunk "
            f"{fmt_size(key[2])} window {key[3]}: {via} of the bytes through the broker "
            f"(target: every site's link up, <= {100 * MAX_BROKER_SHARE:.0f}%): {_verdict(taken)}"
            + ("" if taken else f" ({d['direct_problems'][0]})")
        )
    failures = [(key, mode, s) for key, m in groups.items() for mode, s in m.items() if s["failed"]]
    wrong = [
        (key, mode, s) for key, m in groups.items() for mode, s in m.items() if s["ok"] < s["n"]
    ]
    for key, mode, s in failures:
        lines.append(f"FAILED downloads, {mode} {key[:4]}: {s['reasons'][:3]}")
    if wrong:
        all_ok = False
        lines.append(f"digest check: {len(wrong)} case(s) with a wrong or missing file: MISS")
    else:
        lines.append("digest check: every destination's sha256 equals the source's: PASS")
    print()
    print("targets:")
    for line in lines:
        print(f"  {line}")
    return all_ok


def _dict_targets(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> bool:
    """Print the state dict's targets against the same bytes as a file; True if none missed."""
    lines: list[str] = []
    all_ok = True
    for key, by_mode in groups.items():
        sites, size, chunk, window = key[:4]
        d, w = by_mode.get("dict"), by_mode.get("windowed")
        if d is None:
            continue
        what = f"{sites} site(s), {fmt_size(size)}, chunk {fmt_size(chunk)} window {window}"
        if w is not None and w["agg"] > 0:
            ratio = d["agg"] / w["agg"]
            ok = ratio >= _DICT_RATIO_TARGET
            all_ok &= ok
            lines.append(
                f"state dict, {what}: {d['agg']:.0f} MiB/s = {ratio:.2f}x the file's "
                f"{w['agg']:.0f} (target >= {_DICT_RATIO_TARGET:g}x): {_verdict(ok)}"
            )
        mib = size / (1 << 20)
        owner = d["growth"]["owner"]  # the dict is in the owner's idle RSS already
        site = d["growth"]["site"] - mib  # the received dict is the site's growth
        ok = owner <= _DICT_GROWTH_MIB and site <= _DICT_GROWTH_MIB
        all_ok &= ok
        lines.append(
            f"state dict memory, {what}: owner +{owner:.0f} MiB above the dict, worst site "
            f"+{site:.0f} MiB above the result (target <= {_DICT_GROWTH_MIB} MiB): "
            f"{_verdict(ok)}"
        )
    if lines:
        print()
        print("state dict targets:")
        for line in lines:
            print(f"  {line}")
    return all_ok


def _copy_cost(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> None:
    """What handing a plain Consumer ``bytes`` (the seed's types) costs against views."""
    lines = []
    for key, by_mode in groups.items():
        b, v = by_mode.get("seed"), by_mode.get("seed-views")
        if b is None or v is None or v["agg"] <= 0:
            continue
        sites, size, chunk = key[:3]
        cpu_b, cpu_v = b["cpu"]["sites"], v["cpu"]["sites"]
        cpu = f"{cpu_b - cpu_v:+.2f}" if cpu_b == cpu_b and cpu_v == cpu_v else "-"
        lines.append(
            f"{sites} site(s), {fmt_size(size)}, chunk {fmt_size(chunk)}: bytes "
            f"{b['agg']:.0f} MiB/s, views {v['agg']:.0f} MiB/s ({b['agg'] / v['agg']:.2f}x); "
            f"sites' CPU {cpu} ms/MiB for the copy"
        )
    if lines:
        print()
        print("seed exchange, bytes (the default) vs views (accepts_views = True):")
        for line in lines:
            print(f"  {line}")


def _aio_ratio(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> None:
    """The asyncio site against the threaded one (issue 15's target: at least 0.95x)."""
    lines = []
    for key, by_mode in groups.items():
        a, w = by_mode.get("aio"), by_mode.get("windowed")
        if a is None or w is None or w["agg"] <= 0:
            continue
        sites, size = key[:2]
        ratio = a["agg"] / w["agg"]
        verdict = "PASS" if ratio >= 0.95 else "MISS"
        lines.append(
            f"{sites} site(s), {fmt_size(size)}: asyncio {a['agg']:.0f} MiB/s, threaded "
            f"{w['agg']:.0f} MiB/s ({ratio:.2f}x; target >= 0.95x: {verdict})"
        )
    if lines:
        print()
        print("asyncio site (objdl.aio.download_file) vs threaded (download_file):")
        for line in lines:
            print(f"  {line}")


def _direct_ratio(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> None:
    """The direct owner->site link against the broker path, same chunk and window."""
    lines = []
    for key, by_mode in groups.items():
        d, w = by_mode.get("direct"), by_mode.get("windowed")
        if d is None or w is None or w["agg"] <= 0:
            continue
        sites, size = key[:2]
        note = "" if not d["direct_problems"] else " (NOT direct: its runs failed, see targets)"
        lines.append(
            f"{sites} site(s), {fmt_size(size)}: direct {d['agg']:.0f} MiB/s, through the "
            f"broker {w['agg']:.0f} MiB/s ({d['agg'] / w['agg']:.2f}x){note}"
        )
    if lines:
        print()
        print("direct owner->site link (owner data_bind) vs through the broker (windowed):")
        for line in lines:
            print(f"  {line}")


def _best(groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]]) -> None:
    combos = {(k[2], k[3]) for k in groups}
    if len(combos) < 2:
        return
    print()
    for sites, size in sorted({(k[0], k[1]) for k in groups}):
        cands = [
            (m["windowed"]["agg"], k[2], k[3], m.get("raw"))
            for k, m in groups.items()
            if k[:2] == (sites, size) and "windowed" in m
        ]
        if not cands:
            continue
        agg, chunk, window, raw = max(cands)
        vs = f" = {agg / raw['agg']:.2f}x raw" if raw and raw["agg"] > 0 else ""
        print(
            f"best objdl windowed for {sites} site(s) x {fmt_size(size)}: chunk "
            f"{fmt_size(chunk)} window {window}, {agg:.0f} MiB/s{vs} "
            f"(in flight per site: {fmt_size(chunk * window)})"
        )


def _size_list(text: str) -> list[int]:
    try:
        values = [parse_size(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected e.g. 256MiB,1GiB, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _mode_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in MODES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"modes are {','.join(MODES)}; got {text!r}")
    return [m for m in MODES if m in values]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sites", type=_int_list, default=[1, 4], help="site counts (1,4)")
    p.add_argument(
        "--size", type=_size_list, default=None, help="object sizes (256MiB; --dict: 1GiB)"
    )
    p.add_argument(
        "--dict",
        action="store_true",
        help="a torch state dict against the same bytes as a file (modes windowed,dict)",
    )
    p.add_argument(
        "--chunk",
        type=_size_list,
        default=[DEFAULT_CHUNK_SIZE],
        help=f"chunk sizes ({DEFAULT_CHUNK_SIZE >> 20}MiB, the library's default)",
    )
    p.add_argument("--window", type=_int_list, default=[8], help="requests in flight (8)")
    p.add_argument("--repeat", type=int, default=3, help="repeats; medians shown (3)")
    p.add_argument(
        "--modes",
        type=_mode_list,
        default=list(DEFAULT_MODES),
        help=f"some of {','.join(MODES)} ({','.join(DEFAULT_MODES)})",
    )
    p.add_argument(
        "--tmpdir",
        default=None,
        help="folders the files go in, comma-separated, each with its own table (a new "
        "folder under the current directory: an ordinary file system; e.g. .,/dev/shm)",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="sites fsync the file and its rename before they stop the clock (every mode)",
    )
    p.add_argument(
        "--gap",
        type=float,
        default=_GAP,
        help=f"seconds between one run's end and the next's start ({_GAP:g}; see above)",
    )
    p.add_argument("--profile", metavar="DIR", default=None, help="py-spy recordings into DIR")
    p.add_argument(
        "--profile-roles",
        default="owner,broker,site",
        help="which processes --profile records (owner,broker,site: the first site)",
    )
    p.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (Python time only)",
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        help="run a case again (3 tries, the quietest kept) while other work took more than "
        "this share of the CPUs during it (0.2; 1 to never)",
    )
    p.add_argument(
        "--by-thread", action="store_true", help="also print CPU per MiB of each kind of thread"
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each run, wait (up to 60 s) until less than this share of the CPUs "
        "is busy (0.25; 1 to not wait)",
    )
    return p


def _folders(text: str | None) -> list[str | None]:
    """The folders ``--tmpdir`` names (None: a new one under the current directory)."""
    if text is None:
        return [None]
    return [v.strip() or None for v in text.split(",")] or [None]


def _make_workdirs(folders: list[str | None]) -> dict[str, str]:
    """A fresh folder inside each of `folders`, by its label (its path and file system)."""
    made: dict[str, str] = {}
    try:
        for folder in folders:
            where = os.getcwd() if folder is None else folder
            workdir = tempfile.mkdtemp(prefix="objdl-bench-", dir=where)
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


_Groups = dict[tuple[Any, ...], dict[str, dict[str, Any]]]  # case -> mode -> summary


def _compare_folders(by_folder: dict[str, _Groups]) -> None:
    """One line per case and mode: MiB/s in each folder, and its ratio to the relay there."""
    if len(by_folder) < 2:
        return
    labels = list(by_folder)
    print()
    print("by folder (MiB/s, x the relay in the same folder):")
    for key in next(iter(by_folder.values())):
        sites, size, chunk, window = key[:4]
        for mode in MODES:
            parts = []
            for label in labels:
                s = by_folder[label].get(key, {}).get(mode)
                raw = by_folder[label].get(key, {}).get("raw")
                if s is None:
                    continue
                vs = f" = {s['agg'] / raw['agg']:.2f}x" if raw and raw["agg"] > 0 else ""
                parts.append(f"{label}: {s['agg']:.0f}{vs}")
            if parts:
                head = f"{sites} site(s) x {fmt_size(size)}, {fmt_size(chunk)} w{window}, {mode}"
                print(f"  {head}: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.size is None:
        args.size = [_GIB if args.dict else 256 << 20]
    if args.dict:
        args.modes = ["windowed", "dict"]
    if args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    if args.gap < 0:
        print("--gap must be >= 0", file=sys.stderr)
        return 2
    if "direct" in args.modes and metrics_missing() is not None:
        print(f"--modes direct {metrics_missing()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    print(machine_line())
    note = free_page_reporting()
    if note:
        print(f"memory: {note}")
    print(
        f"run: sites {','.join(map(str, args.sites))} | size "
        f"{','.join(map(fmt_size, args.size))} | chunk {','.join(map(fmt_size, args.chunk))} | "
        f"window {','.join(map(str, args.window))} | modes {','.join(args.modes)} | "
        f"{args.repeat} repeat(s), medians shown | fsync {'on' if args.fsync else 'off'} | "
        f"{args.gap:g} s before each run | broker, owner and each site in its own process "
        "on 127.0.0.1"
    )
    sys.stdout.flush()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    started = time.monotonic()
    workdirs = _make_workdirs(_folders(args.tmpdir))
    print(f"files in: {'; '.join(workdirs)}")
    sys.stdout.flush()
    by_folder: dict[str, _Groups] = {label: {} for label in workdirs}
    try:
        for size in sorted(args.size):
            sources = {}
            for label, workdir in workdirs.items():
                src = os.path.join(workdir, f"src-{fmt_size(size)}.bin")
                sources[label] = (src, write_source(src, size))
            for sites, chunk, window in itertools.product(args.sites, args.chunk, args.window):
                key = (sites, size, chunk, window)
                runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                    label: {m: [] for m in args.modes} for label in workdirs
                }
                for i in range(args.repeat):
                    order = args.modes if i % 2 == 0 else list(reversed(args.modes))
                    for label, workdir in workdirs.items():
                        src, digest = sources[label]
                        for mode in order:
                            tag = f"{mode}-{sites}s-{fmt_size(size)}-{fmt_size(chunk)}-w{window}"
                            if len(workdirs) > 1:
                                tag += f"-{fs_type(workdir)}"
                            plan = Plan(
                                mode=mode,
                                sites=sites,
                                src=src,
                                size=size,
                                digest=digest,
                                chunk=chunk,
                                window=window,
                                workdir=workdir,
                                fsync=args.fsync,
                                profile_dir=args.profile,
                                profile_roles=tuple(args.profile_roles.split(",")),
                                profile_gil=args.profile_gil,
                                tag=tag,
                            )
                            r = quiet_run(plan, args.quiet, args.max_others, gap=args.gap)
                            runs[label][mode].append(r)
                            share = r.get("broker_share")
                            via = "" if share is None else f", {100 * share:.0f}% via the broker"
                            why = r.get("direct_problem")
                            print(
                                f"  {tag} repeat {i + 1}/{args.repeat}: "
                                f"{r['agg_mibps']:.0f} MiB/s, sha256 {r['digests_ok']}/{sites}"
                                f"{via}{f' ({why})' if why else ''}",
                                file=sys.stderr,
                                flush=True,
                            )
                for label in workdirs:
                    by_folder[label][key] = {m: summarize(rs) for m, rs in runs[label].items()}
            for src, _ in sources.values():
                os.unlink(src)
    finally:
        for workdir in workdirs.values():
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        "MiB/s: aggregate = sites x size / (last end - first start), median (range) over "
        "repeats; site = size / its own time. RSS: MiB, idle→peak. CPU: user+sys ms per MiB "
        "moved (all sites together). others %: share of the machine busy with other work "
        "(not this run's processes) during the transfer. via broker: bytes the objdl broker "
        "routed / bytes moved."
    )
    ok = True
    for label, groups in by_folder.items():
        print()
        print(f"files in {label}:")
        headers, rows = table_rows(groups)
        print_table(headers, rows)
        if not all(s["peak_reset"] for m in groups.values() for s in m.values()):
            print("(peak RSS could not be reset before the transfer: peaks are the whole life's)")
        if args.by_thread:
            print_threads(groups)
        ok &= _targets(groups, args.chunk[0] if len(args.chunk) == 1 else DEFAULT_CHUNK_SIZE)
        ok &= _dict_targets(groups)
        _copy_cost(groups)
        _aio_ratio(groups)
        _direct_ratio(groups)
        _best(groups)
    _compare_folders(by_folder)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n(took {time.monotonic() - started:.1f} s; load avg now {load}; a shared 2-core")
    print(" machine widens the spread: compare ratios within one run, and rerun when in doubt)")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
