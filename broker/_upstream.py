"""A relay broker's socket to its parent: one DEALER, owned by the broker's I/O thread.

The broker's :meth:`~broker.Broker.start` makes it (so a bad address fails the start)
and hands it to the I/O thread, which alone uses it from then on: it polls it, drains
it into the routing table, sends the table's sends for the peer ``UPSTREAM`` on it,
and replaces it when the table says ``reconnect_upstream`` (the parent went silent).
Every decision is the table's (``broker/_relay.py``, ``broker/_tree.py``); this only
moves frames.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import zmq

from objdl import fqcn
from objdl.security import KeyPair, KeySource, PublicKeySource, load_keypair, load_public_key

__all__ = ["UpstreamSocket", "check_upstream"]

_URL = re.compile(r"(tcp|ipc|inproc)://\S+")
_BYE_LINGER_MS = 200  # time for a relay's BYE to leave when it stops


def check_upstream(
    upstream: str | None,
    prefix: str | None,
    key: KeySource | None,
    broker_key: PublicKeySource | None,
) -> tuple[KeyPair, bytes] | None:
    """Check a relay's arguments (see ``Broker``); return its CURVE keys, or None.

    Raises:
        ValueError: `upstream` without `prefix` or the reverse, an address that is
            not a ZeroMQ endpoint, a bad prefix, or one key without the other.
        KeyFileError: a key file cannot be read (a ValueError too).
    """
    if (upstream is None) != (prefix is None):
        raise ValueError(
            "upstream and prefix go together: a relay broker needs its parent's address "
            "and the subtree (a name) it holds for it"
        )
    if upstream is not None and (not isinstance(upstream, str) or not _URL.fullmatch(upstream)):
        raise ValueError(f"upstream must look like tcp://HOST:PORT, got {upstream!r}")
    if prefix is not None:
        fqcn.validate(prefix)
    if (key is None) != (broker_key is None):
        raise ValueError(
            "upstream_key and upstream_broker_key go together: a relay of a CURVE parent "
            "needs its own key pair and the parent's public key"
        )
    if key is None or broker_key is None:
        return None
    if upstream is None:
        raise ValueError("upstream_key and upstream_broker_key need upstream (a relay)")
    return load_keypair(key), load_public_key(broker_key)


class UpstreamSocket:
    """The DEALER a relay connects to its parent (a CURVE client when `keys` are given).

    Args:
        url: the parent's address.
        keys: the relay's key pair and the parent's public key, or None.
        hwm: the socket's send and receive high-water marks, in messages.
    """

    def __init__(self, url: str, keys: tuple[KeyPair, bytes] | None, hwm: tuple[int, int]):
        self.url = url
        self._keys = keys
        self._hwm = hwm
        self.sock: zmq.Socket[Any] | None = None

    def open(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        """Make the socket and connect it (it is not yet polled).

        Raises:
            zmq.ZMQError: libzmq refused the address.
        """
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues toward a parent that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.sndhwm, sock.rcvhwm = self._hwm
        if self._keys is not None:
            keys, parent = self._keys
            sock.curve_serverkey = parent
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        try:
            sock.connect(self.url)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.sock = sock
        return sock

    def replace(self, context: zmq.Context[Any]) -> None:
        """Close the socket and open a new one in its place (what it held is dropped);
        the broker's loop sees :attr:`sock` change and polls the new one.

        Raises:
            zmq.ZMQError: the new socket could not connect (there is none then).
        """
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        self.open(context)

    def send(self, frames: list[Any]) -> None:
        """Send one message without blocking.

        Raises:
            zmq.Again: libzmq did not take it (no connection, or its pipe is full).
        """
        if self.sock is None:
            raise zmq.Again()
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def drain(self, handle: Callable[[list[zmq.Frame]], None], limit: int) -> None:
        """Hand up to `limit` waiting messages to `handle`, as they are (zero-copy)."""
        sock = self.sock
        for _ in range(limit):
            if self.sock is not sock or sock is None:
                return  # replaced meanwhile: the new socket is polled next round
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def close(self, bye: list[bytes] | None) -> None:
        """Send `bye` if given (so the parent forgets us at once), then close."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        linger = 0
        if bye is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(bye, zmq.NOBLOCK)
                linger = _BYE_LINGER_MS
        sock.close(linger=linger)
