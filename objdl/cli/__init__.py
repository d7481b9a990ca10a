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
from typing import Any, NoReturn

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
from objdl.cli._direct import add_data_args
from objdl.cli._events import Events
from objdl.cli._keys import ENV, add_key_args, env_default, env_help
from objdl.cli._progress import ProgressDisplay

__all__ = ["CliError", "ProgressDisplay", "build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from objdl.cli import _demo

    if args.sites < 1:
        raise CliError(f"--sites: must be at least 1, got {args.sites}", EXIT_USAGE)
    check_positive("--connect-timeout", args.connect_timeout)
    check_positive("--timeout", args.timeout)
    url = check_broker_url(args.broker) if args.broker else None
    if args.secure and url is not None:
        raise CliError(
            "--secure starts its own CURVE broker with throw-away keys: do not give --broker",
            EXIT_USAGE,
        )
    return _demo.run(
        sites=args.sites,
        size=args.size,
        broker_url=url,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        show_progress=not args.quiet,
        secure=args.secure,
        direct=args.direct,
    )


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other objdl error."""

    last_error: str | None = None  # for the --json error event

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see '{self.prog} --help')"
        _Parser.last_error = text
        print(f"objdl: error: {text}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, broker_default: str | None = DEFAULT_BROKER) -> None:
    if broker_default is None:
        p.add_argument(
            "--broker", metavar="URL", help="use this running broker (default: start one)"
        )
    else:
        p.add_argument(
            "--broker",
            default=env_default("broker", broker_default),
            metavar="URL",
            help=(
                f"the broker's address, or several separated by commas: a broker and its "
                f"standbys (default ${ENV['broker']} if set, else {broker_default})"
            ),
        )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="give up if the broker does not answer within S seconds (%(default)s)",
    )


def _add_name(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--name",
        default=env_default("name"),
        metavar="FQCN",
        help=f"{what} (required){env_help('name')}",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per event on stdout (see the README); no progress on "
        "stderr, errors still one line there",
    )


_ENV_EPILOG = (
    "Options fall back to environment variables: --broker $OBJDL_BROKER, --name "
    "$OBJDL_NAME, --key $OBJDL_KEY, --broker-key $OBJDL_BROKER_KEY, --peer-keys "
    "$OBJDL_PEER_KEYS; an option given wins over its variable."
)


def _add_serve(sub: Any) -> None:
    from objdl.downloader import DEFAULT_CHUNK_SIZE, DIGESTS
    from objdl.downloader.sized import DEFAULT_DIGEST

    p = sub.add_parser("serve", help="offer files until enough sites have them", epilog=_ENV_EPILOG)
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files to offer, or folders: every regular file directly in one (not its "
        "subdirectories; symlinks only if they stay inside it)",
    )
    _add_name(p, "this owner's cell name")
    _add_common(p)
    add_key_args(p)
    p.add_argument(
        "--sites",
        type=int,
        metavar="N",
        help="exit 0 once N sites have every file (default: serve until Ctrl-C)",
    )
    p.add_argument(
        "--allowed-sites",
        metavar="NAME,NAME",
        help="only these cells may download (comma-separated); others are refused",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="serve only requests sealed end to end (needs --key and --peer-keys)",
    )
    p.add_argument(
        "--digest",
        default=DEFAULT_DIGEST,
        choices=DIGESTS,
        help="the checksum sites verify (%(default)s; sha256 where a site must not trust "
        "a non-cryptographic hash)",
    )
    p.add_argument(
        "--chunk-size",
        type=_size_arg,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="the largest chunk served per request (2MiB)",
    )
    add_data_args(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="give up after S seconds without any download request (%(default)s)",
    )
    _add_output(p)
    p.set_defaults(func=_transfer.serve)


def _add_get(sub: Any) -> None:
    p = sub.add_parser("get", help="download one file by its ref id", epilog=_ENV_EPILOG)
    p.add_argument("ref", metavar="REF", help="the ref id the owner printed")
    p.add_argument("--from", dest="from_", required=True, metavar="FQCN", help="the owner's name")
    _add_name(p, "this site's cell name")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    _add_common(p)
    add_key_args(p)
    p.add_argument("--secure", action="store_true", help="seal every request and reply end to end")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep what arrived if the download stops, and continue from it when run again",
    )
    p.add_argument("--window", type=int, metavar="N", help="chunk requests in flight (8)")
    p.add_argument(
        "--chunk-size", type=_size_arg, metavar="SIZE", help="bytes per request, e.g. 512KiB (2MiB)"
    )
    p.add_argument(
        "--max-size",
        type=_size_arg,
        metavar="SIZE",
        help="refuse an object larger than SIZE, e.g. 10GiB (default: no limit)",
    )
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
    p.add_argument(
        "--no-direct",
        action="store_true",
        help="never take the owner's offer of a direct link: every chunk through the broker",
    )
    _add_output(p)
    p.set_defaults(func=_transfer.get)


def _add_cells(sub: Any) -> None:
    p = sub.add_parser("cells", help="list the cells connected to a broker", epilog=_ENV_EPILOG)
    _add_common(p)
    p.add_argument(
        "--name",
        default=env_default("name"),
        metavar="FQCN",
        help="the name to connect as, one bound to --key on a CURVE broker; it must not be "
        f"in use (default: ${ENV['name']} if set, else objdl-cli-<random>)",
    )
    add_key_args(p)
    p.add_argument("--prefix", default="", metavar="FQCN", help="only this cell and its children")
    p.add_argument("--json", action="store_true", help="one JSON object per cell, then a summary")
    p.set_defaults(func=_transfer.cells)


def _add_demo(sub: Any) -> None:
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
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="give up after S s (%(default)s)"
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="as a real deployment: throw-away keys in a private temporary folder, a CURVE "
        "broker with names bound to keys, every request and reply sealed end to end "
        "(needs the cryptography package)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="the owner opens a data socket on 127.0.0.1 and the sites pull the chunks from "
        "it directly (the broker carries the first reply); the table says which did",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="objdl",
        description="Move large objects from one process to many through an objdl broker.",
        epilog="Exit status: 0 done, 1 failed, timed out or refused by the broker, 2 bad "
        "input, 130 stopped. " + _ENV_EPILOG,
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
    _add_serve(sub)
    _add_get(sub)
    _add_cells(sub)
    _add_demo(sub)
    return parser


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("objdl: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _error(message: str, code: int, kind: str, json_out: bool) -> int:
    print(f"objdl: error: {message}", file=sys.stderr, flush=True)
    Events(json_out).emit("error", code=code, kind=kind, message=message)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the ``objdl`` command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "broker":
        from broker.__main__ import main as broker_main

        return broker_main(argv[1:])
    if argv and argv[0] == "keys":
        from objdl.keys import main as keys_main

        return keys_main(argv[1:])
    json_out = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if code and _Parser.last_error is not None:
            Events(json_out).emit("error", code=code, kind="usage", message=_Parser.last_error)
        return code
    _setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], int] = args.func
    json_out = bool(getattr(args, "json", False))
    try:
        return func(args)
    except CliError as exc:
        return _error(str(exc), exc.code, exc.kind, json_out)
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_INTERRUPTED, "interrupted", json_out)
