"""Soak test: N sites download objects for K minutes while the broker and sites get killed.

How it works: the parent starts a broker on a loopback port it keeps for the whole run,
an owner and N site processes (this file with ``--role``). The owner offers a batch of
objects every few seconds (random-content files of a few to a few tens of MiB, some
bytes objects, and re-offers of files already offered, each under its own
transaction) and publishes ``ref -> {kind, size, sha256}`` in ``catalog.json``,
computed by itself, not by objdl; a ref whose transaction timed out is listed as
retired. Each site polls the catalog and downloads every ref (a few at once, files
with ``resume=True``), checks each result's sha256 against the catalog and appends
what happened to its own journal (``journal.jsonl``: start, end, cut, skip). Meanwhile
the parent SIGKILLs the broker at intervals and restarts it on the same address
after a short outage, and SIGKILLs random sites and restarts them; a restarted site
reads its journal and starts its pending downloads again (files resume from their
partial file). Faults and offers stop a while before the end, so the sites can drain;
the run ends at the deadline or once every site has handled every ref.

The journals are the record: the summary counts downloads (one site, one ref) that
ended ok, failed (reasons grouped), were retried (more than one attempt across
restarts), resumed, or were cut off at the end; bytes delivered; digest mismatches
(the run exits 1 if there is any); broker restarts and site kills; the peak RSS
(VmHWM, sampled every second and before every kill) of the owner, the broker and each
site, across restarts.

Usage (not part of CI; about ``--minutes`` plus a few seconds)::

    python benchmarks/soak.py                        # 4 sites, 5 minutes
    python benchmarks/soak.py --minutes 1 --seed 7   # quick
    python benchmarks/soak.py --sites 8 --size 64MiB --broker-every 20-40 --keep-logs /tmp/soak
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import (
    Child,
    ChildError,
    Commands,
    PeakRss,
    child_stderr_tail,
    emit,
    file_sha256,
    fmt_size,
    kill_child,
    machine_line,
    parse_size,
    print_table,
    start_objdl_broker,
    start_objdl_broker_on,
)

__all__ = ["main"]

_THIS = os.path.abspath(__file__)
_OWNER = "server"
_BROKER_TIMEOUT = 1.0  # a cell takes the broker for dead after this long without a word
_HEARTBEAT = 0.2
_LIFETIME = 3600.0  # a child ends itself after this long, whatever happens
_MiB = 1 << 20
_BYTES_MAX = 8 * _MiB  # bytes objects are held in the owner's memory: keep them smaller
_CONNECT_FOR = 60.0  # a (re)started site tries this long to register with the broker
_TICK = 0.2  # the parent's scheduling step


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _setup_logging(path: Path) -> None:
    logging.basicConfig(
        filename=str(path),
        level=logging.INFO,
        format=f"%(asctime)s pid {os.getpid()} %(threadName)s %(levelname)s %(name)s: %(message)s",
    )


# ---------------------------------------------------------------- owner


class _Catalog:
    """What the owner offers, as ``catalog.json``: refs in offer order, retired refs, final."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"refs": {}, "order": [], "retired": {}, "final": False}
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.data)

    def add(self, ref: str, entry: dict[str, Any]) -> None:
        with self.lock:
            self.data["refs"][ref] = entry
            self.data["order"].append(ref)
            self.save()

    def retire(self, ref: str) -> None:
        with self.lock:
            self.data["retired"][ref] = time.time()
            self.save()

    def finish(self) -> None:
        with self.lock:
            self.data["final"] = True
            self.save()


class _Owner:
    """Offers batches of new files, bytes objects and re-offers of earlier files."""

    def __init__(self, cell: Any, a: dict[str, Any]) -> None:
        self.cell = cell
        self.a = a
        self.rng = random.Random(a["seed"] * 7919 + 1)
        self.dir = Path(a["workdir"]) / "owner"
        self.dir.mkdir(exist_ok=True)
        self.catalog = _Catalog(Path(a["workdir"]) / "catalog.json")
        self.files: list[tuple[Path, int, str]] = []  # path, size, sha256
        self.tx_ref: dict[str, str] = {}
        self.held: dict[str, bytes] = {}  # bytes objects on offer, by ref
        self.lock = threading.Lock()
        self.n = 0
        self.closing = False

    def _size(self, top: int) -> int:
        lo = min(self.a["min_size"], top)
        return self.rng.randint(lo, top)

    def _new_file(self) -> tuple[Path, int, str]:
        self.n += 1
        size = self._size(self.a["size"])
        path = self.dir / f"obj-{self.n:04d}.bin"
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                block = self.rng.randbytes(min(4 * _MiB, left))
                f.write(block)
                h.update(block)
                left -= len(block)
        entry = (path, size, h.hexdigest())
        self.files.append(entry)
        return entry

    def _timed_out(self, tx_id: str, objs: list[Any]) -> None:
        if self.closing:
            return  # the cell is stopping and ends every transaction: no timeout
        with self.lock:
            ref = self.tx_ref.pop(tx_id, None)
            if ref is not None:
                self.held.pop(ref, None)
        if ref is not None:
            self.catalog.retire(ref)

    def offer_batch(self) -> list[dict[str, Any]]:
        from objdl.objects import new_transaction, offer_bytes, offer_file

        offered = []
        for _ in range(self.a["batch"]):
            pick = self.rng.random()
            data: bytes | None = None
            if self.files and pick < 0.25:
                path, size, sha = self.rng.choice(self.files)
                kind, name, again = "file", path.name, True
            elif pick < 0.45:
                self.n += 1
                data = self.rng.randbytes(self._size(min(self.a["size"], _BYTES_MAX)))
                size, sha = len(data), hashlib.sha256(data).hexdigest()
                kind, name, again = "bytes", f"bytes-{self.n:04d}", False
            else:
                path, size, sha = self._new_file()
                kind, name, again = "file", path.name, False
            tx = new_transaction(
                self.cell, timeout=self.a["tx_timeout"], timeout_cb=self._timed_out
            )
            with self.lock:  # the monitor must find the tx's ref if it times out at once
                if data is not None:
                    ref = offer_bytes(self.cell, data, transaction_id=tx)
                    self.held[ref] = data
                else:
                    ref = offer_file(self.cell, path, transaction_id=tx)
                self.tx_ref[tx] = ref
            entry = {"kind": kind, "size": size, "sha256": sha, "name": name, "reoffer": again}
            self.catalog.add(ref, {**entry, "t": time.time()})
            offered.append({"ref": ref, **entry})
        return offered


def _owner_main(a: dict[str, Any]) -> None:
    from objdl.cell import Cell

    signal.signal(signal.SIGTERM, _interrupt)
    _setup_logging(Path(a["workdir"]) / "owner.log")
    cmds = Commands()
    with Cell(
        _OWNER,
        a["url"],
        start_timeout=30.0,
        broker_timeout=_BROKER_TIMEOUT,
        heartbeat_interval=_HEARTBEAT,
    ) as cell:
        owner = _Owner(cell, a)
        emit("READY", {"pid": os.getpid()})
        try:
            _offer_until_exit(owner, cmds, a)
        finally:
            owner.closing = True  # the cell ends every transaction now: no timeouts


def _offer_until_exit(owner: _Owner, cmds: Commands, a: dict[str, Any]) -> None:
    end = time.monotonic() + a["offer_for"]
    next_offer = time.monotonic()
    while time.monotonic() < end:
        if time.monotonic() >= next_offer:
            owner.offer_batch()
            next_offer += a["offer_every"]
        if cmds.get(max(0.0, min(next_offer, end) - time.monotonic())) == "EXIT":
            return
    owner.catalog.finish()
    emit("FINAL", {"objects": owner.n})
    deadline = time.monotonic() + _LIFETIME
    while time.monotonic() < deadline and cmds.get(1.0) != "EXIT":
        pass


# ---------------------------------------------------------------- site


class _Journal:
    """A site's append-only record of its downloads, one json object per line.

    Each line goes out in one ``write`` on an ``O_APPEND`` descriptor, so a SIGKILL
    leaves whole lines only; the parent and a restarted site read it back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **event: Any) -> None:
        line = (json.dumps({"t": time.time(), **event}) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)

    def close(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def _partial_bytes(dest: Path) -> int:
    """How far a kept partial download of `dest` says it is verified (0 if none)."""
    best = 0
    for state in glob.glob(str(dest.with_name(f".{dest.name}.*.objdl-state"))):
        saved = _read_json(Path(state))
        if isinstance(saved, dict) and isinstance(saved.get("verified"), int):
            best = max(best, saved["verified"])
    return best


class _Site:
    """One site process: download every ref in the catalog, a few at once."""

    def __init__(self, cell: Any, a: dict[str, Any], journal: _Journal) -> None:
        self.cell = cell
        self.a = a
        self.journal = journal
        self.dir = Path(a["site_dir"])
        self.attempts: Counter[str] = Counter()
        self.ended: set[str] = set()
        for ev in _read_events(journal.path):
            if ev.get("ev") == "start":
                self.attempts[ev["ref"]] += 1
            elif ev.get("ev") in ("end", "skip"):
                self.ended.add(ev["ref"])
        self.running: dict[str, tuple[threading.Thread, Any]] = {}

    def pending(self) -> list[str]:
        return [r for r in self.attempts if r not in self.ended]

    def step(self, cat: dict[str, Any]) -> bool:
        """Start what may start; True once every ref of a final catalog is handled."""
        from objdl.message import Signal

        for ref, (t, _) in list(self.running.items()):
            if not t.is_alive():
                t.join()
                del self.running[ref]
                self.ended.add(ref)
        order = [r for r in cat["order"] if r not in self.ended]
        pend = set(self.pending())
        todo = [r for r in order if r in pend] + [r for r in order if r not in pend]
        for ref in todo:
            if len(self.running) >= self.a["parallel"]:
                break
            if ref in self.running:
                continue
            if ref not in pend and ref in cat["retired"]:
                self.journal.write(ev="skip", ref=ref, why="retired before this site started it")
                self.ended.add(ref)
                continue
            abort = Signal()
            t = threading.Thread(
                target=self.fetch, args=(ref, cat["refs"][ref], abort), name=f"dl-{ref[:9]}"
            )
            self.running[ref] = (t, abort)
            t.start()
        return bool(cat["final"]) and not self.running and all(r in self.ended for r in order)

    def fetch(self, ref: str, entry: dict[str, Any], abort: Any) -> None:
        from objdl.objects import DownloadError, download_bytes, download_file

        self.attempts[ref] += 1
        dest = self.dir / f"{ref}.bin"
        resume_from = _partial_bytes(dest) if entry["kind"] == "file" else 0
        self.journal.write(ev="start", ref=ref, attempt=self.attempts[ref], resume_from=resume_from)
        first = [-1]
        limit = self.a["rate"]
        since = [0.0, 0]  # when and at how many bytes the first progress report came

        def progress(ref_id: str, done: int, total: Any, rate: float) -> None:
            # The site's link speed: pausing here pauses the download's loop.
            now = time.monotonic()
            if first[0] < 0:
                first[0], since[0], since[1] = done, now, done
            elif limit and done != total:
                ahead = (done - since[1]) / limit - (now - since[0])
                if ahead > 0:
                    time.sleep(min(ahead, 1.0))

        opts = {
            "per_request_timeout": self.a["request_timeout"],
            "tries": self.a["tries"],
            "backoff": 0.5,
            "progress_cb": progress,
            "progress_interval": 0.0,  # every chunk, so the link speed holds
            "abort_signal": abort,
        }
        t0 = time.monotonic()
        try:
            if entry["kind"] == "file":
                download_file(self.cell, _OWNER, ref, dest, resume=True, **opts)
                got = file_sha256(dest)
                dest.unlink()
            else:
                got = hashlib.sha256(download_bytes(self.cell, _OWNER, ref, **opts)).hexdigest()
        except DownloadError as exc:
            if abort.triggered:
                self.journal.write(ev="cut", ref=ref)
            else:
                self.journal.write(ev="end", ref=ref, ok=False, reason=exc.reason)
            return
        except Exception as exc:  # a bug somewhere: record it, keep the site going
            logging.getLogger("soak").exception("download %s raised", ref)
            reason = f"raised {type(exc).__name__}: {exc}"
            self.journal.write(ev="end", ref=ref, ok=False, reason=reason)
            return
        leftover = len(glob.glob(str(dest.with_name(f".{dest.name}.*"))))
        self.journal.write(
            ev="end",
            ref=ref,
            ok=True,
            sha_ok=got == entry["sha256"],
            size=entry["size"],
            secs=round(time.monotonic() - t0, 3),
            first_progress=first[0],
            resume_from=resume_from,
            leftover=leftover,
        )

    def stop(self) -> None:
        for _, abort in self.running.values():
            abort.trigger()
        deadline = time.monotonic() + 10.0
        for t, _ in self.running.values():
            t.join(max(0.0, deadline - time.monotonic()))


def _connect(name: str, url: str, journal: _Journal, stop: threading.Event) -> Any:
    """Register with the broker, which may be down or still hold the killed site's name."""
    from objdl.cell import Cell
    from objdl.errors import BrokerUnavailableError, NameTakenError

    deadline = time.monotonic() + _CONNECT_FOR
    tries = 0
    while True:
        tries += 1
        cell = Cell(
            name,
            url,
            start_timeout=5.0,
            broker_timeout=_BROKER_TIMEOUT,
            heartbeat_interval=_HEARTBEAT,
        )
        try:
            cell.start()
        except (BrokerUnavailableError, NameTakenError) as exc:
            if time.monotonic() >= deadline or stop.is_set():
                raise
            logging.getLogger("soak").info("connect try %d: %s", tries, exc)
            stop.wait(0.5)
            continue
        journal.write(ev="connected", tries=tries)
        return cell


def _site_main(a: dict[str, Any]) -> None:
    stop = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    site_dir = Path(a["site_dir"])
    _setup_logging(site_dir / "site.log")
    cmds = Commands()
    journal = _Journal(site_dir / "journal.jsonl")
    journal.write(ev="boot", pid=os.getpid())
    cat_path = Path(a["workdir"]) / "catalog.json"
    try:
        cell = _connect(a["name"], a["url"], journal, stop)
        try:
            site = _Site(cell, a, journal)
            finished = False
            deadline = time.monotonic() + _LIFETIME
            while not stop.is_set() and time.monotonic() < deadline:
                cat = _read_json(cat_path)
                if isinstance(cat, dict) and site.step(cat) and not finished:
                    journal.write(ev="finished")
                    finished = True
                if cmds.get(0.3) == "EXIT":
                    break
            site.stop()
        finally:
            cell.stop()
    finally:
        journal.close()


# ---------------------------------------------------------------- parent


@dataclass
class _Download:
    """One site's download of one ref, as its journal tells it."""

    attempts: int = 0
    state: str = "new"  # started, ok, failed, cut, skipped
    reason: str = ""
    sha_ok: bool | None = None
    size: int = 0
    resumed: int = 0  # bytes a successful attempt did not fetch again
    leftover: int = 0


@dataclass
class _SiteRun:
    name: str
    dir: Path
    child: Child | None = None
    incarnations: int = 0
    restart_at: float | None = None
    kills: int = 0
    unexpected_exits: int = 0
    finished: bool = False
    offset: int = 0
    partial: bytes = b""
    downloads: dict[str, _Download] = field(default_factory=dict)
    connect_retries: int = 0
    rate: float = 0.0  # bytes/s per download, 0 = as fast as it goes

    def read_journal(self) -> list[dict[str, Any]]:
        """The events appended since the last call."""
        try:
            with open(self.dir / "journal.jsonl", "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "connected":
            self.connect_retries += ev.get("tries", 1) - 1
            return
        if kind == "finished":
            self.finished = True
            return
        ref = ev.get("ref")
        if not isinstance(ref, str):
            return
        d = self.downloads.setdefault(ref, _Download())
        if kind == "start":
            d.attempts += 1
            d.state = "started"
        elif kind == "cut":
            d.state = "cut"
        elif kind == "skip":
            d.state = "skipped"
        elif kind == "end" and ev.get("ok"):
            d.state, d.sha_ok, d.size = "ok", ev.get("sha_ok"), ev.get("size", 0)
            d.leftover = ev.get("leftover", 0)
            # Resumed if its first progress report counted the kept bytes and more (or
            # all of them: the kill came after the last byte was checked).
            start, first = ev.get("resume_from", 0), ev.get("first_progress", -1)
            if start > 0 and (first > start or first == start == d.size):
                d.resumed = start
        elif kind == "end":
            d.state, d.reason = "failed", str(ev.get("reason", ""))


def _site_args(
    a: argparse.Namespace, name: str, url: str, workdir: str, site_dir: Path, rate: float
) -> str:
    return json.dumps(
        {
            "rate": rate,
            "name": name,
            "url": url,
            "workdir": workdir,
            "site_dir": str(site_dir),
            "parallel": a.parallel,
            "request_timeout": a.request_timeout,
            "tries": a.tries,
        }
    )


def _spawn(name: str, role: str, args: str) -> Child:
    return Child(name, [sys.executable, _THIS, "--role", role, "--args", args], stdin=True)


def _end(child: Child | None, timeout: float = 10.0) -> None:
    """Ask a child to exit (``EXIT`` on stdin), give it `timeout` s, then end it by its pid."""
    if child is None:
        return
    if child.proc.poll() is None and child.send("EXIT"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout)
    child.stop()


_NORMALIZE = [
    (re.compile(r"R?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<ref>"),
    (re.compile(r"\b[0-9a-f]{16,}\b"), "<hex>"),
    (re.compile(r"/[^\s:'\"]+"), "<path>"),
    (re.compile(r"\d+(\.\d+)?"), "N"),
]


def _reason_group(reason: str) -> str:
    for pattern, repl in _NORMALIZE:
        reason = pattern.sub(repl, reason)
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _range(text: str) -> tuple[float, float] | None:
    """``"45-75"`` -> (45, 75), ``"30"`` -> (30, 30), ``"0"`` -> None (off)."""
    lo, _, hi = text.partition("-")
    a, b = float(lo), float(hi or lo)
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"not a range of seconds: {text!r}")
    return None if b == 0 else (a, b)


class _Soak:
    """The parent: children, the fault schedule, the journals, the summary."""

    def __init__(self, a: argparse.Namespace, workdir: str) -> None:
        self.a = a
        self.workdir = workdir
        self.rng = random.Random(a.seed)
        self.rss = PeakRss()
        self.broker: Child | None = None
        self.owner: Child | None = None
        self.url = ""
        # Sites differ: each one's link is 0.5x to 1.5x --site-rate.
        self.sites = [
            _SiteRun(
                f"site-{i + 1}",
                Path(workdir) / f"site-{i + 1}",
                rate=round(a.site_rate * self.rng.uniform(0.5, 1.5)),
            )
            for i in range(a.sites)
        ]
        self.catalog: dict[str, Any] = {"refs": {}, "retired": {}}
        self.threads: dict[str, int] = {}
        self.owner_files: tuple[int, int] | None = None  # open, file refs on offer
        self.broker_restarts = 0
        self.broker_downs: list[float] = []
        self.broker_back_at: float | None = None
        self.broker_unexpected = 0
        self.t0 = 0.0
        self.elapsed = 0.0

    def log(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def children(self) -> list[tuple[str, Child]]:
        out = [(s.name, s.child) for s in self.sites if s.child is not None]
        for role, c in (("broker", self.broker), ("owner", self.owner)):
            if c is not None:
                out.append((role, c))
        return out

    def sample(self) -> None:
        for role, c in self.children():
            self.rss.sample(role, c.pid)

    def start_site(self, s: _SiteRun) -> None:
        s.dir.mkdir(exist_ok=True)
        args = _site_args(self.a, s.name, self.url, self.workdir, s.dir, s.rate)
        s.child = _spawn(s.name, "site", args)
        s.incarnations += 1
        s.finished = False
        s.restart_at = None

    def kill_broker(self, now: float) -> None:
        assert self.broker is not None and self.a.broker_down is not None
        self.rss.sample("broker", self.broker.pid)
        kill_child(self.broker)
        self.broker = None
        down = self.rng.uniform(*self.a.broker_down)
        self.broker_downs.append(down)
        self.broker_back_at = now + down
        self.log(f"broker SIGKILLed, back in {down:.1f}s")

    def restart_broker(self, now: float) -> None:
        try:
            self.broker = start_objdl_broker_on(self.url)
        except ChildError as exc:
            self.log(f"broker restart failed, trying again: {exc}")
            self.broker_back_at = now + 0.5
            return
        self.broker_back_at = None
        self.broker_restarts += 1
        self.log(f"broker restarted on {self.url}")

    def kill_site(self, now: float) -> None:
        alive = [s for s in self.sites if s.child is not None and s.child.proc.poll() is None]
        if not alive:
            return
        s = self.rng.choice(alive)
        assert s.child is not None
        self.rss.sample(s.name, s.child.pid)
        kill_child(s.child)
        s.child = None
        s.kills += 1
        lo, hi = self.a.site_down
        s.restart_at = now + self.rng.uniform(lo, hi)
        self.log(f"{s.name} SIGKILLed, restarts in {s.restart_at - now:.1f}s")

    def check_exits(self, now: float) -> None:
        """Restart a child that ended without being killed (and count it)."""
        if self.owner is not None and self.owner.proc.poll() is not None:
            raise ChildError(f"the owner exited (rc={self.owner.proc.returncode})")
        if self.broker is not None and self.broker.proc.poll() is not None:
            self.log(f"broker exited by itself (rc={self.broker.proc.returncode}); restarting")
            self.broker_unexpected += 1
            kill_child(self.broker)
            self.broker, self.broker_back_at = None, now
        for s in self.sites:
            if s.child is not None and s.child.proc.poll() is not None:
                rc, tail = s.child.proc.returncode, child_stderr_tail(s.child, 800)
                self.log(f"{s.name} exited by itself (rc={rc}); restarting{tail}")
                s.unexpected_exits += 1
                kill_child(s.child)
                s.child, s.restart_at = None, now + 0.5

    def read_journals(self) -> None:
        for s in self.sites:
            for ev in s.read_journal():
                s.apply(ev)
                if ev.get("ev") == "end" and not ev.get("ok"):
                    self.log(f"{s.name}: {ev['ref'][:9]} failed: {ev.get('reason')}")
                elif ev.get("ev") == "end" and ev.get("sha_ok") is False:
                    self.log(f"{s.name}: {ev['ref'][:9]} DIGEST MISMATCH")

    def status_line(self) -> str:
        ds = [d for s in self.sites for d in s.downloads.values()]
        c = Counter(d.state for d in ds)
        return (
            f"ok {c['ok']}, failed {c['failed']}, in progress {c['started']}, "
            f"broker restarts {self.broker_restarts}, site kills {sum(s.kills for s in self.sites)}"
        )

    def run(self) -> None:
        a = self.a
        total = a.minutes * 60.0
        drain = min(60.0, max(15.0, 0.2 * total))
        self.broker, self.url = start_objdl_broker()
        self.t0 = time.monotonic()
        self.owner = _spawn(
            "owner",
            "owner",
            json.dumps(
                {
                    "url": self.url,
                    "workdir": self.workdir,
                    "seed": a.seed,
                    "size": a.size,
                    "min_size": a.min_size,
                    "batch": a.batch,
                    "offer_every": a.offer_every,
                    "offer_for": max(1.0, total - drain),
                    "tx_timeout": a.tx_timeout,
                }
            ),
        )
        self.owner.expect("READY", 60.0)
        for s in self.sites:
            self.start_site(s)
        start = time.monotonic()
        end, faults_until = start + total, start + total - drain
        next_broker = None if a.broker_every is None else start + self.rng.uniform(*a.broker_every)
        next_site = (
            None if a.site_kill_every is None else start + self.rng.uniform(*a.site_kill_every)
        )
        next_sample = next_status = start
        while True:
            now = time.monotonic()
            if now >= end:
                self.log("deadline reached")
                break
            if (
                self.broker is None
                and self.broker_back_at is not None
                and now >= self.broker_back_at
            ):
                self.restart_broker(now)
            if next_broker is not None and now >= next_broker and self.broker is not None:
                if now < faults_until:
                    self.kill_broker(now)
                    assert self.broker_back_at is not None and a.broker_every is not None
                    next_broker = self.broker_back_at + self.rng.uniform(*a.broker_every)
                else:
                    next_broker = None
            if next_site is not None and now >= next_site:
                if now < faults_until:
                    self.kill_site(now)
                    assert a.site_kill_every is not None
                    next_site = now + self.rng.uniform(*a.site_kill_every)
                else:
                    next_site = None
            for s in self.sites:
                if s.child is None and s.restart_at is not None and now >= s.restart_at:
                    self.start_site(s)
                    self.log(f"{s.name} restarted")
            self.check_exits(now)
            if now >= next_sample:
                self.sample()
                self.read_journals()
                next_sample = now + 1.0
            if now >= next_status:
                self.log(self.status_line())
                next_status = now + 30.0
            if (
                now >= faults_until
                and self.broker is not None
                and all(s.child is not None and s.finished for s in self.sites)
            ):
                self.log("every site has handled every ref")
                break
            time.sleep(_TICK)
        self.elapsed = time.monotonic() - start
        self.sample()

    def inspect_at_end(self) -> None:
        """Threads of every process still running, and the owner's open source files."""
        for role, c in self.children():
            n = _proc_threads(c.pid)
            if n is not None:
                self.threads[role] = n
        cat = _read_json(Path(self.workdir) / "catalog.json")
        if self.owner is not None and isinstance(cat, dict):
            live = sum(
                1 for r, e in cat["refs"].items() if e["kind"] == "file" and r not in cat["retired"]
            )
            opened = _open_files_under(self.owner.pid, Path(self.workdir) / "owner")
            if opened is not None:
                self.owner_files = (opened, live)

    def stop_all(self) -> None:
        with contextlib.suppress(Exception):
            self.sample()
            self.inspect_at_end()
        for s in self.sites:
            _end(s.child)
            s.child = None
        _end(self.owner)
        self.owner = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        self.read_journals()
        cat = _read_json(Path(self.workdir) / "catalog.json")
        if isinstance(cat, dict):
            self.catalog = cat

    def summary(self) -> int:
        a = self.a
        cat = self.catalog
        refs = cat["refs"]
        kinds = Counter(e["kind"] for e in refs.values())
        reoffers = sum(1 for e in refs.values() if e.get("reoffer"))
        ds = [d for s in self.sites for d in s.downloads.values()]
        by = Counter(d.state for d in ds)
        ok = [d for d in ds if d.state == "ok"]
        retried = [d for d in ds if d.attempts > 1]
        resumed = [d for d in ok if d.resumed > 0]
        delivered = sum(d.size for d in ok)
        mismatch_site = sum(1 for d in ok if d.sha_ok is False)
        failed = [d for d in ds if d.state == "failed"]
        mismatch_lib = sum(1 for d in failed if "digest mismatch" in d.reason)
        leftovers = sum(d.leftover for d in ok)
        not_started = sum(1 for s in self.sites for r in refs if r not in s.downloads)
        sizes = [e["size"] for e in refs.values()]

        print()
        print(machine_line())
        print(
            f"objdl soak: {a.sites} sites x {len(refs)} objects for {self.elapsed / 60:.1f} of "
            f"{a.minutes:g} min | seed {a.seed} | objects {_fmt_mib(min(sizes, default=0))} to "
            f"{_fmt_mib(max(sizes, default=0))} (max {fmt_size(a.size)}), {a.batch} every "
            f"{a.offer_every:g}s | per_request_timeout {a.request_timeout:g}s x tries {a.tries} "
            f"| broker kill every {_fmt_range(a.broker_every)}s for {_fmt_range(a.broker_down)}s"
            f" | site kill every {_fmt_range(a.site_kill_every)}s | broker {self.url}"
        )
        print(
            f"objects offered: {len(refs)} ({kinds['file']} files of which {reoffers} "
            f"re-offers, {kinds['bytes']} bytes); retired by timeout: {len(cat['retired'])}"
        )
        print(
            f"downloads: {len(ds) + not_started} (site x ref) | ok {by['ok']} | failed "
            f"{by['failed']} | retried {len(retried)} (ok after retry "
            f"{sum(d.state == 'ok' for d in retried)}) | unfinished at the end "
            f"{by['started'] + by['cut']} | skipped (retired before start) {by['skipped']} | "
            f"never started {not_started}"
        )
        saved = sum(d.resumed for d in resumed)
        print(f"resumed from a partial file: {len(resumed)} ({_fmt_mib(saved)} not fetched again)")
        print(
            f"bytes delivered and verified: {_fmt_mib(delivered)} "
            f"({delivered / _MiB / max(self.elapsed, 1e-9):.1f} MiB/s over the run)"
        )
        print(
            f"digest mismatches: {mismatch_site} (site's own sha256 check), {mismatch_lib} "
            f"(reported by objdl) | leftover partial files after success: {leftovers}"
        )
        print(
            f"broker restarts: {self.broker_restarts} (down "
            f"{_fmt_span(self.broker_downs)}s, exited by itself {self.broker_unexpected}) | "
            f"site kills: {sum(s.kills for s in self.sites)} | site exits by themselves: "
            f"{sum(s.unexpected_exits for s in self.sites)} | site connect retries: "
            f"{sum(s.connect_retries for s in self.sites)}"
        )
        if self.owner_files is not None:
            opened, live = self.owner_files
            print(
                f"owner at the end: {opened} source file descriptor(s) open for {live} file "
                f"ref(s) still on offer{'' if opened <= live else '  <-- LEAK?'}"
            )
        if failed:
            print()
            groups = Counter(_reason_group(d.reason) for d in failed)
            print_table(
                ["failed", "reason (numbers, ids and paths replaced)"], groups.most_common()
            )
        print()
        rows: list[list[Any]] = []
        for role in ("owner", "broker"):
            peak = _mib_or_dash(self.rss.peaks.get(role))
            rows.append([role, peak, self.rss.pids(role), self.threads.get(role, "-"), ""])
        site_peaks = [self.rss.peaks.get(s.name) for s in self.sites]
        for s, peak in zip(self.sites, site_peaks, strict=True):
            link = f"{s.rate / _MiB:.1f} MiB/s per download" if s.rate else "no limit"
            threads = self.threads.get(s.name, "-")
            rows.append([s.name, _mib_or_dash(peak), self.rss.pids(s.name), threads, link])
        known = [p for p in site_peaks if p is not None]
        rows.append(["site max", _mib_or_dash(max(known) if known else None), "", "", ""])
        print_table(["role", "peak RSS MiB", "processes", "threads at end", "link"], rows)
        bad = mismatch_site + mismatch_lib
        if bad:
            print(f"\nFAIL: {bad} digest mismatch(es)")
            return 1
        return 0


def _proc_threads(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _open_files_under(pid: int, folder: Path) -> int | None:
    """How many of `pid`'s file descriptors point into `folder` (None if not readable)."""
    prefix = os.path.realpath(folder) + os.sep
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    n = 0
    for name in names:
        with contextlib.suppress(OSError):  # closed while we looked
            n += os.readlink(f"/proc/{pid}/fd/{name}").startswith(prefix)
    return n


def _fmt_mib(n: int) -> str:
    return f"{n / _MiB:,.1f} MiB"


def _mib_or_dash(kib: int | None) -> Any:
    return "-" if kib is None else round(kib / 1024, 1)


def _fmt_range(r: tuple[float, float] | None) -> str:
    if r is None:
        return "never "
    return f"{r[0]:g}" if r[0] == r[1] else f"{r[0]:g}-{r[1]:g}"


def _fmt_span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _rate(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4, help="site processes (%(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the run (%(default)s)")
    p.add_argument("--size", type=parse_size, default=parse_size("24MiB"), help="largest object")
    p.add_argument(
        "--min-size", type=parse_size, default=parse_size("2MiB"), help="smallest object"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--batch", type=int, default=3, help="objects offered at once (%(default)s)")
    p.add_argument("--offer-every", type=float, default=10.0, metavar="S", help="(%(default)s)")
    p.add_argument(
        "--broker-every", type=_range, default="45-75", metavar="A-B",
        help="seconds between broker kills, 0 = never (%(default)s)",
    )  # fmt: skip
    p.add_argument("--broker-down", type=_range, default="0.5-3", metavar="A-B")
    p.add_argument(
        "--site-kill-every", type=_range, default="20-40", metavar="A-B",
        help="seconds between kills of a random site, 0 = never (%(default)s)",
    )  # fmt: skip
    p.add_argument("--site-down", type=_range, default="0.5-2", metavar="A-B")
    p.add_argument("--parallel", type=int, default=2, help="downloads at once per site")
    p.add_argument(
        "--site-rate", type=_rate, default=parse_size("4MiB"), metavar="BYTES",
        help="link speed per download and second, each site 0.5x-1.5x this; 0 = no limit",
    )  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--tx-timeout", type=float, default=90.0, metavar="S",
                   help="owner's idle timeout per object (%(default)s)")  # fmt: skip
    p.add_argument("--tmpdir", default=None, help="where the temporary folder goes")
    p.add_argument("--keep-logs", default=None, metavar="DIR",
                   help="copy the logs and journals here before the folder is deleted")  # fmt: skip
    p.add_argument("--role", choices=["owner", "site"], help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    return p


def _keep_logs(workdir: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for pattern in ("*.log", "*/*.log", "*/journal.jsonl", "catalog.json"):
        for path in glob.glob(os.path.join(workdir, pattern)):
            rel = os.path.relpath(path, workdir).replace(os.sep, "_")
            shutil.copyfile(path, os.path.join(dest, rel))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.role == "owner":
        _owner_main(json.loads(a.args))
        return 0
    if a.role == "site":
        _site_main(json.loads(a.args))
        return 0
    if a.sites < 1 or a.minutes <= 0 or a.batch < 1 or a.parallel < 1 or a.tries < 1:
        print(
            "--sites, --minutes, --batch, --parallel and --tries must be positive", file=sys.stderr
        )
        return 2
    if a.broker_down is None or a.site_down is None:
        print("--broker-down and --site-down must be above 0", file=sys.stderr)
        return 2
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    print(f"objdl soak: seed {a.seed}; progress on stderr", flush=True)
    workdir = tempfile.mkdtemp(prefix="objdl-soak-", dir=a.tmpdir)
    soak = _Soak(a, workdir)
    try:
        soak.run()
    finally:
        try:
            soak.stop_all()
        finally:
            if a.keep_logs:
                _keep_logs(workdir, a.keep_logs)
            shutil.rmtree(workdir, ignore_errors=True)
    return soak.summary()


if __name__ == "__main__":
    raise SystemExit(main())
