"""One site process with a pool of worker processes, each embedding its own objdl cell.

    python examples/embedded_workers.py [--workers 2] [--shards 4] [--shard-mib 8]

This process starts a broker (in a thread) and an owner cell, ``server``, that offers
``--shards`` byte shards. It spawns one site process, ``site-1``, which asks the owner
for the list of shards and hands them to a pool of ``--workers`` worker processes.
Each worker makes its own cell, ``site-1.w0``, ``site-1.w1``..., and downloads its
shards from the owner directly, so the bytes never pass through the site process.
The owner prints a table: which worker got which shard, how fast, digest ok.

Why each worker creates its cell *after* it has started, and why the processes are
spawned rather than forked: a cell owns a ZeroMQ context, a socket and an I/O
thread. ZeroMQ contexts and sockets are not fork-safe: a forked child gets a copy of
the parent's socket state and of its background threads' locks, but none of the
threads themselves, so using (or even closing) an inherited socket can hang or
corrupt the parent's connection. So a cell is never created before a fork and never
passed to a child; every process makes its own, under its own name, once it runs.
The ``spawn`` start method starts each child as a fresh interpreter, which also keeps
a parent's other threads and open sockets out of the child.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import queue
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

from broker import Broker
from objdl.cell import Cell
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import DownloadError, download_bytes, new_transaction, offer_bytes

CHANNEL = "embedded_demo"
OWNER = "server"
SITE = "site-1"
_MIB = 1024 * 1024


# ---------------------------------------------------------------- a worker (grandchild)


def worker_main(index: int, url: str, tasks: Any, results: Any, timeout: float) -> None:
    """Runs in a spawned worker: make this worker's own cell, download shards, report."""
    name = f"{SITE}.w{index}"
    with Cell(name, url) as cell:  # made here, in the worker, after it started
        results.put(("ready", name))
        while True:
            try:
                task = tasks.get(timeout=timeout)
            except queue.Empty:
                return  # the site went away
            if task is None:
                return
            result: dict[str, Any] = {"worker": name, "shard": task["shard"]}
            started = time.monotonic()
            try:
                data = download_bytes(cell, OWNER, task["ref"], overall_timeout=timeout)
            except DownloadError as exc:
                result["error"] = exc.reason
            else:
                result["bytes"] = len(data)
                result["seconds"] = time.monotonic() - started
                result["ok"] = hashlib.sha256(data).hexdigest() == task["sha256"]
            results.put(("result", result))


# ---------------------------------------------------------------- the site (child)


def site_main(url: str, workers: int, timeout: float) -> None:
    """Runs in the spawned site process: get the shard list, run the pool, report."""
    ctx = multiprocessing.get_context("spawn")
    tasks = ctx.Queue()
    results = ctx.Queue()
    deadline = time.monotonic() + timeout
    with Cell(SITE, url) as cell:
        reply = cell.send_request(CHANNEL, OWNER, "shards", Message(), 10.0)
        if reply.get_header(MessageHeaderKey.RETURN_CODE) != ReturnCode.OK:
            raise SystemExit(f"{SITE}: no shard list from {OWNER}")
        shards = reply.payload
        pool: list[BaseProcess] = [
            ctx.Process(target=worker_main, args=(i, url, tasks, results, timeout), name=f"w{i}")
            for i in range(workers)
        ]
        report: dict[str, Any] = {"results": [], "error": ""}
        try:
            for p in pool:
                p.start()
            ready = [_next(results, "ready", deadline, pool) for _ in pool]
            report["cells"] = cell.list_cells(SITE)  # this site and its workers, by name
            report["ready"] = sorted(ready)
            for shard in shards:
                tasks.put(shard)
            for _ in pool:
                tasks.put(None)
            report["results"] = [_next(results, "result", deadline, pool) for _ in shards]
            for p in pool:
                p.join(max(0.1, deadline - time.monotonic()))
        except RuntimeError as exc:
            report["error"] = str(exc)
        finally:
            for p in pool:  # end, by its pid, any worker still running
                if p.pid is not None and p.is_alive():
                    p.terminate()
                    p.join(5.0)
            for q in (tasks, results):
                q.close()
                q.join_thread()
        cell.send_request(CHANNEL, OWNER, "results", Message(payload=report), 10.0)


def _next(results: Any, kind: str, deadline: float, pool: list[BaseProcess]) -> Any:
    while True:
        try:
            got_kind, value = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p.name for p in pool if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker {dead[0]} died") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for a worker's {kind}") from None
            continue
        if got_kind == kind:
            return value


# ---------------------------------------------------------------- the owner (this process)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes (%(default)s)")
    p.add_argument("--shards", type=int, default=4, help="shards to download (%(default)s)")
    p.add_argument("--shard-mib", type=float, default=8.0, help="size of each (%(default)s MiB)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after S s (%(default)s)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.shards < 1 or args.shard_mib <= 0 or args.timeout <= 0:
        p.error("--workers, --shards, --shard-mib and --timeout must be positive")

    shards = [os.urandom(max(1, int(args.shard_mib * _MIB))) for _ in range(args.shards)]
    report: dict[str, Any] = {}
    got_report = threading.Event()

    def on_results(request: Message) -> None:
        report.update(request.payload)
        got_report.set()

    broker = Broker("tcp://127.0.0.1:*")
    broker.start()
    site: BaseProcess | None = None
    try:
        with Cell(OWNER, broker.url) as cell:
            tx = new_transaction(cell, timeout=args.timeout, num_sites=1)
            listing = [
                {
                    "shard": i,
                    "ref": offer_bytes(cell, data, transaction_id=tx),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                for i, data in enumerate(shards)
            ]
            cell.register_request_cb(CHANNEL, "shards", lambda req: Message(payload=listing))
            cell.register_request_cb(CHANNEL, "results", on_results)
            ctx = multiprocessing.get_context("spawn")
            site = ctx.Process(target=site_main, args=(broker.url, args.workers, args.timeout))
            site.start()
            deadline = time.monotonic() + args.timeout
            while not got_report.wait(0.2):
                if site.exitcode is not None or time.monotonic() > deadline:
                    print(f"error: no report from {SITE} (exit {site.exitcode})", file=sys.stderr)
                    return 1
            site.join(10.0)  # it exits once our reply to its report has reached it
    finally:
        if site is not None and site.is_alive():
            site.terminate()  # by its pid
            site.join(5.0)
        broker.stop()
    return _print_report(report)


def _print_report(report: dict[str, Any]) -> int:
    print(f"cells under {SITE}: {', '.join(report.get('cells', []))}")
    head = ("worker", "shard", "MiB", "seconds", "MiB/s", "sha256 ok")
    rows = [head]
    ok_all = not report.get("error")
    for r in sorted(report.get("results", []), key=lambda r: r["shard"]):
        if "error" in r:
            ok_all = False
            rows.append((r["worker"], str(r["shard"]), "-", "-", "-", f"no: {r['error']}"))
            continue
        ok_all = ok_all and r["ok"]
        mib, secs = r["bytes"] / _MIB, r["seconds"]
        rows.append(
            (
                r["worker"],
                str(r["shard"]),
                f"{mib:.1f}",
                f"{secs:.2f}",
                f"{mib / max(secs, 1e-9):.1f}",
                "yes" if r["ok"] else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if report.get("error"):
        print(f"error: {report['error']}", file=sys.stderr)
    return 0 if ok_all and rows[1:] else 1


if __name__ == "__main__":
    raise SystemExit(main())
