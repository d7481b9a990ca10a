"""What the layers above a cell need of it: :class:`CellLike`, a structural type.

The downloader and the ready objects talk to a cell only through these methods, so
anything that has them serves: the real :class:`~objdl.cell.Cell`, the in-process
fake of :mod:`objdl.testing`, a future asyncio shell. They are checked with
:func:`check_cell`, which names what a wrong argument lacks, instead of
``isinstance(cell, Cell)``.

A cell may also have a ``clock`` attribute: a callable returning the current time in
seconds, the one its request deadlines are measured on. :func:`clock_of` reads it,
defaulting to :func:`time.monotonic` (what the real cell uses); a fake network's cells
return its controllable clock, so the layers above keep time by the test's clock. It
is not a protocol member, so objects without it still pass as cells.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from objdl.cell._handlers import RequestCallback
from objdl.cell._pending import OnDone, PendingRequest
from objdl.message import Message, Signal

__all__ = ["CellLike", "check_cell", "clock_of"]


@runtime_checkable
class CellLike(Protocol):
    """The part of a cell the downloader and the ready objects use.

    Semantics, as :class:`~objdl.cell.Cell` defines them: remote trouble comes back as
    a reply whose ``RETURN_CODE`` header says what happened (``timeout``,
    ``target_unreachable``, ``comm_error``, ``process_exception``, ``invalid_request``,
    ``service_unavailable``, ``msg_too_big``, ``abort_run``, ``authentication_error``);
    misuse raises. A request handler sees the broker-stamped ``ORIGIN`` header and a
    ``SECURE`` header that is True only for a request that arrived sealed and was
    opened by the receiving cell.

    ``broadcast_request`` and ``list_cells`` are left out on purpose: nothing above the
    cell needs them, and every member is one more thing each shell must provide.
    """

    @property
    def fqcn(self) -> str:
        """This cell's name."""
        ...

    def get_fqcn(self) -> str:
        """This cell's name (the seed's spelling)."""
        ...

    @property
    def is_connected(self) -> bool:
        """True while the broker (or network) has this cell registered."""
        ...

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds to be (re)connected; True if connected."""
        ...

    def register_request_cb(
        self, channel: str, topic: str, cb: RequestCallback, *args: Any, **kwargs: Any
    ) -> None:
        """Serve requests on (channel, topic) with ``cb(request, *args, **kwargs)``."""
        ...

    def send_request(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        secure: bool = False,
        optional: bool = False,
        abort_signal: Signal | None = None,
    ) -> Message:
        """Send `request` to `target` and return its reply (never raises for remote trouble)."""
        ...

    def request_async(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        done_queue: queue.SimpleQueue[Any] | None = None,
        secure: bool = False,
        optional: bool = False,
        on_done: OnDone | None = None,
    ) -> PendingRequest:
        """Send `request` and return at once; the reply lands on the pending request,
        then `on_done` is called with it and it is put on `done_queue`. Nothing
        resolves it at its deadline: ``result()`` does."""
        ...

    def fire_and_forget(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        message: Message,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, str]:
        """Send `message` without waiting; a return code per target."""
        ...

    def add_stop_callback(self, cb: Callable[[], None]) -> None:
        """Call `cb()` once the cell has stopped."""
        ...


_MEMBERS = (
    "fqcn",
    "get_fqcn",
    "is_connected",
    "wait_connected",
    "register_request_cb",
    "send_request",
    "request_async",
    "fire_and_forget",
    "add_stop_callback",
)


def check_cell(cell: object, name: str = "cell") -> CellLike:
    """The cell to use for `cell`; TypeError, naming what is missing, if it is none.

    A cell with :class:`CellLike`'s members is used as it is; an asyncio cell
    (:class:`objdl.aio.Cell`) through its blocking face, its ``threaded`` attribute
    (so threaded code may serve and download with it from threads beside its loop).

    Args:
        cell: the argument to check.
        name: the argument's name, for the message.
    """
    view = getattr(cell, "threaded", None)
    if view is not None and isinstance(view, CellLike):
        return view
    if isinstance(cell, CellLike):
        return cell
    missing = [m for m in _MEMBERS if not hasattr(cell, m)]
    raise TypeError(
        f"{name} must be a Cell (objdl.cell.Cell, a cell of objdl.testing.FakeNetwork, or "
        f"anything with the members of objdl.cell.CellLike), got a {type(cell).__name__}, "
        f"which lacks {', '.join(missing)}"
    )


def clock_of(cell: object) -> Callable[[], float]:
    """The clock `cell` measures its deadlines on: its ``clock`` attribute, if it has a
    callable one, else :func:`time.monotonic`."""
    clock = getattr(cell, "clock", None)
    return clock if callable(clock) else time.monotonic
