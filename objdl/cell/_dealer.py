"""The DEALER connection to the broker, shared by every shell of a cell (threads, asyncio).

It makes and closes the socket (options, CURVE client keys, the monitor socket that
reports handshakes), turns CURVE handshake events into what a shell needs to know, and
turns a failed start into the exception the caller gets. No loop and no thread here:
the shell that owns the socket calls these.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import parse_monitor_message

from objdl import fqcn as _fqcn
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError
from objdl.security import (
    AuthenticationError,
    KeyPair,
    KeySource,
    PeerKeySource,
    PublicKeySource,
    end_to_end,
    load_keypair,
    load_public_key,
)

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = [
    "Handshake",
    "Settings",
    "broker_urls",
    "close_dealer",
    "new_dealer",
    "settings",
    "start_error",
]

_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+")


@dataclass
class Settings:
    """A cell's checked name, broker addresses and keys (every shell takes the same)."""

    fqcn: str
    broker_urls: list[str]  # the first, then its standbys, in the order given
    keys: KeyPair | None
    broker_key: bytes | None
    e2e: EndToEnd | None

    def switch_after(self, broker_timeout: float, start_timeout: float) -> float | None:
        """How long a cell with standbys waits for one broker's REG_OK before the next:
        short enough that a dead first broker leaves the others most of a start."""
        n = len(self.broker_urls)
        if n == 1:
            return None
        return min(broker_timeout, max(0.5, start_timeout / (2 * n)))


def broker_urls(broker_url: str | Sequence[str]) -> list[str]:
    """The broker addresses of ``broker_url``: one URL, a comma-separated list, or a list."""
    urls = broker_url.split(",") if isinstance(broker_url, str) else list(broker_url)
    urls = [u.strip() if isinstance(u, str) else u for u in urls]
    if not urls:
        raise ValueError("broker_url: give at least one broker address")
    for url in urls:
        if not isinstance(url, str) or not _URL.fullmatch(url):
            raise ValueError(
                f"broker_url must look like tcp://HOST:PORT (or ipc://PATH), or a list of "
                f"them, got {url!r}"
            )
    if len(set(urls)) != len(urls):
        raise ValueError(f"broker_url: {urls} names a broker twice")
    return urls


def settings(
    fqcn: str,
    broker_url: str | Sequence[str],
    max_workers: int,
    max_pending: int,
    curve_keys: KeySource | None,
    broker_public_key: PublicKeySource | None,
    peer_keys: PeerKeySource | None,
) -> Settings:
    """Check a cell's constructor arguments and load its keys (see ``Cell``)."""
    name = _fqcn.validate(fqcn)
    urls = broker_urls(broker_url)
    if max_workers < 1 or max_pending < 1:
        raise ValueError("max_workers and max_pending must be at least 1")
    if curve_keys is None and (broker_public_key is not None or peer_keys is not None):
        raise ValueError("broker_public_key and peer_keys need curve_keys (this cell's keys)")
    keys = load_keypair(curve_keys) if curve_keys is not None else None
    broker_key = load_public_key(broker_public_key) if broker_public_key is not None else None
    e2e = end_to_end(name, keys, peer_keys) if peer_keys is not None and keys is not None else None
    return Settings(name, urls, keys, broker_key, e2e)


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def new_dealer(
    ctx: zmq.Context, url: str, keys: KeyPair | None, broker_key: bytes | None
) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A DEALER connecting to `url`, with CURVE and its monitor if `broker_key` is given."""
    sock = ctx.socket(zmq.DEALER)
    monitor = None
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a broker that is not there
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if broker_key is not None:
        assert keys is not None
        sock.curve_serverkey = broker_key
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        monitor.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock, monitor


def close_dealer(sock: zmq.Socket, monitor: zmq.Socket | None, linger_ms: int) -> None:
    """Close `sock` (and its monitor); `linger_ms` bounds how long queued messages may wait."""
    if monitor is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=linger_ms)


@dataclass
class Handshake:
    """What the CURVE handshakes so far say: a refused key, or the last failure."""

    auth_refused: str = ""  # the broker turned our key away (ZAP)
    failed: str = ""  # the last handshake failure, until one succeeds

    def read(self, monitor: zmq.Socket, limit: int = 64) -> bool:
        """Read up to `limit` monitor events; True if the broker refused our key."""
        refused = False
        for _ in range(limit):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except (zmq.ZMQError, ValueError, IndexError):  # Again included: nothing more
                break
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed = ""
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_refused = f"it does not allow this cell's key (ZAP status {value})"
                refused = True
            else:
                self.failed = f"the CURVE handshake failed ({zmq.Event(kind).name})"
        return refused


def start_error(
    url: str, fqcn: str, timeout: float, refused: str, handshake: Handshake
) -> Exception:
    """The exception for a start that did not register (see ``Cell.start``)."""
    if handshake.auth_refused:
        return AuthenticationError(url, handshake.auth_refused)
    if refused:
        if refused.startswith("not allowed"):
            return AuthenticationError(url, f"name {fqcn!r} {refused}", kind="name")
        if refused == "taken":  # PROTOCOL.md: exactly this reason
            return NameTakenError(fqcn, refused)
        return CellError(f"the broker refused cell {fqcn!r}: {refused}")
    if handshake.failed:
        return AuthenticationError(
            url,
            f"{handshake.failed} (is broker_public_key this broker's key, and does it use CURVE?)",
            kind="handshake",
        )
    return BrokerUnavailableError(url, timeout)
