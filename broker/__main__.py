"""Command line: ``python -m broker`` / ``objdl-broker`` runs a broker until SIGINT/SIGTERM.

With ``--curve-keys`` and ``--allowed-keys`` it runs CURVE (docs/SECURITY.md); SIGHUP
then reads the allow-list directory again. With ``--metrics HOST:PORT`` it serves
Prometheus metrics at ``http://HOST:PORT/metrics`` (no authentication: a private
interface only; README, "Watching a broker"). With ``--upstream URL --prefix NAME``
it is a relay that holds the subtree NAME for the broker at URL (docs/PROTOCOL.md,
"Relay brokers"); ``--upstream-key`` and ``--upstream-broker-key`` make its link to
a CURVE parent.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from broker._tree import DEFAULT_MAX_RELAY_QUEUE
from broker.metrics import MetricsUnavailableError
from broker.routing import DEFAULT_MAX_PEER_QUEUE
from broker.server import Broker, BrokerError
from objdl.security import KeyFileError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="objdl-broker", description="Route objdl messages between named cells."
    )
    p.add_argument("--bind", default="tcp://127.0.0.1:8002", help="endpoint to bind (%(default)s)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="S")
    p.add_argument("--cell-timeout", type=float, default=3.0, metavar="S")
    p.add_argument("--probe-timeout", type=float, default=1.0, metavar="S")
    p.add_argument("--max-message-size", type=int, default=256 * 1024 * 1024, metavar="BYTES")
    p.add_argument(
        "--max-peer-queue",
        type=int,
        default=DEFAULT_MAX_PEER_QUEUE,
        metavar="BYTES",
        help="most bytes held outbound for any one cell, however slowly it reads "
        "(%(default)s): past it requests for that cell get NACK busy, replies to it are dropped",
    )
    p.add_argument(
        "--curve-keys",
        metavar="FILE",
        help="the broker's key pair (NAME.key_secret from 'objdl keys new'): CURVE connections",
    )
    p.add_argument(
        "--allowed-keys",
        metavar="DIR",
        help="directory of allowed cell keys and their names ('objdl keys allow'); "
        "needs --curve-keys",
    )
    _add_relay_options(p)
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9102 "
        "(port 0: any free one); no authentication, so bind a private interface; "
        "needs pip install 'objdl[metrics]'",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
    )
    return p


def _add_relay_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("relay (a broker under another broker)")
    g.add_argument(
        "--upstream",
        metavar="URL",
        help="the parent broker's address: this broker relays the subtree --prefix for it",
    )
    g.add_argument(
        "--prefix",
        metavar="NAME",
        help="the subtree this relay holds: cells here may register only NAME and NAME.*",
    )
    g.add_argument(
        "--upstream-key",
        metavar="FILE",
        help="this relay's key pair (NAME.key_secret) for a CURVE parent; the parent must "
        "allow it NAME and NAME.*",
    )
    g.add_argument(
        "--upstream-broker-key",
        metavar="FILE",
        help="the CURVE parent's public key (its .key file); needs --upstream-key",
    )
    g.add_argument(
        "--upstream-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="take the parent for gone after S seconds without a word (%(default)s)",
    )
    g.add_argument(
        "--max-relay-queue",
        type=int,
        default=DEFAULT_MAX_RELAY_QUEUE,
        metavar="BYTES",
        help="most bytes held outbound for one relay link, shared by the cells behind it "
        "(%(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run a broker until SIGINT or SIGTERM; 0 after a clean stop, 2 if it cannot start."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        broker = Broker(
            args.bind,
            heartbeat_interval=args.heartbeat_interval,
            cell_timeout=args.cell_timeout,
            probe_timeout=args.probe_timeout,
            max_message_size=args.max_message_size,
            max_peer_queue=args.max_peer_queue,
            curve_keys=args.curve_keys,
            allowed_keys=args.allowed_keys,
            upstream=args.upstream,
            prefix=args.prefix,
            upstream_key=args.upstream_key,
            upstream_broker_key=args.upstream_broker_key,
            upstream_timeout=args.upstream_timeout,
            max_relay_queue=args.max_relay_queue,
            metrics=args.metrics,
        )
    except (ValueError, MetricsUnavailableError) as exc:  # KeyFileError is a ValueError too
        print(f"objdl-broker: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload.set()
        wake.set()

    # Handlers go in before start so a signal that arrives while binding still stops cleanly.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        if args.allowed_keys is not None and hasattr(signal, "SIGHUP"):
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        try:
            broker.start()
        except BrokerError as exc:
            print(f"objdl-broker: {exc}", file=sys.stderr, flush=True)
            return 2
        try:
            mode = f" (CURVE, public key {broker.public_key.decode()})" if broker.public_key else ""
            print(f"objdl broker listening on {broker.url}{mode}", flush=True)
            if broker.upstream is not None:
                print(f"objdl broker relays {args.prefix!r} for {broker.upstream}", flush=True)
            if broker.metrics_url is not None:
                print(f"objdl broker metrics at {broker.metrics_url}", flush=True)
            while not stop.is_set():
                wake.wait(1.0)
                wake.clear()
                if reload.is_set():
                    reload.clear()
                    _reload(broker)
        finally:
            broker.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _reload(broker: Broker) -> None:
    try:
        count = broker.reload_keys()
    except KeyFileError as exc:
        print(f"objdl-broker: keys not reloaded: {_one_line(exc)}", file=sys.stderr, flush=True)
        return
    print(f"objdl broker: {count} allowed keys", flush=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    raise SystemExit(main())
