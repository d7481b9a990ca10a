"""The blocking face of an asyncio cell, for the code that runs on threads beside its loop.

The owner's tables, producers and the site's download logic are threaded code written
against :class:`~objdl.cell.CellLike`. An :class:`~objdl.cell._aio.AsyncCell` serves
them through a :class:`ThreadView`: the same core, the same socket (still owned by the
loop), with blocking calls that any thread *but the loop's* may make. Requests are
submitted to the core from the calling thread (it is thread-safe, and wakes the loop
with ``call_soon_threadsafe``); replies resolve on the loop; a blocking call waits on
the request's lock. Handlers registered through it are plain functions and run on the
cell's handler threads, so an owner's ``produce`` never blocks the loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from objdl.cell._handlers import RequestCallback
from objdl.cell._pending import OnDone, PendingRequest
from objdl.errors import CellError
from objdl.message import Message, MessageHeaderKey, ReturnCode, Signal

if TYPE_CHECKING:
    from objdl.cell._aio import AsyncCell

__all__ = ["ThreadView"]

_H = MessageHeaderKey
_ABORT_POLL = 0.02


class ThreadView:
    """An :class:`~objdl.cell._aio.AsyncCell` as a blocking :class:`~objdl.cell.CellLike`."""

    def __init__(self, cell: AsyncCell) -> None:
        self._cell = cell
        self.connected = threading.Event()  # mirrors the cell's registration
        self.clock = cell.clock

    @property
    def fqcn(self) -> str:
        return self._cell.fqcn

    def get_fqcn(self) -> str:
        return self._cell.fqcn

    @property
    def is_connected(self) -> bool:
        return self._cell.is_connected

    def wait_connected(self, timeout: float) -> bool:
        self._not_on_loop("wait_connected")
        return self._cell.is_connected or (self.connected.wait(timeout) and self.is_connected)

    def register_request_cb(
        self, channel: str, topic: str, cb: RequestCallback, *args: Any, **kwargs: Any
    ) -> None:
        self._cell.register_request_cb(channel, topic, cb, *args, **kwargs)

    def add_stop_callback(self, cb: Callable[[], None]) -> None:
        self._cell.add_stop_callback(cb)

    # The direct links: an owner's tables offer the cell's data socket through these,
    # a site's download window opens the link offered (any thread may; the loop makes it).

    def link_offer(self, peer: str) -> dict[str, Any] | None:
        """As :meth:`objdl.cell.Cell.link_offer`."""
        return self._cell.link_offer(peer)

    def open_link(
        self, peer: str, offer: Any, on_ready: Callable[[bool], None] | None = None
    ) -> str:
        """As :meth:`objdl.cell.Cell.open_link` (`on_ready` runs on the loop)."""
        return self._cell.open_link(peer, offer, on_ready)

    def link_state(self, peer: str) -> str:
        """As :meth:`objdl.cell.Cell.link_state`."""
        return self._cell.link_state(peer)

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
        """As :meth:`objdl.cell.Cell.request_async` (`on_done` runs on the loop)."""
        return self._submit(
            channel, topic, [target], request, timeout, secure, done_queue, on_done
        )[0]

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
        """As :meth:`objdl.cell.Cell.send_request`; never on the loop's thread."""
        self._not_on_loop("send_request")
        [p] = self._submit(channel, topic, [target], request, timeout, secure, None, None)
        end = time.monotonic() + timeout
        try:
            while p.reply is None:
                left = end - time.monotonic()
                if left <= 0 or (abort_signal is not None and abort_signal.triggered):
                    break
                p.wait(min(left, _ABORT_POLL) if abort_signal is not None else left)
        finally:
            p.cancel()
        aborted = abort_signal is not None and abort_signal.triggered
        core = self._cell._core
        return core.collect([p], timeout, aborted, optional, channel, topic)[target]

    def fire_and_forget(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        message: Message,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, str]:
        """As :meth:`objdl.cell.Cell.fire_and_forget` (plaintext, or to known sessions)."""
        cell, core = self._cell, self._cell._core
        tlist = cell._check_send(channel, topic, targets, message, secure)
        if not core.registered:
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        failed: dict[str, str] = {}
        if secure:
            e2e = cell._conf.e2e
            assert e2e is not None
            for t in tlist:
                if not e2e.knows_session(t):
                    self._not_on_loop("a secure fire_and_forget to a new peer")
                    rc = self.send_request("objdl__e2e", t, "hello", Message(), 5.0, True, optional)
                    if rc.get_header(_H.RETURN_CODE) != ReturnCode.OK:
                        failed[t] = str(rc.get_header(_H.RETURN_CODE))
            tlist = [t for t in tlist if t not in failed]
        core.fire(channel, topic, tlist, message, secure)
        return {**dict.fromkeys(tlist, ReturnCode.OK), **failed}

    def _submit(
        self,
        channel: str,
        topic: str,
        targets: list[str],
        request: Message,
        timeout: float,
        secure: bool,
        done_queue: queue.SimpleQueue[Any] | None,
        on_done: OnDone | None,
    ) -> list[PendingRequest]:
        tlist = self._cell._check_send(channel, topic, targets, request, secure)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return self._cell._core.submit(
            channel,
            topic,
            tlist,
            request,
            time.monotonic() + timeout,
            secure,
            done_queue,
            on_done,
        )

    def _not_on_loop(self, what: str) -> None:
        if threading.get_ident() == self._cell._loop_ident:
            raise CellError(
                f"cell {self.fqcn}: {what} would block the event loop; await the "
                "objdl.aio functions (objdl.aio.download_bytes...) instead"
            )
