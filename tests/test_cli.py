"""The objdl command, run as child processes against a broker on loopback."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from objdl.cell import Cell
from objdl.downloader import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC
from objdl.message import Message, ReturnCode, make_reply
from objdl.objects import offer_bytes
from tests._cli_procs import CLI, Child, assert_one_line_error, run_cli


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_serve_and_get_end_to_end(broker: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big, small = src / "model.bin", src / "config.json"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    small.write_text('{"layers": 8}')
    out = tmp_path / "out"
    out.mkdir()
    serve = Child(
        [*CLI, "serve", str(big), str(small), "--name", "owner-e2e", "--broker", broker.url,
         "--sites", "1", "--timeout", "30"]
    )  # fmt: skip
    try:
        serve.wait_for_line(lambda line: line.startswith("serving 2 file(s)"))
        refs = [line.split()[1] for line in serve.out if line.startswith("ref ")]
        pastes = [line.strip() for line in serve.out if line.strip().startswith("objdl get ")]
        assert len(refs) == 2 and len(pastes) == 2, serve.out
        assert pastes[0] == (
            f"objdl get --from owner-e2e --name site-1 --broker {broker.url} "
            f"--output=model.bin -- {refs[0]}"
        )
        for paste in pastes:  # exactly what the owner printed, run in the output folder
            got = run_cli(shlex.split(paste)[1:], cwd=out)
            assert got.returncode == 0, got.stderr
            assert "digest verified" in got.stdout
            assert "Traceback" not in got.stderr
        assert _sha256(out / "model.bin") == _sha256(big)
        assert (out / "config.json").read_text() == small.read_text()
        assert serve.wait(20.0) == 0, serve.err
        assert "summary (finished):" in serve.out
        assert any(line.startswith("objdl: site-1 model.bin: 100%") for line in serve.err)
    finally:
        serve.stop()


def test_get_unknown_ref(broker: Any, tmp_path: Path) -> None:
    with Cell("owner-known", broker.url) as owner:
        offer_bytes(owner, b"something", timeout=30.0)
        proc = run_cli(
            ["get", "Rnot-a-ref", "--from", "owner-known", "--name", "site-1",
             "--broker", broker.url, "-o", str(tmp_path / "x")]
        )  # fmt: skip
    assert_one_line_error(proc, "no such ref", "Rnot-a-ref")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_get_stops_cleanly_on_ctrl_c(broker: Any, tmp_path: Path) -> None:
    asked, release = threading.Event(), threading.Event()

    def stuck(request: Message) -> Message:  # an owner that never answers in time
        asked.set()
        release.wait(20.0)
        return make_reply(ReturnCode.INVALID_REQUEST, "too late")

    with Cell("owner-stuck", broker.url) as owner:
        owner.register_request_cb(OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, stuck)
        get = Child(
            [*CLI, "get", "R1", "--from", "owner-stuck", "--name", "site-1", "--broker",
             broker.url, "-o", str(tmp_path / "out.bin")]
        )  # fmt: skip
        try:
            assert asked.wait(15.0), get.err
            get.signal(signal.SIGINT)
            assert get.wait(10.0) == 130
            assert get.err == ["objdl: error: stopped; nothing was written"]
            assert list(tmp_path.iterdir()) == []
        finally:
            release.set()
            get.stop()


@pytest.mark.parametrize("command", ["get", "serve", "cells"])
def test_unreachable_broker(command: str, dead_url: str, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    args = {
        "get": ["get", "R1", "--from", "owner", "--name", "site-1", "-o", str(tmp_path / "y")],
        "serve": ["serve", str(f), "--name", "owner"],
        "cells": ["cells"],
    }[command]
    proc = run_cli([*args, "--broker", dead_url, "--connect-timeout", "0.5"])
    assert_one_line_error(proc, f"no broker answered at {dead_url} within 0.5s")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["get", "R1", "--from", "owner", "--name", "bad name", "-o", "x"], "--name: invalid cell"),
        (["get", "R1", "--from", "a..b", "--name", "site-1", "-o", "x"], "--from: invalid cell"),
        (["serve", "README.md", "--name", "owner.", "--sites", "1"], "--name: invalid cell"),
        (["cells", "--prefix", "no/slash"], "--prefix: invalid cell"),
        (["get", "R1", "--from", "o", "--name", "s", "-o", "x", "--broker", "foo"], "broker URL"),
    ],
)
def test_invalid_input_fails_before_connecting(
    args: list[str], expected: str, dead_url: str
) -> None:
    if "--broker" not in args:
        args = [*args, "--broker", dead_url]
    proc = run_cli([*args, "--connect-timeout", "20"], timeout=10.0)  # no broker wait
    assert_one_line_error(proc, expected)
    assert proc.returncode == 2


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses everyone
        return Path("/proc")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def _plant(case: str, tmp_path: Path) -> Path:
    """A destination of the kind `case` names, made under `tmp_path`."""
    dest = tmp_path / "out.bin"
    if case == "missing folder":
        return tmp_path / "nope" / "out.bin"
    if case == "folder is a file":
        (tmp_path / "file").write_bytes(b"x")
        return tmp_path / "file" / "out.bin"
    if case == "destination is a folder":
        return tmp_path
    if case == "unwritable folder":
        return _unwritable_folder(tmp_path) / "out.bin"
    if case == "a FIFO":
        os.mkfifo(dest)
    elif case == "a symlink":
        (tmp_path / "victim").write_bytes(b"keep me")
        dest.symlink_to(tmp_path / "victim")
    elif case == "a dangling symlink":
        dest.symlink_to(tmp_path / "nowhere")
    elif case == "a socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(dest))
        finally:
            sock.close()
    elif case == "a device":
        return Path("/dev/null")
    return dest


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing folder", "does not exist"),
        ("folder is a file", "is not a folder"),
        ("destination is a folder", "is a directory"),
        ("unwritable folder", "cannot write in folder"),
        ("a FIFO", "is a FIFO, not a regular file"),
        ("a symlink", "is a symbolic link, not a regular file"),
        ("a dangling symlink", "is a symbolic link, not a regular file"),
        ("a socket", "is a socket, not a regular file"),
        ("a device", "is a character device, not a regular file"),
    ],
)
def test_bad_destination(case: str, expected: str, dead_url: str, tmp_path: Path) -> None:
    """Refused by the library's own check, before connecting (the broker is dead and the
    connect timeout longer than the test's): exit 2, one line, nothing touched."""
    dest = _plant(case, tmp_path)
    before = {p.name: p.lstat().st_mode for p in tmp_path.iterdir()}
    proc = run_cli(
        ["get", "R1", "--from", "owner", "--name", "site-1", "-o", str(dest),
         "--broker", dead_url, "--connect-timeout", "20"],
        timeout=10.0,
    )  # fmt: skip
    assert_one_line_error(proc, f"-o {dest}: ", expected)
    assert proc.returncode == 2
    assert {p.name: p.lstat().st_mode for p in tmp_path.iterdir()} == before
    if case == "a symlink":
        assert (tmp_path / "victim").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("name", "expected"), [("missing.bin", "no such file"), (".", "no regular files")]
)
def test_bad_source(name: str, expected: str, dead_url: str, tmp_path: Path) -> None:
    proc = run_cli(
        ["serve", str(tmp_path / name), "--name", "owner", "--broker", dead_url,
         "--connect-timeout", "20"],
        timeout=10.0,
    )  # fmt: skip
    assert_one_line_error(proc, f"cannot serve {tmp_path / name}", expected)


def test_usage_error_is_one_line() -> None:
    proc = run_cli(["get", "R1"])
    assert_one_line_error(proc, "required", "--from")
    assert proc.returncode == 2


def test_serve_times_out_with_summary(broker: Any, tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x" * 1000)
    proc = run_cli(
        ["serve", str(f), "--name", "owner-idle", "--broker", broker.url, "--sites", "2",
         "--timeout", "1"]
    )  # fmt: skip
    assert_one_line_error(proc, "gave up after 1s without a download request", "0 of 2 sites")
    assert proc.returncode == 1
    assert "summary (timeout):" in proc.stdout
    assert "model.bin R" in proc.stdout


@pytest.mark.parametrize(
    ("sig", "sites", "code"),
    [(signal.SIGTERM, None, 0), (signal.SIGINT, "2", 130)],
)
def test_serve_stops_cleanly_on_a_signal(
    sig: signal.Signals, sites: str | None, code: int, broker: Any, tmp_path: Path
) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x" * 1000)
    extra = ["--sites", sites] if sites else []
    serve = Child([*CLI, "serve", str(f), "--name", "owner-sig", "--broker", broker.url, *extra])
    try:
        serve.wait_for_line(lambda line: line.startswith("serving "))
        serve.signal(sig)
        assert serve.wait(15.0) == code, serve.err
        assert "summary (stopped):" in serve.out
        assert "Traceback" not in "\n".join(serve.err)
        if code:
            assert serve.err == ["objdl: error: stopped before 2 sites had every file"]
    finally:
        serve.stop()


def test_cells_lists_live_cells(broker: Any) -> None:
    cells = [Cell(name, broker.url) for name in ("alpha", "alpha.w0", "beta")]
    try:
        for c in cells:
            c.start()
        proc = run_cli(["cells", "--broker", broker.url])
        assert proc.returncode == 0, proc.stderr
        # One line per cell: its name, a tab, the broker it is on.
        rows = [line.split("\t") for line in proc.stdout.splitlines()]
        assert rows == [["alpha", broker.url], ["alpha.w0", broker.url], ["beta", broker.url]]
        proc = run_cli(["cells", "--broker", broker.url, "--prefix", "alpha"])
        assert proc.returncode == 0, proc.stderr
        assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["alpha", "alpha.w0"]
    finally:
        for c in cells:
            c.stop()


def test_broker_command_runs_until_sigterm() -> None:
    child = Child([*CLI, "broker", "--bind", "tcp://127.0.0.1:*"])
    try:
        line = child.wait_for_line(lambda line: "listening on" in line)
        assert line.startswith("objdl broker listening on tcp://127.0.0.1:")
        child.signal(signal.SIGTERM)
        assert child.wait(10.0) == 0
    finally:
        child.stop()


@pytest.mark.slow
def test_demo_two_sites() -> None:
    proc = run_cli(["demo", "--sites", "2", "--size", "16MiB"], timeout=50.0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("site "))
    assert lines[header].split() == ["site", "MiB", "seconds", "MiB/s", "digest", "ok"]
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [r[0] for r in rows] == ["demo-site-1", "demo-site-2"]
    for r in rows:
        assert r[-1] == "yes" and abs(float(r[1]) - 16.0) < 0.5, r
    assert "wall time" in lines[header + 3]
    assert "Traceback" not in proc.stderr


def _key_folders(root: Path) -> list[Path]:
    return sorted(root.glob("objdl-demo-keys-*"))


@pytest.mark.timeout(60)
def test_demo_secure_seals_every_download_and_removes_its_keys(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    proc = run_cli(
        ["demo", "--secure", "--sites", "2", "--size", "1MiB", "-q"],
        timeout=50.0,
        env={"TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "(CURVE, sealed end to end)" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("site "))
    assert lines[header].split() == ["site", "MiB", "seconds", "MiB/s", "sealed", "digest", "ok"]
    for row in (lines[header + 1].split(), lines[header + 2].split()):
        assert row[0].startswith("demo-site-") and row[-1] == "yes", row
        # Each site's count of sealed replies its cell opened during the download.
        assert row[5] == "replies" and int(row[4]) >= 1, row
    assert any(line.startswith("secure: CURVE on every connection") for line in lines)
    assert _key_folders(tmp_path) == []
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_demo_secure_removes_its_keys_on_ctrl_c(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    demo = Child(
        [*CLI, "demo", "--secure", "--sites", "2", "--size", "64MiB", "-q"],
        env={"TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 20.0
        while not _key_folders(tmp_path):  # made first, once Ctrl-C is handled
            assert demo.proc.poll() is None and time.monotonic() < deadline, demo.err
            time.sleep(0.01)
        (folder,) = _key_folders(tmp_path)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        demo.signal(signal.SIGINT)
        assert demo.wait(30.0) == 130, demo.out + demo.err
        assert _key_folders(tmp_path) == []
        assert demo.err[-1] == "objdl: error: stopped", demo.err
    finally:
        demo.stop()


def test_demo_secure_refuses_a_broker_of_its_own(dead_url: str) -> None:
    proc = run_cli(["demo", "--secure", "--broker", dead_url], timeout=10.0)
    assert_one_line_error(proc, "--secure starts its own CURVE broker")
    assert proc.returncode == 2


def test_keys_command_makes_a_key_pair_and_allow_list(tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "objdl.cli", "keys", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = run("new", "site-1", "--dir", str(tmp_path / "mine"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "mine" / "site-1.key").exists() and (
        tmp_path / "mine" / "site-1.key_secret"
    ).exists()
    pub = str(tmp_path / "mine" / "site-1.key")
    allowed = run(
        "allow",
        "site-1",
        "--dir",
        str(tmp_path / "allowed"),
        "--pub",
        pub,
        "--names",
        "site-1,site-1.*",
    )
    assert allowed.returncode == 0, allowed.stderr
    listed = run("list", "--dir", str(tmp_path / "allowed"))
    assert listed.returncode == 0 and "site-1" in listed.stdout
    bad = run(
        "allow",
        "site-2",
        "--dir",
        str(tmp_path / "allowed"),
        "--pub",
        str(tmp_path / "missing.key"),
    )
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
