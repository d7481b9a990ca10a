"""Send and receive multipart ZeroMQ messages with less per-frame work than pyzmq's sugar.

Why: pyzmq's ``send_multipart``/``recv_multipart`` combine enum flags per frame and
wrap every small frame in a ``zmq.Frame`` when ``copy=False``; on a 100-byte request
that is about half of the socket work per message (measured: 19-25 us against 5-8 us
to send and receive four frames). Here the flags are plain ints, small ``bytes``
frames are copied into libzmq (cheaper than a Frame object), and buffers
(memoryviews, Frames) still go without a copy. Receiving keeps ``copy=False`` so bulk
frames arrive as zero-copy Frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq

__all__ = ["POLLIN", "POLLOUT", "ready_messages", "recv_frames", "send_frames", "zmq_events"]

_EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_ZERO_COPY = (memoryview, zmq.Frame)


def send_frames(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send `frames` as one message without blocking (raises ``zmq.Again`` if it cannot:
    then nothing was sent, since libzmq queues a multipart message whole or not at all)."""
    last = len(frames) - 1
    send = sock.send
    for i, frame in enumerate(frames):
        send(frame, _NOBLOCK if i == last else _MORE, copy=not isinstance(frame, _ZERO_COPY))


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """Receive one whole message without blocking (raises ``zmq.Again`` if none waits)."""
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def ready_messages(sock: zmq.Socket, limit: int) -> Iterator[list[zmq.Frame]]:
    """The messages waiting on `sock`, at most `limit` (so timers and sends get a turn).

    ZeroMQ's file descriptor is edge-triggered: a reader must take messages until
    ``EVENTS`` says none is left, and asking for ``EVENTS`` is cheaper than letting
    ``recv`` raise ``zmq.Again`` at the end.
    """
    for _ in range(limit):
        if not zmq_events(sock) & POLLIN:
            return
        try:
            yield recv_frames(sock)
        except zmq.Again:
            return


def zmq_events(sock: zmq.Socket) -> int:
    """The socket's ``EVENTS`` bits (``POLLIN``, ``POLLOUT``) as a plain int."""
    value = sock.getsockopt(_EVENTS)
    assert isinstance(value, int)
    return value
