"""ZAP (ZeroMQ Authentication Protocol, RFC 27) decisions, with no sockets.

How it works: libzmq asks a ZAP handler, over an inproc socket, whether each new
CURVE connection may proceed; the request holds the client's long-term public key.
The broker's I/O thread receives the request and sends what :func:`zap_reply`
returns: ``200`` with the client's Z85 public key as the User-Id (libzmq then stamps
it on every message of that connection) or ``400``. Only CURVE is ever accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zmq.utils import z85

__all__ = ["ZAP_ENDPOINT", "zap_reply"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq looks for the ZAP handler of a context (fixed by RFC 27)."""

_VERSION = b"1.0"


def zap_reply(request: Sequence[bytes], allows_key: Callable[[bytes], bool]) -> list[bytes]:
    """The reply to one ZAP request: status ``200`` with the key as User-Id, or ``400``.

    Args:
        request: the request frames: version, request id, domain, address,
            identity, mechanism, credentials...
        allows_key: True when a Z85 public key may connect.
    """
    version = request[0] if request else b""
    request_id = request[1] if len(request) > 1 else b""
    if version != _VERSION or len(request) < 6:
        return [_VERSION, request_id, b"400", b"bad ZAP request", b"", b""]
    mechanism, credentials = request[5], request[6:]
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return [_VERSION, request_id, b"400", b"CURVE required", b"", b""]
    key = z85.encode(credentials[0])
    if not allows_key(key):
        return [_VERSION, request_id, b"400", b"unknown key", b"", b""]
    return [_VERSION, request_id, b"200", b"OK", key, b""]
