"""The systems :mod:`benchmarks.bench_peers` compares, and one transfer of one of them.

How it works: every system is run by the same :func:`run_peer`, so the harness is
the same for all: it starts the system's hub (broker, relay, or none), its owner and N
site processes on 127.0.0.1, waits until every one is ready, sleeps half a second,
reads each one's RSS (idle), resets its peak mark (VmHWM) and reads its CPU time,
then sends ``GO`` to every site at once. Each site times its own download and
answers ``DONE``; the parent reads CPU time and peak RSS again, reads what crossed
objdl's broker (its ``--metrics``), ends every process by its pid, and checks every
destination's sha256 against the source's. A system only says which processes to
start (:class:`System`) and, for objdl's direct path, what proves the path was taken
(:meth:`System.check_path`).

The systems:

- ``objdl``: objdl through its broker, ``offer_file`` / ``download_file`` (the roles
  of :mod:`benchmarks._transfer`, mode ``windowed``; chunk and window are the
  library's defaults unless the benchmark is told otherwise);
- ``objdl-direct``: the same roles (mode ``direct``), the owner's cell made with
  ``data_bind="tcp://127.0.0.1:*"``: the broker carries each site's first reply, which
  offers the owner's data socket, and the chunks then go owner -> site directly. A run
  fails unless every site's link was up and the broker routed at most half the bytes
  moved (:mod:`benchmarks._direct`): a row that went through the broker is no "direct" row;
- ``nvflare``: NVFlare 2.9's ``ObjectDownloader`` file download (its roles in
  :mod:`benchmarks._peers_nvflare`; its default 5 MiB chunks, one request at a time);
- ``relay``: the bare pyzmq DEALER -> ROUTER -> DEALER relay of
  :mod:`benchmarks._transfer` (mode ``raw``), with objdl's chunk and window and
  objdl's file I/O on both ends.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from benchmarks import _direct, _peers_nvflare, _transfer
from benchmarks._transfer import child_argv, end_child, others_share
from benchmarks._util import (
    Child,
    ChildError,
    cpu_seconds_fine,
    file_sha256,
    fmt_size,
    peak_rss_kib,
    reset_peak_rss,
    rss_kib,
    system_busy_seconds,
)

__all__ = [
    "SYSTEMS",
    "Hub",
    "Nvflare",
    "Objdl",
    "ObjdlDirect",
    "Relay",
    "Spec",
    "System",
    "run_peer",
]

_TRANSFER = os.path.abspath(_transfer.__file__)
_SETTLE = 0.5  # seconds of quiet before the idle memory is read
_GIB = 1 << 30


@dataclass(frozen=True)
class Spec:
    """One transfer: which file, to how many sites, where, with which settings."""

    sites: int
    size: int
    src: str
    digest: str
    workdir: str  # a fresh folder for this run's destinations, removed after it
    chunk: int  # objdl's and the relay's chunk
    window: int  # objdl's and the relay's requests in flight
    nvflare_chunk: int | None = None  # None: NVFlare's default (5 MiB)
    fsync: bool = False
    request_timeout: float = 30.0


@dataclass(frozen=True)
class Hub:
    """What a system put between owner and sites: the process (None: nothing), the url
    owner and sites connect to, and where it counts what it routed (objdl's broker)."""

    child: Child | None
    url: str
    metrics_url: str | None = None


class System:
    """How to start one system's processes; :func:`run_peer` does the rest, alike for all."""

    name = ""
    title = ""
    has_hub = True  # a process between owner and sites (broker, relay)

    def missing(self) -> str | None:
        """Why this system cannot run here, or None when it can."""
        return None

    def settings(self, spec: Spec) -> str:
        """What the benchmark passes to this system, for the table's header."""
        return ""

    def start_hub(self) -> Hub:
        """Start the hub (or nothing, for a system without one)."""
        raise NotImplementedError

    def start_owner(self, spec: Spec, url: str) -> tuple[Child, str, str]:
        """Start the owner and wait until it is ready; return it, the sites' url, the ref."""
        raise NotImplementedError

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        """The command line of one site process."""
        raise NotImplementedError

    def check_path(self, spec: Spec, routed: int | None, links: list[Any]) -> str:
        """Why this run did not take the path this system stands for, or ``""``.

        `routed`: the bytes the broker routed (None: not measured); `links`: each
        site's direct link as it reported it (:func:`benchmarks._direct.link_report`).
        """
        return ""


def _hash_time(spec: Spec) -> float:
    return 60.0 + spec.size / (20 * 1024 * 1024)  # an owner may hash the file before READY


class Objdl(System):
    name = "objdl"
    title = "objdl through its broker (offer_file / download_file)"
    mode = "windowed"  # the roles' mode in benchmarks/_transfer.py

    def settings(self, spec: Spec) -> str:
        return f"chunk {fmt_size(spec.chunk)}, window {spec.window}"

    def start_hub(self) -> Hub:
        broker, url, metrics_url = _direct.start_metered_broker()
        return Hub(broker, url, metrics_url)

    def start_owner(self, spec: Spec, url: str) -> tuple[Child, str, str]:
        argv = child_argv(
            _TRANSFER,
            "objdl-owner",
            url=url,
            path=spec.src,
            chunk=spec.chunk,
            mode=self.mode,
            direct=self.mode == "direct",
        )
        owner = Child("objdl-owner", argv, stdin=True)
        try:
            ref = owner.expect("READY", _hash_time(spec))["ref"]
        except BaseException:
            owner.stop()
            raise
        return owner, url, ref

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        return child_argv(
            _TRANSFER,
            "objdl-site",
            url=url,
            name=name,
            ref=ref,
            dest=dest,
            chunk=spec.chunk,
            window=spec.window,
            mode=self.mode,
            timeout=spec.request_timeout,
            fsync=spec.fsync,
        )


class ObjdlDirect(Objdl):
    """objdl's direct data path (issue 13, part 2): the broker for control, the chunks
    owner -> site over the owner's data socket (``Cell(..., data_bind=...)``)."""

    name = "objdl-direct"
    title = "objdl direct owner->site link (owner data_bind, offer_file / download_file)"
    mode = "direct"

    def missing(self) -> str | None:
        why = _direct.metrics_missing()
        return None if why is None else f"not run: it {why}"

    def settings(self, spec: Spec) -> str:
        return f"{super().settings(spec)}, data socket {_direct.DATA_BIND}"

    def check_path(self, spec: Spec, routed: int | None, links: list[Any]) -> str:
        return _direct.direct_problem(routed, spec.sites * spec.size, links)


class Nvflare(System):
    name = "nvflare"
    title = "NVFlare ObjectDownloader file download (root cell 'server', client cells)"
    has_hub = False  # NVFlare's sites connect to the server cell itself

    def missing(self) -> str | None:
        return _peers_nvflare.nvflare_missing()

    def settings(self, spec: Spec) -> str:
        chunk = "5MiB, its default" if spec.nvflare_chunk is None else fmt_size(spec.nvflare_chunk)
        return f"nvflare {_peers_nvflare.nvflare_version()}, chunk {chunk}, one request at a time"

    def start_hub(self) -> Hub:
        return Hub(None, "")

    def start_owner(self, spec: Spec, url: str) -> tuple[Child, str, str]:
        argv = child_argv(
            _peers_nvflare.SCRIPT,
            "nvflare-owner",
            path=spec.src,
            sites=spec.sites,
            chunk=spec.nvflare_chunk,
        )
        owner = Child("nvflare-owner", argv, stdin=True)
        try:
            ready = owner.expect("READY", _hash_time(spec))
        except BaseException:
            owner.stop()
            raise
        return owner, ready["url"], ready["ref"]

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        return child_argv(
            _peers_nvflare.SCRIPT,
            "nvflare-site",
            url=url,
            name=name,
            ref=ref,
            dest=dest,
            timeout=spec.request_timeout,
            fsync=spec.fsync,
        )


class Relay(System):
    name = "relay"
    title = "bare pyzmq relay (DEALER -> ROUTER -> DEALER), objdl's file I/O"

    def settings(self, spec: Spec) -> str:
        return f"chunk {fmt_size(spec.chunk)}, window {spec.window}"

    def start_hub(self) -> Hub:
        relay = Child("raw-relay", child_argv(_TRANSFER, "raw-relay"), stdin=True)
        try:
            return Hub(relay, relay.expect("READY", 30.0)["url"])
        except BaseException:
            relay.stop()
            raise

    def start_owner(self, spec: Spec, url: str) -> tuple[Child, str, str]:
        owner = Child(
            "raw-owner", child_argv(_TRANSFER, "raw-owner", url=url, path=spec.src), stdin=True
        )
        try:
            owner.expect("READY", 30.0)
        except BaseException:
            owner.stop()
            raise
        return owner, url, ""

    def site_argv(self, spec: Spec, url: str, ref: str, name: str, dest: str) -> list[str]:
        return child_argv(
            _TRANSFER,
            "raw-site",
            url=url,
            name=name,
            dest=dest,
            size=spec.size,
            chunk=spec.chunk,
            window=spec.window,
            timeout=spec.request_timeout,
            fsync=spec.fsync,
        )


SYSTEMS: dict[str, System] = {s.name: s for s in (Objdl(), ObjdlDirect(), Nvflare(), Relay())}


def _budget(spec: Spec) -> float:
    """A bound on the transfer: generous (5 MiB/s), so only a real hang trips it."""
    return 120.0 + spec.sites * spec.size / (5 * 1024 * 1024)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def run_peer(system: System, spec: Spec) -> dict[str, Any]:
    """Run one transfer of `system`; return its measurements (see the module docstring).

    A run that breaks (a process that dies or does not answer in time) comes back with
    ``error`` set, its sites counted as failed, rather than raising.
    """
    os.makedirs(spec.workdir, exist_ok=False)
    dests = [os.path.join(spec.workdir, f"dst-{i + 1}.bin") for i in range(spec.sites)]
    out: dict[str, Any] = {"system": system.name, "sites": spec.sites, "size": spec.size}
    children: list[Child] = []
    try:
        try:
            _measure(system, spec, dests, children, out)
        except (ChildError, OSError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for child in reversed(children):  # sites first, the hub last
                end_child(child)
        out["digests_ok"] = sum(
            1 for d in dests if os.path.exists(d) and file_sha256(d) == spec.digest
        )
    finally:
        shutil.rmtree(spec.workdir, ignore_errors=True)
    return _derive(out)


def _measure(
    system: System, spec: Spec, dests: list[str], children: list[Child], out: dict[str, Any]
) -> None:
    got = system.start_hub()
    hub = got.child
    if hub is not None:
        children.append(hub)
    owner, site_url, ref = system.start_owner(spec, got.url)
    children.append(owner)
    sites = []
    for i, dest in enumerate(dests):
        name = f"site-{i + 1}"
        site = Child(name, system.site_argv(spec, site_url, ref, name, dest), stdin=True)
        children.append(site)
        sites.append(site)
    for site in sites:
        site.expect("READY", 60.0)

    roles: dict[str, Child] = {"owner": owner}
    if hub is not None:
        roles["broker"] = hub
    roles.update({s.name: s for s in sites})
    time.sleep(_SETTLE)
    out["idle_kib"] = {r: rss_kib(c.pid) for r, c in roles.items()}
    out["peak_reset"] = all(reset_peak_rss(c.pid) for c in roles.values())
    cpu0 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
    busy0, wall0 = system_busy_seconds(), time.monotonic()
    started = time.monotonic()
    for site in sites:
        site.send("GO")
    done = []
    for site in sites:
        left = max(1.0, started + _budget(spec) - time.monotonic())
        done.append(site.expect("DONE", left))
    cpu1 = {r: cpu_seconds_fine(c.pid) for r, c in roles.items()}
    busy1, wall1 = system_busy_seconds(), time.monotonic()
    out["peak_kib"] = {r: peak_rss_kib(c.pid) for r, c in roles.items()}
    out["cpu_s"] = {r: _diff(cpu0[r], cpu1[r]) for r in roles}
    out["others_share"] = others_share(busy0, busy1, wall1 - wall0, cpu0, cpu1)
    out["ok"] = [d["ok"] for d in done]
    out["reasons"] = [d["reason"] for d in done if not d["ok"]]
    routed = _direct.routed_bytes(got.metrics_url)
    out["broker_routed_bytes"] = routed
    out["broker_share"] = _direct.broker_share(routed, spec.sites * spec.size)
    out["links"] = [d.get("link") for d in done]
    why = system.check_path(spec, routed, out["links"])
    if why:  # the bytes did not take the path the row is named for: the run failed
        out["path_error"] = why
        out["ok"] = [False] * spec.sites
        out["reasons"].append(why)
    out["t0"] = [d["t0"] for d in done]
    out["t1"] = [d["t1"] for d in done]


def _derive(r: dict[str, Any]) -> dict[str, Any]:
    """Throughput (aggregate and per site) and CPU seconds per GiB moved, per role."""
    if "t1" not in r:  # the run broke before every site answered
        r.update(ok=[False] * r["sites"], reasons=[r.get("error", "run failed")])
        r.update(agg_mibps=None, site_mibps=[], cpu_s_per_gib={})
        return r
    mib = r["size"] / (1 << 20)
    whole = max(r["t1"]) - min(r["t0"])
    r["seconds"] = whole
    r["agg_mibps"] = mib * r["sites"] / whole if whole > 0 else None
    r["site_mibps"] = [mib / (t1 - t0) for t0, t1 in zip(r["t0"], r["t1"], strict=True) if t1 > t0]
    gib = r["sites"] * r["size"] / _GIB
    cpu = r["cpu_s"]
    sites = [v for k, v in cpu.items() if k.startswith("site-")]
    per: dict[str, float | None] = {
        "owner": None if cpu.get("owner") is None else cpu["owner"] / gib,
        "broker": None if cpu.get("broker") is None else cpu["broker"] / gib,
        "sites": None if None in sites else sum(sites) / gib,
    }
    known = [v for v in cpu.values() if v is not None]
    per["total"] = sum(known) / gib if len(known) == len(cpu) else None
    r["cpu_s_per_gib"] = per
    return r
