"""The SEAL that opens every sealed message body: its layout, without `cryptography`.

``version (1) | sender session (12) | receiver session (12) | counter (8, big-endian)``
(SECURITY.md, "Wire format of a sealed message"). The cell reads seals to bind
replies to their requests even where `cryptography` is not installed, so the layout
lives here, apart from the sealing itself in :mod:`objdl.security._e2e`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["NO_SESSION", "SEAL_LEN", "SESSION_LEN", "VERSION", "seal_of", "view_of"]

VERSION = 2
SESSION_LEN = 12
SEAL_LEN = 1 + 2 * SESSION_LEN + 8
NO_SESSION = bytes(SESSION_LEN)  # "the receiver's session is not known yet"


def view_of(frame: Any) -> memoryview:
    """A flat byte view of a frame (a zmq.Frame, bytes or any buffer)."""
    buffer = getattr(frame, "buffer", None)
    view = buffer if isinstance(buffer, memoryview) else memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def seal_of(frames: Sequence[Any]) -> bytes:
    """The SEAL of sealed frames ``[headers, body, ...]`` (b"" if there is none)."""
    if len(frames) < 2:
        return b""
    body = view_of(frames[1])
    return bytes(body[:SEAL_LEN]) if body.nbytes >= SEAL_LEN else b""
