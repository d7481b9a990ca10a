"""Test code built on objdl's cells without sockets, a broker or wall-clock waits.

A :class:`FakeNetwork` is an in-process network of fake cells with the broker's
rules; each :class:`FakeCell` has the real cell's methods (it is an
:class:`objdl.cell.CellLike`), so the downloader, the ready objects and an
application's own handlers run on it unchanged:

    from objdl.testing import FakeClock, FakeNetwork
    from objdl.objects import download_bytes, offer_bytes

    net = FakeNetwork(clock=FakeClock())
    with net, net.cell("server") as owner, net.cell("site-1") as site:
        ref = offer_bytes(owner, b"x" * 1_000_000)
        assert download_bytes(site, "server", ref) == b"x" * 1_000_000

Importing it starts nothing; a cell joins the network at ``start()`` (or ``with``).

What is kept from the real cell and broker:

- Messages go through :func:`objdl.wire.encode` and :func:`objdl.wire.decode`, the
  frames copied on the way as a socket would: payloads come back as they would
  (tuples as lists, bulk buffers of 64 KiB or more as read-only memoryviews, arrays
  as read-only arrays), and a payload the wire cannot carry raises at the sender.
- The sender's name is stamped as ``ORIGIN`` whatever it wrote; a message over
  ``max_message_size`` (the broker's limit, all frames counted) is refused:
  ``msg_too_big`` for a request.
- The same return codes in the same cases: ``target_unreachable`` at once for a
  name with no connected cell; ``timeout`` when the clock passes the deadline;
  ``process_exception`` when a handler raises (or returns something that is not a
  Message, or a reply that does not encode); ``invalid_request`` when no handler is
  registered; ``comm_error`` for a cell not connected (its waiting requests too, when
  it stops or is cut off); ``service_unavailable`` when more than ``max_pending``
  handlers would run on a cell at once; ``abort_run`` for an abort signal.
  ``request_async``'s pending request is not resolved at its deadline, as with the
  real cell: ``result()`` gives the ``timeout`` reply.
- ``secure=True``: the handler sees ``SECURE`` True only for a request sent with
  ``secure=True``, and False for every other, whatever headers the sender set; the
  reply to it comes back marked secure; a cell made with ``keys=False`` refuses
  secure requests (``authentication_error``, ``auth_reason`` ``no_keys``) and raises
  SecureUnavailableError when asked to send one. **Nothing is encrypted or
  authenticated**: this tests the upper layers' policy (an owner that serves only
  sealed requests, say), not the sealing, which the real-socket tests cover.

The clock (:class:`FakeClock`): deadlines, delays and the downloader's owner-side
timeouts are on it, and it moves only when the test calls ``clock.advance(s)``
(timers run in order, on that thread, and have run when it returns), or, with
``FakeClock(autojump=True)``, when a thread waiting on it finds the network idle: it
jumps to the next timer or its own deadline, so a request whose reply was dropped
returns ``timeout`` at once in real time. A wait that sees the clock stand still for
``stall_timeout`` real seconds raises :class:`ClockStalled` instead of hanging.

Faults, all controlled from the test (match by attributes, e.g. ``kind="rep"``,
``origin="server"``, and/or a predicate on the :class:`Envelope`; ``count=n`` for the
next n only; each returns a :class:`Fault` with ``remove()``, usable in ``with``):
``net.drop(...)`` loses messages; ``net.delay(seconds, ...)`` delivers them later on
the clock (a function of the envelope gives jitter, and so reordering);
``net.hold(...)`` keeps them until ``hold.release(order)`` (any order: reordering
under the test's control); ``net.partition(name)`` / ``net.heal(name)`` cut a cell
off the broker and back; ``net.kill(name)`` makes a cell vanish (its name free for a
restart). ``net.log`` / ``net.messages(...)`` show what was sent and its fate.

Handlers run synchronously, on the thread that delivers the message: the sender's,
or the thread advancing the clock (for delayed messages), or releasing a hold. This
is deterministic: when ``send_request`` or ``advance`` returns, everything it caused
has happened, so a test reads state without polling or sleeping, and a traceback
shows the whole path. The real cell runs handlers on a pool instead; what that
changes: a handler here blocks its sender while it runs, shares its thread (thread
locals, re-entrant calls), and handlers run concurrently only when the test's own
threads send at once (``max_pending`` counts those). Code whose handler waits for
something its requester does after sending needs the real cell.

Other differences, on purpose: a partitioned cell and its peers notice at once (the
real ones after ``broker_timeout``); there are no heartbeats, reconnects, CURVE or
seals; a secure fire says at once ``target_unreachable`` for a cell that is not
connected and ``authentication_error`` for one without keys (the real cell learns it
from its first-contact handshake, and says ``ok`` to later fires).

Code that reads ``time.monotonic()`` itself rather than its cell's ``clock``
(:func:`objdl.cell.clock_of`) keeps real time: today that is the site side of
``download_object`` (per-request timeouts of its window, retry back-off, the overall
deadline), so a windowed download whose replies are delayed or held waits in real time
for them while the test moves the clock from another thread; without such faults a
download completes without waiting at all.
"""

from objdl.testing._cell import FakeCell
from objdl.testing._clock import ClockStalled, FakeClock, Timer
from objdl.testing._network import DEFAULT_MAX_MESSAGE_SIZE, Envelope, FakeNetwork, Fault, Hold

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ClockStalled",
    "Envelope",
    "FakeCell",
    "FakeClock",
    "FakeNetwork",
    "Fault",
    "Hold",
    "Timer",
]
