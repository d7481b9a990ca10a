"""The ``objdl`` command: run a broker, serve files, get them, list cells, run a demo.

Every mistake a user can make on the command line (a bad name or URL, a missing
file, a destination that cannot be written, a broker that does not answer, a ref
the owner does not know) ends with one line on stderr, ``objdl: error: ...``, and a
non-zero exit status; tracebacks are for bugs only.

Exit status: 0 done; 1 the transfer failed or timed out; 2 bad input; 130 stopped by
Ctrl-C or SIGTERM before the goal was met.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from objdl.cli import _transfer
from objdl.cli._common import (
    DEFAULT_BROKER,
    DEFAULT_CONNECT_TIMEOUT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    check_broker_url,
    check_positive,
    parse_size,
)
from objdl.cli._progress import ProgressDisplay

__all__ = ["CliError", "ProgressDisplay", "build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from objdl.cli import _demo

    if args.sites < 1:
        raise CliError(f"--sites: must be at least 1, got {args.sites}", EXIT_USAGE)
    check_positive("--connect-timeout", args.connect_timeout)
    check_positive("--timeout", args.timeout)
    url = check_broker_url(args.broker) if args.broker else None
    return _demo.run(
        sites=args.sites,
        size=args.size,
        broker_url=url,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        show_progress=not args.quiet,
    )


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other objdl error."""

    def error(self, message: str) -> NoReturn:
        print(f"objdl: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, broker_default: str | None = DEFAULT_BROKER) -> None:
    p.add_argument(
        "--broker",
        default=broker_default,
        metavar="URL",
        help="the broker's address (%(default)s)"
        if broker_default
        else "use this running broker (default: start one)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="give up if the broker does not answer within S seconds (%(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="objdl",
        description="Move large objects from one process to many through an objdl broker.",
        epilog="Exit status: 0 done, 1 failed or timed out, 2 bad input, 130 stopped.",
    )
    parser.add_argument(
        "--log-level",
        default="error",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="library log messages to show on stderr (%(default)s)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "broker",
        help="run a broker (same as objdl-broker; 'objdl broker --help' for its options)",
        add_help=False,
    )
    sub.add_parser(
        "keys",
        help="make key pairs and allow-lists for CURVE ('objdl keys --help')",
        add_help=False,
    )

    p = sub.add_parser("serve", help="offer files until enough sites have them")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files to offer")
    p.add_argument("--name", required=True, metavar="FQCN", help="this owner's cell name")
    _add_common(p)
    p.add_argument(
        "--sites",
        type=int,
        metavar="N",
        help="exit 0 once N sites have every file (default: serve until Ctrl-C)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="give up after S seconds without any download request (%(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_transfer.serve)

    p = sub.add_parser("get", help="download one file by its ref id")
    p.add_argument("ref", metavar="REF", help="the ref id the owner printed")
    p.add_argument("--from", dest="from_", required=True, metavar="FQCN", help="the owner's name")
    p.add_argument("--name", required=True, metavar="FQCN", help="this site's cell name")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    _add_common(p)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for each chunk (%(default)s)",
    )
    p.add_argument(
        "--overall-timeout", type=float, metavar="S", help="seconds for the whole download"
    )
    p.add_argument(
        "--tries", type=int, default=3, metavar="N", help="attempts per request (%(default)s)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_transfer.get)

    p = sub.add_parser("cells", help="list the cells connected to a broker")
    _add_common(p)
    p.add_argument("--prefix", default="", metavar="FQCN", help="only this cell and its children")
    p.set_defaults(func=_transfer.cells)

    p = sub.add_parser(
        "demo", help="broker, owner and N site processes on this machine: move a model, time it"
    )
    p.add_argument("--sites", type=int, default=4, metavar="N", help="site processes (%(default)s)")
    p.add_argument(
        "--size",
        type=_size_arg,
        default=parse_size("256MiB"),
        metavar="SIZE",
        help="model size, e.g. 16MiB, 1GiB (256MiB)",
    )
    _add_common(p, broker_default=None)
    p.set_defaults(broker=None)
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="give up after S s (%(default)s)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_demo)
    return parser


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("objdl: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    """Run the ``objdl`` command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "broker":
        from broker.__main__ import main as broker_main

        return broker_main(argv[1:])
    if argv and argv[0] == "keys":
        from objdl.keys import main as keys_main

        return keys_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"objdl: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("objdl: error: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
