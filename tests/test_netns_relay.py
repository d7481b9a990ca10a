"""A tree across hosts: the root broker and an owner, a relay, and a site in three network
namespaces joined by two veth links; the relay's link to the root cut mid-download.

Needs root and ``ip netns`` (iproute2); skipped with the reason otherwise. The
namespaces, links and link-local addresses are made here and removed at the end; no
traffic leaves them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.test_netns import end, in_ns, sh

MiB = 1024 * 1024


@pytest.fixture
def tree_hosts() -> Iterator[dict[str, str]]:
    """Namespaces 'hub' -- 'relay' -- 'site': two veth links, the relay in the middle."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's ip to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    hub, relay, site = (f"objdl-{role}-{tag}" for role in ("hub", "relay", "site"))
    try:
        sh("ip", "netns", "add", hub)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    made = [hub]
    try:
        for ns in (relay, site):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        links = (
            (hub, f"th{tag}", "169.254.78.1/30", relay, f"tr{tag}", "169.254.78.2/30"),
            (relay, f"ts{tag}", "169.254.78.5/30", site, f"tc{tag}", "169.254.78.6/30"),
        )
        for ns_a, dev_a, addr_a, ns_b, dev_b, addr_b in links:
            sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth",
               "peer", "name", dev_b, "netns", ns_b)  # fmt: skip
            for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield {
            "hub": hub,
            "relay": relay,
            "site": site,
            "hub_dev": f"th{tag}",
            "root_url": "tcp://169.254.78.1:18351",
            "relay_url": "tcp://169.254.78.5:18352",
        }
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _broker(ns: str, url: str, *extra: str) -> subprocess.Popen[str]:
    proc = in_ns(ns, "-m", "broker", "--bind", url, *extra,
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout is not None and "listening" in proc.stdout.readline()
    return proc


@pytest.mark.timeout(150)
def test_a_download_through_a_relay_on_another_host_survives_its_link_cut(
    tree_hosts: dict[str, str], tmp_path: Path
) -> None:
    h = tree_hosts
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(6 * MiB))
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_broker(h["hub"], h["root_url"]))
        relay_args = ("--upstream", h["root_url"], "--prefix", "site-1", "--upstream-timeout", "1")
        procs.append(_broker(h["relay"], h["relay_url"], *relay_args))
        ref_file = tmp_path / "ref"
        owner = ("netns_owner_main", h["root_url"], str(src), str(ref_file), "0.02")
        procs.append(in_ns(h["hub"], "-m", "tests._procs", *owner))
        wait_for(ref_file.exists, timeout=30)
        progress = tmp_path / "progress"
        # The site cell is "site-1", the relay's prefix itself; it knows only the relay.
        site = in_ns(
            h["site"], "-m", "tests._procs", "netns_site_main", h["relay_url"],
            ref_file.read_text(), str(tmp_path / "copy.bin"), str(progress),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        procs.append(site)
        wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= MiB, timeout=30)
        sh("ip", "-n", h["hub"], "link", "set", h["hub_dev"], "down")  # cut root -- relay
        time.sleep(3)  # the scenario: longer than the relay's upstream timeout (1 s)
        sh("ip", "-n", h["hub"], "link", "set", h["hub_dev"], "up")  # and restore it
        out, _ = site.communicate(timeout=100)
        assert site.returncode == 0, out
        assert "OK" in out
        copy = tmp_path / "copy.bin"
        assert (
            hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
        )
    finally:
        for p in procs:
            end(p)
