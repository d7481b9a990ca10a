"""The direct-link options: ``serve --data-bind/--data-advertise/--data-allowed-keys``
and ``get --no-direct``, checked before any connection.

``--data-bind URL`` gives the owner's cell a data socket (``Cell(data_bind=...)``):
sites that download from it pull the chunks from there instead of through the
broker, which still carries the first reply and the offer in it. Every mistake the
Cell would raise later, on its I/O thread or in ``start()``, is one line here that
names the option: a URL ZeroMQ cannot bind, a wildcard address with nothing to
advertise, a CURVE broker with no allow-list for the data socket.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from objdl.cli._common import EXIT_USAGE, CliError
from objdl.cli._keys import KeyOptions

__all__ = ["DIRECT_SAID", "add_data_args", "data_options", "link_report", "link_used"]

_BIND = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+|\*):(?P<port>[0-9]{1,5}|\*)")
_HOST = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?")
_ADVERTISE_URL = re.compile(
    r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})"
)
_WILDCARDS = ("*", "0.0.0.0", "[::]")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data-bind``, ``--data-advertise`` and ``--data-allowed-keys`` (serve)."""
    p.add_argument(
        "--data-bind",
        metavar="URL",
        help="open a data socket here (tcp://HOST:PORT, PORT may be *): sites pull the "
        "chunks from it directly once the broker carried the first reply (with the "
        "offer); sites that cannot reach it use the broker (README: 'When to use direct "
        "links')",
    )
    p.add_argument(
        "--data-advertise",
        metavar="HOST|URL",
        help="the address sites connect to: a host (the bound port is added) or "
        "tcp://HOST:PORT; needed when --data-bind listens on every interface "
        "(0.0.0.0, *)",
    )
    p.add_argument(
        "--data-allowed-keys",
        metavar="DIR",
        help="the site keys that may connect to the data socket, and the names each may "
        "use, as the broker's --allowed-keys folder: makes it a CURVE server (needs "
        "--key); with --broker-key it is one anyway (default: --peer-keys)",
    )


def _port_ok(port: str) -> bool:
    return port == "*" or 1 <= int(port) <= 65535


def _check_bind(bind: str) -> str:
    m = _BIND.fullmatch(bind)
    if m is not None and _port_ok(m.group("port")):
        return m.group("host")
    if bind.startswith("ipc://") and len(bind) > len("ipc://"):
        return ""
    raise CliError(
        f"--data-bind: invalid address {bind!r}: use tcp://HOST:PORT (PORT may be *, "
        "e.g. tcp://0.0.0.0:9000) or ipc://PATH",
        EXIT_USAGE,
    )


def _check_advertise(advertise: str) -> None:
    if "://" in advertise:
        m = _ADVERTISE_URL.fullmatch(advertise)
        if m is not None and 1 <= int(m.group("port")) <= 65535:
            return
        why = "use tcp://HOST:PORT, the port sites connect to"
    elif _HOST.fullmatch(advertise):
        return
    else:
        why = "give a host name or address (the bound port is added) or tcp://HOST:PORT"
    raise CliError(f"--data-advertise: invalid {advertise!r}: {why}", EXIT_USAGE)


def data_options(args: argparse.Namespace, keys: KeyOptions) -> dict[str, Any]:
    """The ``Cell`` arguments of the data-socket options in `args` ({} without them).

    Raises:
        CliError (exit 2): a bad address, an option without ``--data-bind``, a
            wildcard bind without ``--data-advertise``, a CURVE data socket with no
            allow-list or no key pair.
    """
    bind, advertise, allowed = args.data_bind, args.data_advertise, args.data_allowed_keys
    if bind is None:
        given = "--data-advertise" if advertise is not None else "--data-allowed-keys"
        if advertise is not None or allowed is not None:
            raise CliError(f"{given} needs --data-bind (where the data socket listens)", 2)
        return {}
    host = _check_bind(bind)
    if advertise is not None:
        _check_advertise(advertise)
    elif host in _WILDCARDS:
        raise CliError(
            f"--data-bind {bind} listens on every interface: give --data-advertise HOST, "
            "the name or address sites use to reach this owner",
            EXIT_USAGE,
        )
    kw: dict[str, Any] = {"data_bind": bind}
    if advertise is not None:
        kw["data_advertise"] = advertise
    if allowed is not None:
        if keys.key is None:
            raise CliError(
                "--data-allowed-keys makes the data socket a CURVE server, which needs --key "
                "(this cell's key pair)",
                EXIT_USAGE,
            )
        _check_allow_list(allowed)
        kw["data_allowed_keys"] = allowed
    elif keys.broker_key is not None and keys.peer_keys is None:
        raise CliError(
            "--data-bind with --broker-key: the data socket is a CURVE server too; give "
            "--data-allowed-keys DIR (the site keys it lets in, e.g. the broker's "
            "allowed-keys folder) or --peer-keys DIR",
            EXIT_USAGE,
        )
    return kw


def _check_allow_list(folder: str) -> None:
    from objdl.security import KeyFileError, KeyPolicy

    if not Path(folder).is_dir():
        raise CliError(
            f"--data-allowed-keys {folder}: not a directory (give the folder of NAME.key "
            "files, e.g. the broker's allowed-keys folder)",
            EXIT_USAGE,
        )
    try:
        policy = KeyPolicy.from_dir(folder)
    except KeyFileError as exc:
        why = " ".join(str(exc).split())
        raise CliError(f"--data-allowed-keys {folder}: {why}", EXIT_USAGE) from None
    if not policy.keys:
        raise CliError(
            f"--data-allowed-keys {folder}: holds no NAME.key file, so no site could connect",
            EXIT_USAGE,
        )


def link_report(cell: Any) -> dict[str, Any]:
    """What the data socket did: its address and the counts of links bound and refused."""
    stats = cell.link_stats
    return {
        "url": cell.data_url,
        "links_bound": stats.get("links_bound", 0),
        "links_refused": stats.get("links_refused", 0),
    }


DIRECT_SAID = {
    "up": ", over a direct link",
    "lost": ", over a direct link until it was lost, then through the broker",
    "failed": ", through the broker: the direct link could not be made",
}
"""What ``get`` says of the owner's direct link (:func:`link_used`) once it is done."""


def link_used(cell: Any, owner: str) -> str:
    """How a one-owner download went: ``up`` (the link is up), ``lost`` (it was up, then
    went down: the broker carried the rest), ``failed`` (never made), ``connecting``
    (not made yet when the download ended) or ``none`` (no link: none offered, or
    ``--no-direct``)."""
    state = str(cell.link_state(owner))
    if state == "failed" and cell.link_stats.get("links_lost", 0):
        return "lost"
    return state
