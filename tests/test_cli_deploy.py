"""The README's "Real deployment", step by step, every step a command a user would run.

Keys for a broker, an owner and two sites (``objdl keys``); a CURVE broker with an
allow-list; ``objdl serve --secure --allowed-sites`` and two ``objdl get --secure``;
then a site with an unknown key, and a key used under a name it is not bound to.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._cli_procs import CLI, Child, assert_one_line_error, run_cli

pytest.importorskip("cryptography")


class Deployment:
    """The files of the README's walk-through under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys = root / "keys"  # each party's own key pair (kept apart in real life)
        self.allowed = root / "allowed"  # the broker's allow-list: public keys only
        self.url = ""

    def key(self, name: str) -> str:
        return str(self.keys / f"{name}.key_secret")

    @property
    def broker_key(self) -> str:
        return str(self.keys / "broker.key")

    def cell_args(self, name: str, key: str | None = None) -> list[str]:
        return [
            "--name", name, "--broker", self.url, "--key", key or self.key(name),
            "--broker-key", self.broker_key, "--peer-keys", str(self.allowed),
        ]  # fmt: skip


def _keys(*args: str) -> None:
    proc = run_cli(["keys", *args])
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    # Step 1: every party makes its key pair; the operator allows the cells' public keys.
    for name in ("broker", "owner", "site-1", "site-2", "stranger"):
        _keys("new", name, "--dir", str(d.keys))
    for name in ("owner", "site-1", "site-2"):
        _keys("allow", name, "--dir", str(d.allowed), "--pub", str(d.keys / f"{name}.key"))
    # Step 2: the broker, with CURVE and the allow-list.
    broker = Child(
        [*CLI, "broker", "--bind", "tcp://127.0.0.1:*", "--curve-keys", d.key("broker"),
         "--allowed-keys", str(d.allowed)]
    )  # fmt: skip
    try:
        line = broker.wait_for_line(lambda line: "listening on" in line)
        d.url = line.split("listening on ", 1)[1].split()[0]
        yield d
    finally:
        broker.stop()


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


@pytest.mark.timeout(60)
def test_real_deployment_end_to_end(deployment: Deployment) -> None:
    d = deployment
    models = d.root / "models"
    models.mkdir()
    (models / "model.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (models / "config.json").write_text('{"layers": 8}')
    # A key bound to site-1, used under another name: refused before anything is served.
    wrong = run_cli(["cells", *d.cell_args("site-2", key=d.key("site-1"))])
    assert_one_line_error(wrong, "refused 'site-2'", "--key", "not allowed")
    assert wrong.returncode == 1

    # Step 3: the owner serves the folder, sealed, to site-1 and site-2 only.
    serve = Child(
        [*CLI, "serve", str(models), *d.cell_args("owner"), "--secure",
         "--allowed-sites", "site-1,site-2", "--sites", "2", "--timeout", "30", "--json"]
    )  # fmt: skip
    try:
        serve.wait_for_line(lambda line: '"event": "offered"' in line and "model.bin" in line)
        serve.wait_for_line(lambda line: '"event": "offered"' in line and "config.json" in line)
        offered = {e["name"]: e for e in _events(serve.out) if e["event"] == "offered"}
        assert set(offered) == {"model.bin", "config.json"}
        assert "--secure" in offered["model.bin"]["get"]

        # An allowed site asking in plaintext is refused: the owner serves sealed requests only.
        plain = run_cli(
            ["get", offered["config.json"]["ref"], "--from", "owner", *d.cell_args("site-1"),
             "-o", str(d.root / "plain.json"), "--tries", "1"]
        )  # fmt: skip
        assert_one_line_error(plain, "download of", "failed")
        assert plain.returncode == 1
        assert not (d.root / "plain.json").exists()

        # Step 4: site-1 sets its keys in the environment and runs the lines serve printed;
        # site-2 gives them as options.
        site_env = {
            "OBJDL_BROKER": d.url, "OBJDL_KEY": d.key("site-1"),
            "OBJDL_BROKER_KEY": d.broker_key, "OBJDL_PEER_KEYS": str(d.allowed),
        }  # fmt: skip
        for site in ("site-1", "site-2"):
            out = d.root / site
            out.mkdir()
            for name, ev in offered.items():
                if site == "site-1":
                    words = shlex.split(ev["get"])
                    assert words[:2] == ["objdl", "get"] and "--secure" in words
                    got = run_cli([*words[1:-2], "--json", *words[-2:]], cwd=out, env=site_env)
                else:
                    got = run_cli(
                        ["get", ev["ref"], "--from", "owner", *d.cell_args(site), "--secure",
                         "-o", str(out / name), "--json"]
                    )  # fmt: skip
                assert got.returncode == 0, got.stderr
                done = _events(got.stdout.splitlines())[-1]
                assert done["event"] == "done" and done["digest_verified"] is True, done
                assert (out / name).read_bytes() == (models / name).read_bytes()

        # A stranger's key is not on the allow-list: the broker turns it away.
        stranger = run_cli(
            ["get", offered["config.json"]["ref"], "--from", "owner",
             *d.cell_args("site-3", key=d.key("stranger")), "-o", str(d.root / "x"),
             "--connect-timeout", "3", "--json"]
        )  # fmt: skip
        line = assert_one_line_error(stranger, "the broker at", "refused --key", "stranger")
        assert stranger.returncode == 1
        last = json.loads(stranger.stdout.splitlines()[-1])
        assert last == {**last, "event": "error", "code": 1, "kind": "auth"}
        assert line == f"objdl: error: {last['message']}"
        assert not (d.root / "x").exists()

        assert serve.wait(20.0) == 0, serve.err
        summary = _events(serve.out)[-1]
        assert summary["event"] == "summary" and summary["status"] == "finished"
        for ref in summary["refs"].values():
            assert ref["finished"] == ["site-1", "site-2"], summary
        done = {(e["ref"], e["site"]) for e in _events(serve.out) if e["event"] == "done"}
        assert len(done) == 4
        assert serve.err == []  # --json: nothing on stderr when all went well
    finally:
        serve.stop()


def test_a_plain_cell_is_told_the_broker_uses_curve(deployment: Deployment) -> None:
    proc = run_cli(["cells", "--broker", deployment.url, "--connect-timeout", "1"])
    assert_one_line_error(proc, "give --key and --broker-key")
    assert proc.returncode == 1


@pytest.mark.timeout(60)
def test_direct_links_under_curve_only_for_the_keys_the_data_socket_allows(
    deployment: Deployment,
) -> None:
    """``--data-allowed-keys`` lets site-2's key in and not site-1's: site-2 pulls over
    the link, site-1's CURVE handshake with the data socket is refused and its download
    goes through the broker; both are sealed end to end and complete."""
    d = deployment
    src = d.root / "model.bin"
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    data_allowed = d.root / "data-allowed"
    _keys("allow", "site-2", "--dir", str(data_allowed), "--pub", str(d.keys / "site-2.key"))
    serve = Child(
        [*CLI, "serve", str(src), *d.cell_args("owner"), "--secure", "--sites", "2",
         "--timeout", "30", "--data-bind", "tcp://127.0.0.1:*", "--data-allowed-keys",
         str(data_allowed), "--json"]
    )  # fmt: skip
    try:
        line = serve.wait_for_line(lambda line: '"event": "offered"' in line)
        ref = json.loads(line)["ref"]
        # site-2's link may go down at the very end: the owner stops once both are done.
        for site, link in (("site-1", ["failed"]), ("site-2", ["up", "lost"])):
            got = run_cli(
                ["get", ref, "--from", "owner", *d.cell_args(site), "--secure",
                 "-o", str(d.root / f"{site}.bin"), "--window", "1", "--chunk-size", "64KiB",
                 "--json"]
            )  # fmt: skip
            assert got.returncode == 0, got.stderr
            done = _events(got.stdout.splitlines())[-1]
            assert done["event"] == "done" and done["direct"] in link, (site, done, got.stderr)
            assert (d.root / f"{site}.bin").read_bytes() == src.read_bytes()
        assert serve.wait(20.0) == 0, serve.err
        summary = _events(serve.out)[-1]
        assert summary["status"] == "finished" and summary["direct"]["links_bound"] >= 1
    finally:
        serve.stop()
