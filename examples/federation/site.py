"""A site of the federated-learning-like loop in server.py.

The site joins the server, then each round: downloads the global model by the ref
the server sent, makes a local update (here: a step toward a site-specific target,
plus noise), offers the update from its own cell in a transaction that finishes once
the server has it, and tells the server the update's ref. The server says how many
rounds there are when the site joins, and says "done" once it has the last updates.

    python examples/federation/site.py --broker tcp://127.0.0.1:8002 --name site-1

Exit status: 0 after the last round, 1 if a round failed or timed out, 2 bad input
or no broker, 130 interrupted.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import time
import zlib
from typing import Any

import numpy as np

from objdl.cell import Cell
from objdl.errors import ObjdlError
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import DownloadError, download_dict, new_transaction, offer_dict

CHANNEL = "fed"


class StopFlag:
    """Set by SIGINT/SIGTERM; the handler takes no lock (see server.py)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def is_set(self) -> bool:
        return self.signum is not None


class SiteError(Exception):
    """This site cannot go on; the message says why."""


def local_update(model: dict[str, Any], rng: np.random.Generator, lr: float) -> dict[str, Any]:
    """One step of 'training': pull every array toward a site-specific target, add noise."""
    out = {}
    for key, w in model.items():
        target = rng.standard_normal(w.shape, dtype=np.float32)
        out[key] = (w + lr * (target - w)).astype(np.float32, copy=False)
    return out


def join(cell: Cell, server: str, deadline: float, stop: StopFlag) -> int:
    """Tell the server we are here (it may start after us); return its number of rounds."""
    while True:
        # optional: "not there yet" is expected while the server starts; no warning
        reply = cell.send_request(CHANNEL, server, "join", Message(), 5.0, optional=True)
        rc = reply.get_header(MessageHeaderKey.RETURN_CODE)
        if rc == ReturnCode.OK and isinstance(reply.payload, dict):
            return int(reply.payload["rounds"])
        if rc not in (ReturnCode.TARGET_UNREACHABLE, ReturnCode.TIMEOUT, ReturnCode.COMM_ERROR):
            raise SiteError(f"the server refused the join: {rc}")
        if stop.is_set():
            raise SiteError("interrupted")
        if time.monotonic() > deadline:
            raise SiteError(f"no server {server!r} answered in time ({rc})")
        time.sleep(0.2)


def next_message(inbox: queue.SimpleQueue[Any], deadline: float, stop: StopFlag) -> Any:
    while True:
        try:
            return inbox.get(timeout=0.2)
        except queue.Empty:
            if stop.is_set():
                raise SiteError("interrupted") from None
            if time.monotonic() > deadline:
                raise SiteError("no word from the server in time") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="tcp://127.0.0.1:8002", help="broker URL (%(default)s)")
    p.add_argument("--name", required=True, help="this site's cell name, e.g. site-1")
    p.add_argument("--server", default="server", help="the server's cell name (%(default)s)")
    p.add_argument(
        "--data-bind",
        metavar="URL",
        help="open a data socket here so that the server pulls this site's updates directly",
    )
    p.add_argument("--lr", type=float, default=0.1, help="local step size (%(default)s)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the server (%(default)s)"
    )
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    try:
        cell = Cell(args.name, args.broker, data_bind=args.data_bind)
    except ValueError as exc:
        print(f"site: error: {exc}", file=sys.stderr)
        return 2
    cell.register_request_cb(CHANNEL, "round", lambda req: inbox.put(req.payload))
    cell.register_request_cb(CHANNEL, "done", lambda req: inbox.put(None))
    try:
        cell.start()
    except ObjdlError as exc:
        print(f"site: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(zlib.crc32(args.name.encode()))
    try:
        rounds = join(cell, args.server, time.monotonic() + args.timeout, stop)
        print(f"{args.name}: joined {args.server} for {rounds} rounds", flush=True)
        for _ in range(rounds):
            job = next_message(inbox, time.monotonic() + args.timeout, stop)
            if job is None:
                return 0  # the server stopped early
            t0 = time.monotonic()
            try:
                model = download_dict(cell, args.server, job["ref"], overall_timeout=args.timeout)
            except DownloadError as exc:
                raise SiteError(f"round {job['round']}: {exc}") from None
            t1 = time.monotonic()
            update = local_update(model, rng, args.lr)
            t2 = time.monotonic()
            # The update is served from this cell until the server has it; the
            # transaction then ends by itself (or after --timeout idle seconds).
            tx = new_transaction(
                cell, timeout=args.timeout, sites=[args.server], allowed_sites=[args.server]
            )
            ref = offer_dict(cell, update, transaction_id=tx)
            note = Message(payload={"round": job["round"], "ref": ref})
            reply = cell.send_request(CHANNEL, args.server, "update", note, 10.0)
            rc = reply.get_header(MessageHeaderKey.RETURN_CODE)
            if rc != ReturnCode.OK:
                raise SiteError(f"round {job['round']}: the server did not take the update: {rc}")
            print(
                f"{args.name}: round {job['round']}: model in {t1 - t0:.2f}s, "
                f"local step {t2 - t1:.2f}s",
                flush=True,
            )
        # The server sends "done" after it has every update of the last round.
        if next_message(inbox, time.monotonic() + args.timeout, stop) is not None:
            raise SiteError("expected 'done' from the server after the last round")
        link = cell.link_state(args.server)
        print(f"{args.name}: direct link to {args.server}: {link}", flush=True)
        return 0
    except SiteError as exc:
        print(f"{args.name}: error: {exc}", file=sys.stderr)
        return 130 if stop.is_set() else 1
    finally:
        cell.stop()


if __name__ == "__main__":
    raise SystemExit(main())
