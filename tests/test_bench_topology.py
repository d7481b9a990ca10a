"""bench_topology.py end to end on its smallest case: both tables printed, every cell's
sha256 matched through the relays and the flat broker, every broker process ended."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_topology.py")
SMALLEST = ["--relays", "2", "--per-relay", "2", "--size", "1MiB", "--many-cells", "6"]
SMALLEST += ["--many-relays", "2", "--many-size", "64KiB", "--quiet", "1"]

pytestmark = pytest.mark.timeout(150)


def test_the_smallest_case_runs_and_every_download_completes(tmp_path: object) -> None:
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}
    done = subprocess.run(
        [sys.executable, SCRIPT, *SMALLEST],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    out = done.stdout
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: a target missed at this size
    assert re.search(r"^flat +[\d.]+ +4/4 ", out, re.M), out
    assert re.search(r"^2 relays +[\d.]+ +4/4 ", out, re.M), out
    assert re.search(r"^ +6 +6/6 ", out, re.M), out
    assert "all complete and every broker under 200 MiB peak RSS: PASS" in out
