"""bench_download.py's ``direct`` mode beside ``windowed`` on a tiny file: the table, the
share of the bytes the broker routed, the check that the direct link was taken, and what
says a run did not take it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmarks._direct import MAX_BROKER_SHARE, direct_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_download.py")
# 2 sites x 4 MiB, small chunks (most of the file is still to come once the link is up),
# at once: no waiting for a quiet machine, no second try.
TINY = ["--sites", "2", "--size", "4MiB", "--chunk", "16KiB", "--window", "4", "--repeat", "1"]
TINY += ["--gap", "0", "--quiet", "1", "--max-others", "1"]
UP = {"state": "up", "links_opened": 1, "links_failed": 0, "links_lost": 0}

pytestmark = pytest.mark.timeout(120)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}


def _run(cwd: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=100, check=False
    )


def test_direct_beside_windowed_takes_the_link(tmp_path: object) -> None:
    folder = str(tmp_path)
    p = _run(
        folder, [sys.executable, SCRIPT, *TINY, "--modes", "windowed,direct", "--tmpdir", folder]
    )
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    shares = {}
    for mode in ("windowed", "direct"):
        row = re.search(
            rf"^\s+2\s+4MiB\s+16KiB\s+4\s+{mode}\s+([\d.,]+)\s.*?\s(\d+/\d+)\s+(\d+)%\s", out, re.M
        )
        assert row is not None, f"no {mode} row in:\n{out}"
        assert float(row.group(1).replace(",", "")) > 0
        assert row.group(2) == "2/2"  # both sha256 matched, no "(n failed)"
        shares[mode] = int(row.group(3))
    assert shares["windowed"] >= 100 and shares["direct"] <= 100 * MAX_BROKER_SHARE
    assert re.search(
        r"direct link taken, 2 site\(s\), 4MiB, chunk 16KiB window 4: \d+% of the bytes "
        r"through the broker \(target: every site's link up, <= 50%\): PASS",
        out,
    ), out
    assert re.search(
        r"2 site\(s\), 4MiB: direct \d+ MiB/s, through the broker \d+ MiB/s \(\d+\.\d\dx\)$",
        out,
        re.M,
    ), out
    assert "digest check: every destination's sha256 equals the source's: PASS" in out
    assert "direct link not used" not in out + p.stderr
    assert os.listdir(folder) == []  # every file and folder removed


def test_direct_without_prometheus_client_is_refused_with_how_to_install(
    tmp_path: object,
) -> None:
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "import benchmarks._direct as d\n"
        "d.metrics_missing = lambda: 'needs prometheus_client: pip install -e .[bench]'\n"
        "import benchmarks.bench_download as b\n"
        "b.metrics_missing = d.metrics_missing\n"
        "raise SystemExit(b.main({!r}))\n"
    ).format(ROOT, [*TINY, "--modes", "direct", "--tmpdir", str(tmp_path)])
    p = _run(str(tmp_path), [sys.executable, "-c", code])
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--modes direct needs prometheus_client: pip install" in p.stderr
    assert os.listdir(str(tmp_path)) == []  # refused before anything ran


def test_direct_problem_names_what_says_the_link_was_not_taken() -> None:
    moved = 100 << 20
    assert direct_problem(10 << 20, moved, [UP, UP]) == ""
    why = direct_problem(60 << 20, moved, [UP, UP])
    assert why.startswith(
        "direct link not used: the broker routed 60% of the bytes moved "
        "(at most 50% for a direct run; "
    )
    why = direct_problem(
        0,
        moved,
        [
            {**UP, "state": "connecting"},
            {**UP, "links_lost": 1},
            {"state": "none", "links_opened": 0},
            None,
        ],
    )
    assert "site-1's link was 'connecting' at the end, not 'up'" in why
    assert "site-2's links: links_lost 1" in why
    assert "site-3 opened no link" in why
    assert "site-4 did not report its link" in why
    # Not measured proves nothing: it fails too.
    assert "the broker's routed bytes were not read" in direct_problem(None, moved, [UP])
