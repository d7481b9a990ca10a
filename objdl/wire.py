"""Messages to ZeroMQ frames and back, plus the broker protocol's frame kinds.

How it works: a message becomes ``[headers, body, *buffers]``. Headers and body are
msgpack; every bulk buffer (bytes-like or numpy array at or above the threshold) is
replaced in the body by a reference to its own frame, so bulk bytes never pass
through msgpack and can be sent with ``copy=False``. See docs/PROTOCOL.md.
"""

from __future__ import annotations

__all__ = [
    "KIND_BYE",
    "KIND_HB",
    "KIND_LIST",
    "KIND_LIST_R",
    "KIND_MSG",
    "KIND_NACK",
    "KIND_PING",
    "KIND_REG",
    "KIND_REG_ERR",
    "KIND_REG_OK",
    "KIND_WHO",
    "NACK_BUSY",
    "NACK_TOO_BIG",
    "NACK_UNREACHABLE",
    "NACK_UNREGISTERED",
    "PROTOCOL_VERSION",
]

PROTOCOL_VERSION = b"1"

# Frame 0 of every broker-protocol message (docs/PROTOCOL.md).
KIND_REG = b"REG"
KIND_REG_OK = b"REG_OK"
KIND_REG_ERR = b"REG_ERR"
KIND_MSG = b"MSG"
KIND_NACK = b"NACK"
KIND_HB = b"HB"
KIND_PING = b"PING"
KIND_WHO = b"WHO"
KIND_LIST = b"LIST"
KIND_LIST_R = b"LIST_R"
KIND_BYE = b"BYE"

NACK_UNREACHABLE = b"unreachable"
NACK_BUSY = b"busy"
NACK_TOO_BIG = b"too_big"
NACK_UNREGISTERED = b"unregistered"
