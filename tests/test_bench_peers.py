"""bench_peers.py end to end on its smallest case: the table is printed, every sha256 matched,
objdl-direct's bytes took the direct link (and a run whose bytes did not fails), a system
whose package is missing is skipped with a message, never a failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks._peers_nvflare import nvflare_missing
from benchmarks._peers_report import print_targets, summarize
from benchmarks._peers_run import Hub, ObjdlDirect, Spec, System, run_peer
from benchmarks._transfer import write_source
from benchmarks._util import Child
from benchmarks.bench_peers import parse_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_peers.py")
# The smallest case, at once: no tmpfs table, no waiting for a quiet machine, no second try.
SMALLEST = ["--cases", "1x4MiB", "--repeat", "1", "--tmpfs", "none"]
SMALLEST += ["--gap", "0", "--quiet", "1", "--max-others", "1"]
PASSED = "sha256 check: every destination's sha256 equals the source's: PASS"
# objdl-direct at 4 MiB: small chunks, so that most of the file is still to come when the
# link is up (the first reply and the first window go through the broker).
DIRECT = ["--cases", "2x4MiB", "--chunk", "16KiB", "--window", "4"]
DIRECT += SMALLEST[2:]

pytestmark = pytest.mark.timeout(120)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}


def _bench(cwd: str, *args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the benchmark in a fresh interpreter (`code`: a -c prelude that calls main)."""
    argv = [sys.executable, SCRIPT, *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=100, check=False
    )


def _row(out: str, system: str, case: str = "1 site x 4MiB") -> re.Match[str] | None:
    """The table row of `system` in `case`: its MiB/s, sha256 count and share via the broker."""
    return re.search(
        rf"^{case}\s+{re.escape(system)}\s+([\d.,]+)\s+\S+.*?\s(\d+/\d+)\s+(\d+%|-)\s",
        out,
        re.M,
    )


def _ratios(out: str) -> dict[str, str]:
    """The ratio table's header names -> their value in the table's one row."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(r"^case\s+\S+/\S+", line))
    names = lines[at].split()[1:]
    values = re.split(r"\s{2,}", lines[at + 2].strip())[1:]
    return dict(zip(names, values, strict=True))


def test_objdl_and_relay_smallest_case_prints_table_and_checks_sha256(tmp_path: object) -> None:
    folder = str(tmp_path)
    png = os.path.join(folder, "peers.png")
    p = _bench(folder, *SMALLEST, "--systems", "objdl,relay", "--tmpdir", folder, "--plot", png)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for system in ("objdl", "relay"):
        row = _row(out, system)
        assert row is not None, f"no {system} row in:\n{out}"
        assert float(row.group(1).replace(",", "")) > 0
        assert row.group(2) == "1/1"  # its one destination's sha256 equals the source's
    assert PASSED in out
    assert re.search(r"^1 site x 4MiB\s+\d+\.\d\dx\s*$", out, re.M), out  # objdl/relay
    assert "objdl through the broker = " in out and "the relay (target >= 0.9x)" in out
    assert "smoke only" in out
    if "plot: matplotlib is not installed" not in out:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(folder) == ["peers.png"] or os.listdir(folder) == []  # files removed


def test_objdl_direct_beside_objdl_and_relay_takes_the_link(tmp_path: object) -> None:
    folder = str(tmp_path)
    png = os.path.join(folder, "peers.png")
    systems = "objdl,objdl-direct,relay"
    p = _bench(folder, *DIRECT, "--systems", systems, "--tmpdir", folder, "--plot", png)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "objdl-direct: objdl direct owner->site link" in out
    assert "data socket tcp://127.0.0.1:*" in out
    shares = {}
    for system in systems.split(","):
        row = _row(out, system, "2 sites x 4MiB")
        assert row is not None, f"no {system} row in:\n{out}"
        assert float(row.group(1).replace(",", "")) > 0
        assert row.group(2) == "2/2"  # no "(n failed)": the direct check passed too
        shares[system] = row.group(3)
    # Through the broker every byte crosses it; direct, most bytes do not.
    assert int(shares["objdl"].rstrip("%")) >= 100
    assert int(shares["objdl-direct"].rstrip("%")) <= 50
    assert shares["relay"] == "-"
    ratios = _ratios(out)
    for pair in ("objdl/objdl-direct", "objdl-direct/relay", "objdl/relay"):
        assert re.fullmatch(r"\d+\.\d\dx", ratios[pair]), (pair, out)
    assert re.search(
        r"2 sites x 4MiB: objdl direct took the link: \d+% of the bytes through the broker "
        r"\(target: every site's link up, <= 50%\): PASS",
        out,
    ), out
    assert PASSED in out and "direct link not used" not in out + p.stderr
    if "plot: matplotlib is not installed" not in out:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class _SitesRefuseLinks(ObjdlDirect):
    """objdl-direct whose sites refuse the offered link: every byte goes through the broker."""

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        argv = super().site_argv(spec, url, ref, name, dest)
        kwargs = json.loads(argv[-1])
        return [*argv[:-1], json.dumps({**kwargs, "links": False})]


def test_a_direct_run_whose_bytes_went_through_the_broker_fails(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    src = os.path.join(str(tmp_path), "src.bin")
    digest = write_source(src, 4 << 20)
    spec = Spec(2, 4 << 20, src, digest, os.path.join(str(tmp_path), "run-1"), 64 << 10, 4)
    r = run_peer(_SitesRefuseLinks(), spec)
    assert r["digests_ok"] == 2  # the files are intact: only the path was wrong
    assert r["ok"] == [False, False]
    assert r["broker_share"] >= 1.0
    why = r["path_error"]
    assert why.startswith("direct link not used: ")
    assert "site-1 opened no link" in why and "site-2 opened no link" in why
    assert re.search(r"the broker routed 10\d% of the bytes moved", why), why  # (+ headers)
    assert "!! direct link not used" in capsys.readouterr().err  # said at once, loudly
    groups = {(2, 4 << 20): {"objdl-direct": summarize([r])}}
    assert print_targets(groups, ["objdl-direct"]) is False
    out = capsys.readouterr().out
    assert re.search(r"objdl direct took the link: 10\d% of the bytes through the broker", out)
    assert "(target: every site's link up, <= 50%): MISS" in out
    assert "runs: some failed although their files are intact: MISS" in out


@pytest.mark.skipif(nvflare_missing() is not None, reason=str(nvflare_missing()))
def test_nvflare_smallest_case_beside_objdl(tmp_path: object) -> None:
    folder = str(tmp_path)
    systems = "objdl,objdl-direct,nvflare"
    p = _bench(folder, *DIRECT, "--systems", systems, "--tmpdir", folder)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert "nvflare 2.9.0, chunk 5MiB" in out  # the pinned version, its default chunk
    for system in systems.split(","):
        row = _row(out, system, "2 sites x 4MiB")
        assert row is not None, f"no {system} row in:\n{out}"
        assert row.group(2) == "2/2"
    assert PASSED in out
    ratios = _ratios(out)
    for pair in ("objdl/nvflare", "objdl-direct/nvflare"):
        assert re.fullmatch(r"\d+\.\d\dx", ratios[pair]), (pair, out)
    assert re.search(r"objdl \((through the broker|direct)\) = \d+\.\d\dx NVFlare", out), out
    assert os.listdir(folder) == []


def test_a_missing_package_skips_its_system_with_how_to_install(tmp_path: object) -> None:
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "import benchmarks._peers_nvflare as nv, benchmarks._direct as d\n"
        "nv.nvflare_version = lambda: None  # as if nvflare were not installed\n"
        "d.metrics_missing = lambda: 'needs prometheus_client (as if it were not installed)'\n"
        "from benchmarks.bench_peers import main\n"
        "raise SystemExit(main({!r}))\n"
    ).format(ROOT, [*SMALLEST, "--systems", "objdl-direct,nvflare", "--tmpdir", str(tmp_path)])
    p = _bench(str(tmp_path), code=code)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nvflare: nvflare is not installed: pip install -e '.[bench]'" in p.stdout
    assert "objdl-direct: not run: it needs prometheus_client (as if" in p.stdout
    assert "nothing to run" in p.stdout


def test_cases_parse_and_sizes_replace_them() -> None:
    assert parse_cases("1x256MiB,1x1GiB,4x256MiB,8x64MiB", None) == [
        (8, 64 << 20),
        (1, 256 << 20),
        (4, 256 << 20),
        (1, 1 << 30),
    ]
    assert parse_cases("1,4,4x1GiB", [4 << 20]) == [(1, 4 << 20), (4, 4 << 20)]
    assert parse_cases("2", None) == [(2, 256 << 20)]
    for bad in ("", "x4MiB", "0x4MiB", "4xlots"):
        with pytest.raises(ValueError):
            parse_cases(bad, None)


class _SiteDies(System):
    """A system whose site process exits before it is ready: a broken peer."""

    name = "site-dies"
    has_hub = False

    def start_hub(self) -> Hub:
        return Hub(None, "")

    def start_owner(self, spec: Spec, url: str) -> tuple[Child, str, str]:
        code = "import sys; print('READY {}', flush=True); sys.stdin.readline()"
        owner = Child("owner", [sys.executable, "-c", code], stdin=True)
        owner.expect("READY", 30.0)
        return owner, "", ""

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


def test_a_run_that_breaks_is_reported_as_failed_not_raised(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    src = os.path.join(str(tmp_path), "src.bin")
    digest = write_source(src, 1 << 20)
    workdir = os.path.join(str(tmp_path), "run-1")
    spec = Spec(1, 1 << 20, src, digest, workdir, chunk=1 << 20, window=2)
    r = run_peer(_SiteDies(), spec)
    assert r["error"].startswith("ChildError: site-1: exited") and "before READY" in r["error"]
    assert r["digests_ok"] == 0 and r["ok"] == [False] and r["agg_mibps"] is None
    assert not os.path.exists(workdir)  # the run's folder goes, whatever happened
    groups = {(1, 1 << 20): {"site-dies": summarize([r])}}
    assert print_targets(groups, ["site-dies"]) is False
    out = capsys.readouterr().out
    assert "site-dies: 1 wrong or missing: ChildError: site-1: exited" in out
    assert "sha256 check: some destinations differ from the source or are missing: MISS" in out
