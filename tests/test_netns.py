"""Several hosts: broker and sites in their own network namespaces, a link cut mid-download.

Needs root and ``ip netns`` (iproute2); skipped with the reason otherwise. The
namespaces, veth links and addresses (link-local, inside namespaces this test makes)
are created here and removed at the end; no traffic leaves them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """Two namespaces: 'hub' (broker and owner) and 'site', joined by one veth link."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's ip to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    hub, site = f"objdl-hub-{tag}", f"objdl-site-{tag}"
    veth_hub, veth_site = f"oh{tag}", f"os{tag}"
    try:
        sh("ip", "netns", "add", hub)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        sh("ip", "netns", "add", site)
        sh(
            "ip",
            "link",
            "add",
            veth_hub,
            "netns",
            hub,
            "type",
            "veth",
            "peer",
            "name",
            veth_site,
            "netns",
            site,
        )
        for ns, dev, addr in (
            (hub, veth_hub, "169.254.77.1/30"),
            (site, veth_site, "169.254.77.2/30"),
        ):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield {"hub": hub, "site": site, "hub_dev": veth_hub, "hub_addr": "169.254.77.1"}
    finally:
        for ns in (hub, site):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def in_ns(ns: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *args],
        cwd=ROOT,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.timeout(120)
def test_download_across_hosts_survives_a_cut_link(hosts: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(6 * MiB))
    url = f"tcp://{hosts['hub_addr']}:18321"
    procs: list[subprocess.Popen[str]] = []
    try:
        broker = in_ns(
            hosts["hub"],
            "-m",
            "broker",
            "--bind",
            url,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(broker)
        assert broker.stdout is not None and "listening" in broker.stdout.readline()
        ref_file = tmp_path / "ref"
        procs.append(
            in_ns(
                hosts["hub"],
                "-m",
                "tests._procs",
                "netns_owner_main",
                url,
                str(src),
                str(ref_file),
                "0.02",
            )
        )
        wait_for(ref_file.exists, timeout=30)
        progress = tmp_path / "progress"
        site = in_ns(
            hosts["site"], "-m", "tests._procs", "netns_site_main", url, ref_file.read_text(),
            str(tmp_path / "copy.bin"), str(progress), stdout=subprocess.PIPE,
        )  # fmt: skip
        procs.append(site)
        wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= MiB, timeout=30)
        sh("ip", "-n", hosts["hub"], "link", "set", hosts["hub_dev"], "down")  # cut the link
        time.sleep(3)  # longer than the cells' broker timeout: the site notices
        sh("ip", "-n", hosts["hub"], "link", "set", hosts["hub_dev"], "up")  # and restore it
        out, _ = site.communicate(timeout=90)
        assert site.returncode == 0, out
        assert "OK" in out
        copy = tmp_path / "copy.bin"
        assert (
            hashlib.sha256(copy.read_bytes()).hexdigest()
            == hashlib.sha256(src.read_bytes()).hexdigest()
        )
    finally:
        for p in procs:
            end(p)


@pytest.mark.timeout(120)
def test_cells_across_hosts_move_to_the_standby_when_the_primary_dies(
    hosts: dict[str, str], tmp_path: Path
) -> None:
    """Primary and standby brokers on the hub; the primary is killed mid-download and
    the owner (hub) and the site (other host) finish on the standby, verified."""
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(6 * MiB))
    primary = f"tcp://{hosts['hub_addr']}:18331"
    standby = f"tcp://{hosts['hub_addr']}:18332"
    urls = f"{primary},{standby}"
    procs: list[subprocess.Popen[str]] = []
    try:
        brokers = []
        for url in (primary, standby):
            b = in_ns(
                hosts["hub"], "-m", "broker", "--bind", url,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(b)
            assert b.stdout is not None and "listening" in b.stdout.readline()
            brokers.append(b)
        ref_file = tmp_path / "ref"
        procs.append(
            in_ns(
                hosts["hub"],
                "-m",
                "tests._procs",
                "netns_owner_main",
                urls,
                str(src),
                str(ref_file),
                "0.02",
            )
        )
        wait_for(ref_file.exists, timeout=30)
        progress = tmp_path / "progress"
        site = in_ns(
            hosts["site"], "-m", "tests._procs", "netns_site_main", urls, ref_file.read_text(),
            str(tmp_path / "copy.bin"), str(progress), stdout=subprocess.PIPE,
        )  # fmt: skip
        procs.append(site)
        wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= MiB, timeout=30)
        brokers[0].kill()  # the primary dies
        out, _ = site.communicate(timeout=90)
        assert site.returncode == 0, out
        assert "OK" in out
        copy = tmp_path / "copy.bin"
        assert (
            hashlib.sha256(copy.read_bytes()).hexdigest()
            == hashlib.sha256(src.read_bytes()).hexdigest()
        )
    finally:
        for p in procs:
            end(p)
