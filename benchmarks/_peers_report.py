"""Medians, tables, ratios, targets and the picture of :mod:`benchmarks.bench_peers`.

A *case* is ``(sites, size)``; a folder's results map each case to ``{system:
summary}``, where a summary holds the medians over repeats of one system in one case
(:func:`summarize`). Everything here reads those summaries and prints or draws; it
runs nothing.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._direct import MAX_BROKER_SHARE
from benchmarks._util import fmt_size, median, print_table

__all__ = [
    "DIRECT_TARGET",
    "GROWTH_TARGET_MIB",
    "NVFLARE_TARGET",
    "RELAY_TARGET",
    "Groups",
    "case_label",
    "plot",
    "print_ratios",
    "print_results",
    "print_targets",
    "summarize",
]

NVFLARE_TARGET = 3.0  # objdl (best of its paths) >= this x NVFlare, every case
RELAY_TARGET = 0.9  # objdl through the broker >= this x the bare relay, every case
DIRECT_TARGET = 1.3  # direct path >= this x the relay, 4 and 8 sites
GROWTH_TARGET_MIB = 64  # owner, broker, site peak <= idle + this, 1 GiB file
_GIB = 1 << 30

Groups = dict[tuple[int, int], dict[str, dict[str, Any]]]  # (sites, size) -> system -> summary


def case_label(sites: int, size: int) -> str:
    return f"{sites} site{'s' if sites > 1 else ''} x {fmt_size(size)}"


def _med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return median(got) if got else None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _role_max(r: dict[str, Any], key: str, role: str) -> float | None:
    """A role's value in MiB; for ``site``, the largest over the sites."""
    table = r.get(key, {})
    if role != "site":
        return _mib(table.get(role))
    values = [_mib(v) for k, v in table.items() if k.startswith("site-")]
    return None if not values or None in values else max(v for v in values if v is not None)


def _growth(r: dict[str, Any], role: str) -> float | None:
    if role == "site":
        sites = [k for k in r.get("idle_kib", {}) if k.startswith("site-")]
        growths = []
        for s in sites:
            idle, peak = r["idle_kib"].get(s), r["peak_kib"].get(s)
            if idle is None or peak is None:
                return None
            growths.append((peak - idle) / 1024)
        return max(growths) if growths else None
    idle, peak = r.get("idle_kib", {}).get(role), r.get("peak_kib", {}).get(role)
    return None if idle is None or peak is None else (peak - idle) / 1024


def _per_role(
    runs: list[dict[str, Any]],
    fn: Callable[[dict[str, Any], str], float | None],
    roles: Sequence[str],
) -> dict[str, float | None]:
    return {role: _med([fn(r, role) for r in runs]) for role in roles}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one system in one case."""

    def med_of(fn: Callable[[dict[str, Any]], float | None]) -> float | None:
        return _med([fn(r) for r in runs])

    aggs = [r["agg_mibps"] for r in runs if r.get("agg_mibps") is not None]
    roles = ("owner", "broker", "site")
    return {
        "system": runs[0]["system"],
        "agg": _med(aggs),
        "agg_range": (min(aggs), max(aggs)) if aggs else None,
        "site_min": med_of(lambda r: min(r["site_mibps"]) if r["site_mibps"] else None),
        "site_med": med_of(lambda r: median(r["site_mibps"]) if r["site_mibps"] else None),
        "ok": sum(r["digests_ok"] for r in runs),
        "n": sum(r["sites"] for r in runs),
        "failed": sum(not ok for r in runs for ok in r["ok"]),
        "reasons": [x for r in runs for x in r["reasons"]],
        "idle": _per_role(runs, lambda r, role: _role_max(r, "idle_kib", role), roles),
        "peak": _per_role(runs, lambda r, role: _role_max(r, "peak_kib", role), roles),
        "growth": _per_role(runs, _growth, roles),
        "cpu": _per_role(
            runs,
            lambda r, role: r["cpu_s_per_gib"].get(role),
            ("owner", "broker", "sites", "total"),
        ),
        "others": med_of(lambda r: r.get("others_share")),
        "via_broker": med_of(lambda r: r.get("broker_share")),
        "path_errors": [r["path_error"] for r in runs if r.get("path_error")],
        "peak_reset": all(r.get("peak_reset", False) for r in runs),
        "repeats": len(runs),
    }


def _num(v: float | None) -> float | str:
    return "-" if v is None else v


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _arrow(idle: float | None, peak: float | None) -> str:
    return "-" if idle is None or peak is None else f"{idle:.0f}→{peak:.0f}"


def print_results(groups: Groups, systems: Sequence[str]) -> None:
    """One row per case and system: throughput, digests, memory and CPU."""
    headers = ["case", "system", "MiB/s", "range", "site min", "site med", "sha256 ok"]
    headers += ["via broker", "owner RSS", "broker RSS", "site RSS max"]
    headers += ["owner s/GiB", "broker s/GiB", "sites s/GiB", "total s/GiB", "others %"]
    rows: list[list[Any]] = []
    for (sites, size), by_system in groups.items():
        for name in systems:
            s = by_system.get(name)
            if s is None:
                continue
            checked = f"{s['ok']}/{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
            rng = s["agg_range"]
            row: list[Any] = [case_label(sites, size), name, _num(s["agg"])]
            row += ["-" if rng is None else f"{rng[0]:.0f}-{rng[1]:.0f}"]
            row += [_num(s["site_min"]), _num(s["site_med"]), checked, _pct(s["via_broker"])]
            row += [_arrow(s["idle"][r], s["peak"][r]) for r in ("owner", "broker", "site")]
            row += [_num(s["cpu"][r]) for r in ("owner", "broker", "sites", "total")]
            row.append("-" if s["others"] is None else round(100 * s["others"]))
            rows.append(row)
    print_table(headers, rows)


def _usable(s: dict[str, Any] | None) -> bool:
    """A summary with a speed that stands for its system: not one whose bytes took
    another path than its name says (a direct row that went through the broker)."""
    return s is not None and bool(s["agg"]) and not s["path_errors"]


def _ratio(groups: Groups, case: tuple[int, int], a: str, b: str) -> float | None:
    sa, sb = groups[case].get(a), groups[case].get(b)
    if sa is None or sb is None or not _usable(sa) or not _usable(sb):
        return None
    return float(sa["agg"] / sb["agg"])


def print_ratios(groups: Groups, systems: Sequence[str]) -> None:
    """Every ratio of aggregate MiB/s between two systems that ran, per case ("-" where
    one did not finish, or a direct row did not take the link)."""
    pairs = list(itertools.combinations(systems, 2))
    if not pairs:
        return
    headers = ["case"] + [f"{a}/{b}" for a, b in pairs]
    rows = []
    for case in groups:
        row: list[Any] = [case_label(*case)]
        for a, b in pairs:
            r = _ratio(groups, case, a, b)
            row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    print_table(headers, rows)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_targets(groups: Groups, ran: Sequence[str]) -> bool:
    """Print issue 13's targets for the cases run; True if every sha256 check passed and
    no run failed (a direct row whose bytes went through the broker fails its runs)."""
    lines: list[str] = []
    objdl_paths = [s for s in ("objdl", "objdl-direct") if s in ran]
    for case in groups:
        label = case_label(*case)
        best = max(
            ((r, s) for s in objdl_paths if (r := _ratio(groups, case, s, "nvflare")) is not None),
            default=None,
        )
        if best is not None:
            path = "through the broker" if best[1] == "objdl" else "direct"
            lines.append(
                f"{label}: objdl ({path}) = {best[0]:.2f}x NVFlare "
                f"(target >= {NVFLARE_TARGET:g}x): {_verdict(best[0] >= NVFLARE_TARGET)}"
            )
        r = _ratio(groups, case, "objdl", "relay")
        if r is not None:
            lines.append(
                f"{label}: objdl through the broker = {r:.2f}x the relay "
                f"(target >= {RELAY_TARGET:g}x): {_verdict(r >= RELAY_TARGET)}"
            )
        d = groups[case].get("objdl-direct")
        if d is not None:
            taken = not d["path_errors"]
            lines.append(
                f"{label}: objdl direct took the link: {_pct(d['via_broker'])} of the bytes "
                f"through the broker (target: every site's link up, <= "
                f"{100 * MAX_BROKER_SHARE:.0f}%): {_verdict(taken)}"
                + ("" if taken else f" ({d['path_errors'][0]})")
            )
        r = _ratio(groups, case, "objdl-direct", "relay")
        if r is not None and case[0] >= 4:
            lines.append(
                f"{label}: objdl direct = {r:.2f}x the relay "
                f"(target >= {DIRECT_TARGET:g}x): {_verdict(r >= DIRECT_TARGET)}"
            )
        for name in objdl_paths:
            s = groups[case].get(name)
            if s is None or case[1] < _GIB:
                continue
            g = s["growth"]
            if any(g[role] is None for role in ("owner", "broker", "site")):
                lines.append(f"{label}: {name} memory: peaks not readable: MISS")
                continue
            ok = all(g[role] <= GROWTH_TARGET_MIB for role in ("owner", "broker", "site"))
            lines.append(
                f"{label}: {name} peak above idle: owner +{g['owner']:.0f}, broker "
                f"+{g['broker']:.0f}, worst site +{g['site']:.0f} MiB "
                f"(target <= {GROWTH_TARGET_MIB} MiB each): {_verdict(ok)}"
            )
    wrong = [
        (case, name, s)
        for case, by_system in groups.items()
        for name, s in by_system.items()
        if s["ok"] < s["n"]
    ]
    for case, name, s in wrong:
        why = (
            "; ".join(dict.fromkeys(s["reasons"]))[:300] or "a destination differs from the source"
        )
        lines.append(f"{case_label(*case)}: {name}: {s['n'] - s['ok']} wrong or missing: {why}")
    failed = [  # files intact, yet the run failed (e.g. a direct row that used the broker)
        (case, name, s)
        for case, by_system in groups.items()
        for name, s in by_system.items()
        if s["failed"] and s["ok"] == s["n"]
    ]
    for case, name, s in failed:
        why = "; ".join(dict.fromkeys(s["reasons"]))[:300]
        lines.append(f"{case_label(*case)}: {name}: {s['failed']} site run(s) failed: {why}")
    if wrong:
        lines.append("sha256 check: some destinations differ from the source or are missing: MISS")
    else:
        lines.append("sha256 check: every destination's sha256 equals the source's: PASS")
    if failed:
        lines.append("runs: some failed although their files are intact: MISS")
    print("targets (issue 13):")
    for line in lines:
        print(f"  {line}")
    return not wrong and not failed


def plot(groups: Groups, systems: Sequence[str], path: str, title: str) -> str | None:
    """Draw MiB/s against the number of sites, one line per system; None, or why not.

    A direct row that did not take the link is left out (its runs failed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]' (or pip install matplotlib)"
    cases = sorted(groups)
    xs = list(range(len(cases)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    try:
        for name in systems:
            points = [
                (x, s["agg"], s["agg_range"])
                for x, case in zip(xs, cases, strict=True)
                if (s := groups[case].get(name)) is not None and _usable(s)
            ]
            if not points:
                continue
            px = [p[0] for p in points]
            py = [p[1] for p in points]
            lo = [p[1] - p[2][0] for p in points]
            hi = [p[2][1] - p[1] for p in points]
            ax.errorbar(px, py, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{s} site{'s' if s > 1 else ''}\n{fmt_size(n)}" for s, n in cases])
        ax.set_xlabel("sites x file size (one owner, every site downloading at once)")
        ax.set_ylabel("aggregate MiB/s (median; bars: range)")
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return None
