"""Smoke tests of the examples, each run as separate processes on loopback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tests._cli_procs import ROOT, Child, run

FEDERATION = ROOT / "examples" / "federation"


def test_federation_two_rounds_two_sites() -> None:
    federation("site.py", "site.py")


def test_federation_with_an_asyncio_site() -> None:
    """The asyncio site takes part beside a threaded one, with the threaded server."""
    out = federation("site.py", "aio_site.py")
    assert any("(asyncio)" in line for line in out[1])


def test_federation_over_direct_links() -> None:
    """Server and sites bind data sockets: the model and the updates skip the broker."""
    bind = ["--data-bind", "tcp://127.0.0.1:*"]
    outs = federation("site.py", "site.py", site_args=bind, server_args=[*bind, "--size-mib", "8"])
    for name, out in zip(("site-1", "site-2"), outs[:2], strict=True):
        assert f"{name}: direct link to server: up" in out, out
    assert "server: direct links to the sites: site-1 up, site-2 up" in outs[2], outs[2]


def federation(
    *site_scripts: str, site_args: Sequence[str] = (), server_args: Sequence[str] = ()
) -> list[list[str]]:
    """Run the server and one site per script for 2 rounds; the sites' output lines,
    then the server's."""
    broker = Child([sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:*"])
    procs: list[Child] = []
    try:
        url = broker.wait_for_line(lambda line: "listening on" in line).rsplit(" ", 1)[-1]
        # Sites first: they wait for the server, as in the README's terminals.
        for i, script in enumerate(site_scripts, 1):
            site = [sys.executable, str(FEDERATION / script), "--broker", url, "--timeout", "30"]
            procs.append(Child([*site, "--name", f"site-{i}", *site_args]))
        server = Child(
            [sys.executable, str(FEDERATION / "server.py"), "--broker", url, "--name", "server",
             "--sites", "2", "--rounds", "2", "--size-mib", "1", "--timeout", "30", *server_args]
        )  # fmt: skip
        procs.append(server)
        assert server.wait(40.0) == 0, server.out + server.err
        for site in procs[:2]:
            assert site.wait(20.0) == 0, site.out + site.err
        rounds = [line for line in server.out if line.startswith("round ")]
        assert [r.split(":")[0] for r in rounds] == ["round 1", "round 2"]
        assert "MiB to 2 sites" in rounds[0]
        assert any(line.startswith("server: 2 rounds in") for line in server.out)
        for site, name in zip(procs[:2], ("site-1", "site-2"), strict=True):
            assert any(line.startswith(f"{name}: round 2:") for line in site.out), site.out
        for p in procs:
            assert not any("Traceback" in line or "error" in line for line in p.err), p.err
        return [p.out for p in procs]
    finally:
        for p in procs:
            p.stop()
        broker.stop()


def test_embedded_workers_small() -> None:
    proc = run(
        [sys.executable, str(ROOT / "examples" / "embedded_workers.py"), "--workers", "2",
         "--shards", "3", "--shard-mib", "1", "--timeout", "30"],
        timeout=45.0,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "cells under site-1: site-1, site-1.w0, site-1.w1"
    assert lines[1].split() == ["worker", "shard", "MiB", "seconds", "MiB/s", "sha256", "ok"]
    rows = [line.split() for line in lines[2:]]
    assert [r[1] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert r[0] in ("site-1.w0", "site-1.w1") and r[2] == "1.0" and r[-1] == "yes", r
    assert "Traceback" not in proc.stderr
