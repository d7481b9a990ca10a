"""Direct links from the command line: ``serve --data-bind``, ``get`` taking the offer
(or not, with ``--no-direct``), and the mistakes refused before connecting.

Child processes against a broker on loopback, as a user would run them; the broker runs
in this process so its count of routed bytes shows which path the chunks took.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests._cli_procs import CLI, Child, assert_one_line_error, run_cli

_MIB = 1 << 20


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def _routed(broker: Any) -> int:
    return int(broker.stats()["routed_bytes"])


@pytest.mark.timeout(90)
def test_get_takes_the_link_that_serve_offers_and_no_direct_keeps_the_broker(
    broker: Any, tmp_path: Path
) -> None:
    size = 32 * _MIB
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(size))
    serve = Child(
        [*CLI, "serve", str(src), "--name", "owner-direct", "--broker", broker.url,
         "--sites", "2", "--timeout", "60", "--data-bind", "tcp://127.0.0.1:*", "--json"]
    )  # fmt: skip
    try:
        line = serve.wait_for_line(lambda line: '"offered"' in line)
        ref = json.loads(line)["ref"]
        got: dict[str, dict[str, Any]] = {}
        routed: dict[str, int] = {}
        # A small window of small chunks: the link is up long before most are asked for.
        for site, extra in (("site-1", []), ("site-2", ["--no-direct"])):
            before = _routed(broker)
            proc = run_cli(
                ["get", ref, "--from", "owner-direct", "--name", site, "--broker", broker.url,
                 "-o", str(tmp_path / f"{site}.bin"), "--window", "2", "--chunk-size",
                 "128KiB", "--json", *extra],
                timeout=60.0,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            routed[site] = _routed(broker) - before
            got[site] = _events(proc.stdout.splitlines())[-1]
            assert (tmp_path / f"{site}.bin").read_bytes() == src.read_bytes()
        assert got["site-1"]["event"] == "done" and got["site-1"]["direct"] == "up", got
        assert got["site-2"]["event"] == "done" and got["site-2"]["direct"] == "none", got
        # Through the broker: every chunk for site-2, at most the first few for site-1.
        assert routed["site-2"] >= size, routed
        assert routed["site-1"] < size // 2, routed
        assert serve.wait(30.0) == 0, serve.err
        summary = _events(serve.out)[-1]
        assert summary["event"] == "summary" and summary["status"] == "finished", summary
        direct = summary["direct"]
        assert direct["url"].startswith("tcp://127.0.0.1:") and direct["links_bound"] >= 1
        assert direct["links_refused"] == 0, summary
    finally:
        serve.stop()


def test_text_output_says_where_the_links_are_and_that_get_used_one(
    broker: Any, tmp_path: Path
) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(os.urandom(3 * _MIB))
    # No --sites: it serves until SIGTERM, so the link is still up when get ends.
    serve = Child(
        [*CLI, "serve", str(src), "--name", "owner-text", "--broker", broker.url,
         "--timeout", "30", "--data-bind", "tcp://127.0.0.1:*", "--data-advertise",
         "localhost"]
    )  # fmt: skip
    try:
        said = serve.wait_for_line(lambda line: "direct links on" in line)
        assert said.strip().startswith("direct links on tcp://localhost:"), said
        ref = next(line.split()[1] for line in serve.out if line.startswith("ref "))
        proc = run_cli(
            ["get", ref, "--from", "owner-text", "--name", "site-1", "--broker", broker.url,
             "-o", str(tmp_path / "out.bin"), "--chunk-size", "64KiB", "-q"]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "digest verified, over a direct link)" in proc.stdout, proc.stdout
        serve.signal(signal.SIGTERM)
        assert serve.wait(20.0) == 0, serve.err
        # The summary's line: how many links were made (LINK_OKs) and refused.
        made = [re.search(r"^  direct links on tcp://localhost:\d+: (\d+) made, 0 refused$", x)
                for x in serve.out]  # fmt: skip
        assert [int(m.group(1)) >= 1 for m in made if m] == [True], serve.out
    finally:
        serve.stop()


def test_a_site_that_cannot_reach_the_data_socket_uses_the_broker(
    broker: Any, dead_url: str, tmp_path: Path
) -> None:
    """An advertised address where nothing listens (a NAT, a firewall, a wrong
    --data-advertise): the link is never made, the download goes through the broker."""
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(4 * _MIB))
    serve = Child(
        [*CLI, "serve", str(src), "--name", "owner-far", "--broker", broker.url, "--sites",
         "1", "--timeout", "30", "--data-bind", "tcp://127.0.0.1:*", "--data-advertise",
         dead_url, "--json"]
    )  # fmt: skip
    try:
        ref = json.loads(serve.wait_for_line(lambda line: '"offered"' in line))["ref"]
        before = _routed(broker)
        proc = run_cli(
            ["get", ref, "--from", "owner-far", "--name", "site-1", "--broker", broker.url,
             "-o", str(tmp_path / "out.bin"), "--json"]
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        done = _events(proc.stdout.splitlines())[-1]
        # Still trying (for up to 3 s) or given up on: either way, not used.
        assert done["event"] == "done" and done["direct"] in ("connecting", "failed"), done
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        assert _routed(broker) - before >= src.stat().st_size
        assert serve.wait(20.0) == 0, serve.err
        assert _events(serve.out)[-1]["direct"]["links_bound"] == 0
    finally:
        serve.stop()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data-bind", "tcp://0.0.0.0:*"], "listens on every interface: give --data-advertise"),
        (["--data-bind", "tcp://*:9000"], "listens on every interface"),
        (["--data-bind", "udp://127.0.0.1:9000"], "--data-bind: invalid address"),
        (["--data-bind", "tcp://127.0.0.1:70000"], "--data-bind: invalid address"),
        (["--data-advertise", "owner-host"], "--data-advertise needs --data-bind"),
        (["--data-allowed-keys", "."], "--data-allowed-keys needs --data-bind"),
        (
            ["--data-bind", "tcp://0.0.0.0:9000", "--data-advertise", "tcp://owner-host:*"],
            "--data-advertise: invalid",
        ),
        (
            ["--data-bind", "tcp://127.0.0.1:*", "--data-advertise", "no/slash"],
            "--data-advertise: invalid",
        ),
        (
            ["--data-bind", "tcp://127.0.0.1:*", "--data-allowed-keys", "."],
            "--data-allowed-keys makes the data socket a CURVE server, which needs --key",
        ),
    ],
)
def test_data_options_refused_before_connecting(
    extra: list[str], expected: str, dead_url: str, tmp_path: Path
) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    proc = run_cli(
        ["serve", str(f), "--name", "owner", "--broker", dead_url, "--connect-timeout", "20",
         *extra],
        timeout=10.0,
    )  # fmt: skip
    assert_one_line_error(proc, expected)
    assert proc.returncode == 2


def test_a_data_port_in_use_is_one_line_before_connecting(dead_url: str, tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        proc = run_cli(
            ["serve", str(f), "--name", "owner", "--broker", dead_url, "--connect-timeout",
             "20", "--data-bind", bind],
            timeout=10.0,
        )  # fmt: skip
    finally:
        taken.close()
    assert_one_line_error(proc, f"--data-bind {bind}: cannot listen there", "in use")
    assert proc.returncode == 2


def test_curve_broker_needs_an_allow_list_for_the_data_socket(
    dead_url: str, tmp_path: Path
) -> None:
    from zmq.auth.certs import create_certificates

    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("owner", "broker"):
        create_certificates(keys, name)
    (keys / "owner.key_secret").chmod(0o600)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    common = ["serve", str(f), "--name", "owner", "--broker", dead_url, "--connect-timeout",
              "20", "--key", str(keys / "owner.key_secret"), "--broker-key",
              str(keys / "broker.key"), "--data-bind", "tcp://127.0.0.1:*"]  # fmt: skip
    proc = run_cli(common, timeout=10.0)
    assert_one_line_error(proc, "the data socket is a CURVE server too", "--data-allowed-keys")
    assert proc.returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli([*common, "--data-allowed-keys", str(empty)], timeout=10.0)
    assert_one_line_error(proc, f"--data-allowed-keys {empty}: holds no NAME.key file")
    assert proc.returncode == 2


@pytest.mark.timeout(60)
def test_demo_direct_reports_each_sites_link() -> None:
    proc = run_cli(["demo", "--direct", "--sites", "2", "--size", "8MiB", "-q"], timeout=50.0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "chunks over direct links to tcp://127.0.0.1:" in lines[0], lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("site "))
    assert lines[header].split() == ["site", "MiB", "seconds", "MiB/s", "direct", "digest", "ok"]
    for row in (lines[header + 1].split(), lines[header + 2].split()):
        assert row[0].startswith("demo-site-") and row[-2:] == ["yes", "yes"], row
    assert any(line.startswith("direct: yes = ") for line in lines)
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_demo_secure_direct_links_under_curve() -> None:
    """The data socket is a CURVE server with the demo's allow-list (the owner's
    --peer-keys, by default); each site's link is up and its download sealed."""
    pytest.importorskip("cryptography")
    proc = run_cli(
        ["demo", "--secure", "--direct", "--sites", "2", "--size", "8MiB", "-q"], timeout=50.0
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("site "))
    assert lines[header].split() == [
        "site", "MiB", "seconds", "MiB/s", "sealed", "direct", "digest", "ok"
    ]  # fmt: skip
    for row in (lines[header + 1].split(), lines[header + 2].split()):
        assert row[5] == "replies" and int(row[4]) >= 1, row
        assert row[6] == "yes" and row[-1] == "yes", row
