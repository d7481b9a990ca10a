"""A cell: one named endpoint that sends and serves requests through the broker.

How it works: one I/O thread owns the cell's DEALER socket (ZeroMQ sockets are not
thread-safe). Threads that send encode their message themselves, append the frames
to an outbound queue and wake the I/O thread through a pipe; they then wait on a
per-request waiter registered *before* sending and removed in ``finally``. The I/O
thread routes replies and NACKs to waiters and hands requests to a small pool of
handler threads, so a slow handler never stalls routing. Registration and liveness
are the sans-I/O :class:`objdl._session.Session`.

Security is opt-in (docs/SECURITY.md). With ``broker_public_key`` the socket is a
CURVE client, watched by a monitor socket so a refused key fails :meth:`Cell.start`
at once. With ``peer_keys``, ``secure=True`` seals messages end to end
(:mod:`objdl.security`): a sender seals and queues under one lock per destination,
so counters reach the receiver in order; the receiver opens sealed requests on a
handler thread and sealed replies on the I/O thread, and never hands on a message
that did not authenticate.
"""

from objdl.cell._cell import Cell
from objdl.cell._handlers import RequestCallback
from objdl.cell._pending import PendingRequest
from objdl.cell._protocol import CellLike, check_cell, clock_of

__all__ = ["Cell", "CellLike", "PendingRequest", "RequestCallback", "check_cell", "clock_of"]
