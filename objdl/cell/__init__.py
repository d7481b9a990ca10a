"""A cell: one named endpoint that sends and serves requests through the broker.

How it works: the protocol is a sans-I/O :class:`~objdl.cell._core.CellCore`
(request correlation with random ids, admission of requests, the session with the
broker, sealing decisions): plain objects fed frames and the time, returning frames
to send. The threaded :class:`Cell` is a shell around it: one I/O thread owns the
DEALER socket (ZeroMQ sockets are not thread-safe), feeds the core what it reads and
flushes what the core queues; callers' threads submit to the core (which encodes,
registers the waiter *before* queuing, and wakes the I/O thread through a pipe) and
wait on their request's lock, which the I/O thread releases when the reply comes: one
wake-up each way. Handlers run on a small pool of threads, so a slow handler never
stalls routing, or inline on the I/O thread when registered ``inline=True``.

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
