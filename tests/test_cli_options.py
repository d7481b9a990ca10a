"""Every option of serve/get/cells, run as a user would: the objdl command as a subprocess."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from objdl.cell import Cell
from tests._cli_procs import CLI, Child, assert_one_line_error, run, run_cli


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def _serve(paths: list[Path], name: str, url: str, *extra: str) -> Child:
    return Child(
        [*CLI, "serve", *map(str, paths), "--name", name, "--broker", url, "--timeout", "30",
         *extra]
    )  # fmt: skip


def _offered(serve: Child, n: int) -> list[dict[str, Any]]:
    for i in range(n):
        serve.wait_for_line(lambda line, i=i: sum('"offered"' in x for x in serve.out) > i)
    return [e for e in _events(serve.out) if e["event"] == "offered"]


# ---------------------------------------------------------------- pasted get lines


WEIRD = [
    "-starts-with-dash.bin",
    "sp ace 'quote\" $(touch pwned).bin",
    "semi;colon&amp",
    "tab\tnew\nline",
]


def test_printed_get_lines_work_through_a_shell(broker: Any, tmp_path: Path) -> None:
    src, out, outside = tmp_path / "src", tmp_path / "out", tmp_path / "outside.bin"
    src.mkdir()
    out.mkdir()
    for i, name in enumerate(WEIRD):
        (src / name).write_bytes(f"file {i}".encode() * 100)
    (src / "sub").mkdir()
    (src / "sub" / "deep.bin").write_bytes(b"not served")
    outside.write_bytes(b"secret outside the folder")
    (src / "link-out").symlink_to(outside)
    (src / "link-in").symlink_to(src / WEIRD[0])
    serve = _serve([src], "owner-paste", broker.url, "--sites", "1")
    try:
        serve.wait_for_line(lambda line: line.startswith("serving "))
        lines = [x.strip() for x in serve.out if x.strip().startswith("objdl get ")]
        assert len(lines) == len(WEIRD) + 1  # the link inside the folder is served too
        # Paste each line into a POSIX shell, where `objdl` runs this checkout's CLI.
        shim = f'objdl() {{ {shlex.quote(sys.executable)} -m objdl.cli "$@"; }}'
        for line in lines:
            got = run(["sh", "-c", f"{shim}\n{line}"], cwd=out)
            assert got.returncode == 0, (line, got.stderr)
        for name in WEIRD:
            saved = out / name.replace("\t", "_").replace("\n", "_")
            assert saved.read_bytes() == (src / name).read_bytes()
        assert (out / "link-in").read_bytes() == (src / WEIRD[0]).read_bytes()
        assert not (out / "pwned").exists() and not (tmp_path / "pwned").exists()
        assert not (out / "link-out").exists() and not (out / "deep.bin").exists()
        assert serve.wait(20.0) == 0, serve.err
        skipped = "\n".join(serve.err)
        assert "skipping" in skipped and "sub: a subdirectory" in skipped
        assert "link-out: a symlink that leads out of the folder" in skipped
    finally:
        serve.stop()


# ---------------------------------------------------------------- JSON, allowed sites, digest


def test_json_events_allowed_sites_digest_window_chunk(broker: Any, tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(1024 * 1024 + 3))
    serve = _serve(
        [f], "owner-json", broker.url, "--allowed-sites", "site-1, site-2", "--sites", "1",
        "--digest", "sha256", "--chunk-size", "256KiB", "--json",
    )  # fmt: skip
    try:
        (offered,) = _offered(serve, 1)
        assert offered["name"] == "model.bin" and offered["size"] == f.stat().st_size
        assert "--name site-1" in offered["get"]
        get = ["get", offered["ref"], "--from", "owner-json", "--broker", broker.url, "--json"]
        refused = run_cli([*get, "--name", "site-3", "-o", str(tmp_path / "x"), "--tries", "1"])
        assert_one_line_error(refused, "unauthenticated")
        err = _events(refused.stdout.splitlines())
        assert [e["event"] for e in err] == ["failed", "error"]
        assert err[-1]["code"] == 1 and err[-1]["kind"] == "failed"
        ok = run_cli(
            [*get, "--name", "site-1", "-o", str(tmp_path / "y"), "--window", "2",
             "--chunk-size", "64KiB"]
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stderr == ""  # --json: no progress on stderr
        events = _events(ok.stdout.splitlines())
        assert events[-1]["event"] == "done" and events[-1]["size"] == f.stat().st_size
        progress = [e for e in events if e["event"] == "progress"]
        assert progress and progress[-1]["bytes"] == progress[-1]["total"] == f.stat().st_size
        assert all(set(e) >= {"event", "time", "ref", "bytes", "total", "rate"} for e in progress)
        assert (tmp_path / "y").read_bytes() == f.read_bytes()
        assert serve.wait(20.0) == 0
        kinds = [e["event"] for e in _events(serve.out)]
        assert kinds[0] == "offered" and kinds[-1] == "summary"
        assert "done" in kinds and "progress" in kinds
        done = next(e for e in _events(serve.out) if e["event"] == "done")
        assert done["site"] == "site-1" and done["bytes_sent"] >= f.stat().st_size
        summary = _events(serve.out)[-1]
        assert summary["status"] == "finished"
        assert summary["refs"][offered["ref"]]["finished"] == ["site-1"]
        assert summary["refs"][offered["ref"]]["refused"] == {"site-3": "unauthenticated"}
    finally:
        serve.stop()


def test_max_size_refuses_a_larger_object(broker: Any, tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 100_000)
    serve = _serve([f], "owner-max", broker.url, "--json")
    try:
        (offered,) = _offered(serve, 1)
        base = ["get", offered["ref"], "--from", "owner-max", "--name", "site-1",
                "--broker", broker.url]  # fmt: skip
        small = run_cli([*base, "-o", str(tmp_path / "small"), "--max-size", "10KB"])
        assert_one_line_error(small, "download of", "failed")
        assert small.returncode == 1
        assert not (tmp_path / "small").exists()
        fits = run_cli([*base, "-o", str(tmp_path / "fits"), "--max-size", "100KB"])
        assert fits.returncode == 0, fits.stderr
    finally:
        serve.stop()


def test_cells_json_and_name(broker: Any) -> None:
    with Cell("gamma", broker.url), Cell("gamma.w1", broker.url):
        proc = run_cli(["cells", "--broker", broker.url, "--name", "lister", "--json"])
        assert proc.returncode == 0, proc.stderr
        events = _events(proc.stdout.splitlines())
        assert [e["name"] for e in events if e["event"] == "cell"] == ["gamma", "gamma.w1"]
        assert {e["broker"] for e in events} == {broker.url}  # every cell's, and the summary's
        assert events[-1]["event"] == "summary" and events[-1]["count"] == 2
        taken = run_cli(["cells", "--broker", broker.url, "--name", "gamma", "--json"])
        assert_one_line_error(taken, "'gamma'", "already uses it")
        assert _events(taken.stdout.splitlines())[-1]["kind"] == "name_taken"


# ---------------------------------------------------------------- environment


def test_environment_gives_defaults_and_options_win(
    broker: Any, dead_url: str, tmp_path: Path
) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"m" * 5000)
    env = {"OBJDL_BROKER": broker.url, "OBJDL_NAME": "owner-env"}
    serve = Child([*CLI, "serve", str(f), "--sites", "1", "--json"], env=env)
    try:
        (offered,) = _offered(serve, 1)
        assert "--from owner-env" in offered["get"]
        # The variables are wrong for this site; its options win over them.
        site_env = {"OBJDL_BROKER": dead_url, "OBJDL_NAME": "owner-env"}
        got = run_cli(
            ["get", offered["ref"], "--from", "owner-env", "--broker", broker.url,
             "--name", "site-1", "-o", str(tmp_path / "out.bin")],
            env=site_env,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert serve.wait(20.0) == 0
    finally:
        serve.stop()
    # Only the variable: it is used (and named in the error).
    proc = run_cli(
        ["cells", "--connect-timeout", "0.5"], env={"OBJDL_BROKER": dead_url}
    )  # fmt: skip
    assert_one_line_error(proc, f"no broker answered at {dead_url}")
    proc = run_cli(
        ["cells", "--broker", dead_url], env={"OBJDL_KEY": str(tmp_path / "nokey.key_secret")}
    )
    assert_one_line_error(proc, f"--key {tmp_path / 'nokey.key_secret'}: no such file")
    assert proc.returncode == 2
    helped = run_cli(["get", "--help"])
    for var in ("OBJDL_BROKER", "OBJDL_NAME", "OBJDL_KEY", "OBJDL_BROKER_KEY", "OBJDL_PEER_KEYS"):
        assert var in helped.stdout
    assert "an option given wins over its variable" in " ".join(helped.stdout.split())


# ---------------------------------------------------------------- key mistakes


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    proc = run_cli(["keys", "new", "site-1", "--dir", str(d)])
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "--key {d}/nope.key_secret: no such file"),
        ("public key as --key", "--key {d}/site-1.key: not a usable key pair"),
        ("not a key", "--key {d}/junk.txt: not a usable key pair"),
        ("readable by others", "--key {d}/lax.key_secret: a secret key readable by other users"),
        ("a folder", "--key {d}: not a regular file"),
        ("broker key junk", "--broker-key {d}/junk.txt: not a public key"),
        ("broker key without key", "--broker-key needs --key"),
        ("secure without peer keys", "--secure needs --key"),
        ("peer keys not a folder", "--peer-keys {d}/junk.txt: not a directory"),
    ],
)
def test_key_mistakes_name_the_file(case: str, expected: str, keydir: Path, dead_url: str) -> None:
    d = keydir
    (d / "junk.txt").write_text("hello")
    lax = d / "lax.key_secret"
    lax.write_bytes((d / "site-1.key_secret").read_bytes())
    lax.chmod(0o644)
    good = ["--key", str(d / "site-1.key_secret")]
    args = {
        "missing": ["--key", str(d / "nope.key_secret")],
        "public key as --key": ["--key", str(d / "site-1.key")],
        "not a key": ["--key", str(d / "junk.txt")],
        "readable by others": ["--key", str(lax)],
        "a folder": ["--key", str(d)],
        "broker key junk": [*good, "--broker-key", str(d / "junk.txt")],
        "broker key without key": ["--broker-key", str(d / "site-1.key")],
        "secure without peer keys": [*good, "--secure"],
        "peer keys not a folder": [*good, "--peer-keys", str(d / "junk.txt")],
    }[case]
    proc = run_cli(
        ["get", "R1", "--from", "owner", "--name", "site-1", "-o", str(d / "out"),
         "--broker", dead_url, "--connect-timeout", "20", *args, "--json"],
        timeout=10.0,
    )  # fmt: skip
    assert_one_line_error(proc, expected.format(d=d))
    assert proc.returncode == 2
    assert _events(proc.stdout.splitlines())[-1]["kind"] == "usage"


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_get_resume_after_a_real_interruption(
    sig: signal.Signals, broker: Any, tmp_path: Path
) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(4 * 1024 * 1024))
    size = f.stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    serve = _serve([f], "owner-resume", broker.url, "--sites", "1", "--json")
    try:
        (offered,) = _offered(serve, 1)
        get = [*CLI, "get", offered["ref"], "--from", "owner-resume", "--name", "site-1",
               "--broker", broker.url, "-o", str(out / "model.bin"), "--resume", "--json",
               "--window", "1", "--chunk-size", "1KiB"]  # fmt: skip
        first = Child(get)
        try:  # slow on purpose (1 KiB per round trip): stop it a good way in
            first.wait_for_line(
                lambda line: '"progress"' in line and json.loads(line)["bytes"] > 2**18
            )
            first.signal(sig)
            rc = first.wait(15.0)
        finally:
            first.stop()
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 130
            assert first.err == [
                "objdl: error: stopped; what arrived is kept: run the same command to continue"
            ]
        b1 = max(e["bytes"] for e in _events(first.out) if e["event"] == "progress")
        assert not (out / "model.bin").exists()
        assert [p.name for p in out.iterdir() if p.name.endswith(".objdl-part")]
        rest = [*get[len(CLI) : -4], "--window", "4", "--chunk-size", "16KiB"]  # faster now
        again = run_cli(rest, timeout=60.0)
        assert again.returncode == 0, again.stderr
        progress = [e for e in _events(again.stdout.splitlines()) if e["event"] == "progress"]
        # A restart reports 16 KiB first; a resumed download starts from what was kept.
        assert progress[0]["bytes"] > 64 * 1024, progress[0]
        assert (out / "model.bin").read_bytes() == f.read_bytes()
        assert sorted(p.name for p in out.iterdir()) == ["model.bin"]
        assert serve.wait(20.0) == 0
        done = next(e for e in _events(serve.out) if e["event"] == "done")
        # Both runs together cost the owner less than the first run plus a whole file.
        assert done["bytes_sent"] < b1 + size, (done, b1)
    finally:
        serve.stop()
