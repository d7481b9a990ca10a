"""The server of a federated-learning-like loop over objdl (run it with site.py).

Each round the server offers the global model, a dict of numpy arrays, in a
transaction that finishes once every site has it, and tells the sites its ref with
one ordinary request. Each site downloads the model, makes a local update, offers the
update from its own cell and tells the server that ref. The server downloads every
update (all at once, one thread per site) and averages them into the next global
model. Only ref ids travel in messages; the arrays move chunk by chunk.

    python examples/federation/server.py --broker tcp://127.0.0.1:8002 --sites 2 --rounds 3

Exit status: 0 after the last round, 1 if a round failed or timed out, 2 bad input
or no broker, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from objdl.cell import Cell
from objdl.downloader import ObjDownloader
from objdl.errors import ObjdlError
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import DownloadError, download_dict, new_transaction, offer_dict

CHANNEL = "fed"
_MIB = 1024 * 1024


class StopFlag:
    """Set by SIGINT/SIGTERM. The handler only stores a value: taking a lock there (as
    ``threading.Event.set`` does) could deadlock against the thread it interrupted."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def is_set(self) -> bool:
        return self.signum is not None


class RoundFailed(Exception):
    """A round cannot go on; the message says why."""


class Mailbox:
    """What the sites sent: who joined, and per round each site's update ref."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.joined: list[str] = []
        self.updates: dict[int, dict[str, str]] = {}
        self._cond = threading.Condition()

    def on_join(self, request: Message) -> Message:
        site = request.get_header(MessageHeaderKey.ORIGIN)
        with self._cond:
            if site not in self.joined:
                self.joined.append(site)
            self._cond.notify_all()
        return Message(payload={"rounds": self.rounds})

    def on_update(self, request: Message) -> None:
        site = request.get_header(MessageHeaderKey.ORIGIN)
        body = request.payload
        if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
            raise ValueError("an update needs {'round': int, 'ref': str}")
        with self._cond:
            self.updates.setdefault(int(body["round"]), {})[site] = body["ref"]
            self._cond.notify_all()

    def wait(self, ready: Any, deadline: float, stop: StopFlag, what: str) -> None:
        """Until ready() under the lock; RoundFailed at the deadline or on a signal."""
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if stop.is_set():
                    raise RoundFailed("interrupted")
                if left <= 0:
                    raise RoundFailed(f"timed out waiting for {what}")
                self._cond.wait(min(left, 0.2))


def initial_model(size_mib: float, layers: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = max(1, int(size_mib * _MIB) // (4 * layers * 257))
    model = {}
    for k in range(layers):
        model[f"layer{k}.weight"] = rng.standard_normal((rows, 256), dtype=np.float32)
        model[f"layer{k}.bias"] = np.zeros(rows, dtype=np.float32)
    return model


def average(updates: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = updates[0].keys()
    for u in updates[1:]:
        if u.keys() != keys:
            raise RoundFailed("the sites' updates do not have the same layers")
    out = {}
    for k in keys:
        acc = np.zeros(updates[0][k].shape, dtype=np.float32)
        for u in updates:
            acc += u[k]
        acc /= len(updates)
        out[k] = acc
    return out


def run_round(
    cell: Cell,
    box: Mailbox,
    sites: list[str],
    rnd: int,
    model: dict[str, np.ndarray],
    timeout: float,
    stop: StopFlag,
) -> dict[str, np.ndarray]:
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    tx = new_transaction(cell, timeout=timeout, sites=sites, allowed_sites=sites)
    try:
        ref = offer_dict(cell, model, transaction_id=tx)
        job = Message(payload={"round": rnd, "ref": ref})
        for site, reply in cell.broadcast_request(CHANNEL, "round", sites, job, 10.0).items():
            rc = reply.get_header(MessageHeaderKey.RETURN_CODE)
            if rc != ReturnCode.OK:
                raise RoundFailed(f"could not start round {rnd} on {site}: {rc}")
        box.wait(
            lambda: set(sites) <= set(box.updates.get(rnd, {})),
            deadline,
            stop,
            f"the round {rnd} updates",
        )
        t1 = time.monotonic()
        refs = box.updates.pop(rnd)
        with ThreadPoolExecutor(len(sites), thread_name_prefix="fed-get") as pool:
            futures = {
                site: pool.submit(
                    download_dict,
                    cell,
                    site,
                    refs[site],
                    per_request_timeout=10.0,
                    overall_timeout=max(1.0, deadline - time.monotonic()),
                )
                for site in sites
            }
            try:
                updates = [futures[site].result() for site in sites]
            except DownloadError as exc:
                raise RoundFailed(f"round {rnd}: {exc}") from None
        t2 = time.monotonic()
        new_model = average(updates)
        t3 = time.monotonic()
    finally:
        ObjDownloader.delete_transaction(tx)  # already finished unless the round failed
    mib = sum(a.nbytes for a in model.values()) / _MIB
    print(
        f"round {rnd}: model {mib:.1f} MiB to {len(sites)} sites and their updates back "
        f"in {t1 - t0:.2f}s, updates downloaded in {t2 - t1:.2f}s, averaged in "
        f"{t3 - t2:.3f}s; round {t3 - t0:.2f}s",
        flush=True,
    )
    return new_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="tcp://127.0.0.1:8002", help="broker URL (%(default)s)")
    p.add_argument("--name", default="server", help="this server's cell name (%(default)s)")
    p.add_argument("--sites", type=int, default=2, help="sites to wait for (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds to run (%(default)s)")
    p.add_argument(
        "--data-bind",
        metavar="URL",
        help="open a data socket here (e.g. tcp://127.0.0.1:*) so that sites pull the model "
        "directly, not through the broker (default: all through the broker)",
    )
    p.add_argument("--size-mib", type=float, default=16.0, help="model size (%(default)s MiB)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to join, and per round (%(default)s)"
    )
    args = p.parse_args(argv)
    if args.sites < 1 or args.rounds < 1 or args.size_mib <= 0 or args.timeout <= 0:
        p.error("--sites, --rounds, --size-mib and --timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()  # the waits below look at it at least every 0.2 s
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    box = Mailbox(args.rounds)
    try:
        cell = Cell(args.name, args.broker, data_bind=args.data_bind)
    except ValueError as exc:
        print(f"server: error: {exc}", file=sys.stderr)
        return 2
    cell.register_request_cb(CHANNEL, "join", box.on_join)
    cell.register_request_cb(CHANNEL, "update", box.on_update)
    try:
        cell.start()
    except (ObjdlError, ValueError) as exc:
        print(f"server: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"server {args.name}: waiting for {args.sites} sites on {args.broker}", flush=True)
        box.wait(
            lambda: len(box.joined) >= args.sites,
            time.monotonic() + args.timeout,
            stop,
            f"{args.sites} sites to join",
        )
        sites = sorted(box.joined[: args.sites])
        print(f"server: sites {', '.join(sites)} joined", flush=True)
        model = initial_model(args.size_mib)
        started = time.monotonic()
        for rnd in range(1, args.rounds + 1):
            model = run_round(cell, box, sites, rnd, model, args.timeout, stop)
        print(f"server: {args.rounds} rounds in {time.monotonic() - started:.2f}s", flush=True)
        links = ", ".join(f"{s} {cell.link_state(s)}" for s in sites)
        print(f"server: direct links to the sites: {links}", flush=True)
        # "done" needs no reply; the sites' leaving shows it arrived, so stopping
        # our cell cannot cut it off.
        cell.fire_and_forget(CHANNEL, "done", sites, Message())
        deadline = time.monotonic() + 10.0
        while set(sites) & set(cell.list_cells()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0
    except RoundFailed as exc:
        print(f"server: error: {exc}", file=sys.stderr)
        return 130 if stop.is_set() else 1
    finally:
        cell.stop()


if __name__ == "__main__":
    raise SystemExit(main())
