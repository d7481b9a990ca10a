"""Awaitable downloads for asyncio programs, with the threaded helpers' options and errors.

How it works: the download itself is the threaded one (the same window, checks,
verification and files), run on a thread of its own beside the loop and talking to
the network through the asyncio cell's blocking face
(:attr:`objdl.aio.Cell.threaded`), so the loop is never blocked by a write or a
digest. The coroutine waits for that thread. Cancelling the task that awaits it
triggers the download's ``abort_signal``: the thread stops within a few tens of
milliseconds, deletes what it wrote (as a threaded abort does), tells the owner the
site cancelled, and only then does the cancellation propagate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from objdl.cell._aio import AsyncCell
from objdl.downloader import Consumer
from objdl.downloader import download_object as _download_object
from objdl.message import Signal
from objdl.objects import download_bytes as _download_bytes
from objdl.objects import download_dict as _download_dict
from objdl.objects import download_file as _download_file

__all__ = ["download_bytes", "download_dict", "download_file", "download_object"]

T = TypeVar("T")
_CANCEL_WAIT = 10.0  # s a cancelled download may take to clean up before we stop waiting


async def download_bytes(cell: AsyncCell, from_fqcn: str, ref_id: str, **kwargs: Any) -> bytearray:
    """As :func:`objdl.objects.download_bytes`, awaitable; raises ``DownloadError``."""
    return await _run(cell, _download_bytes, from_fqcn, ref_id, **kwargs)


async def download_file(
    cell: AsyncCell, from_fqcn: str, ref_id: str, dest: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """As :func:`objdl.objects.download_file`, awaitable (cancelled: nothing left behind)."""
    return await _run(cell, _download_file, from_fqcn, ref_id, dest, **kwargs)


async def download_dict(cell: AsyncCell, from_fqcn: str, ref_id: str, **kwargs: Any) -> dict:
    """As :func:`objdl.objects.download_dict`, awaitable; raises ``DownloadError``."""
    return await _run(cell, _download_dict, from_fqcn, ref_id, **kwargs)


async def download_object(
    from_fqcn: str,
    ref_id: str,
    per_request_timeout: float,
    cell: AsyncCell,
    consumer: Consumer,
    **kwargs: Any,
) -> None:
    """The seed's :func:`objdl.downloader.download_object`, awaitable.

    `consumer`'s callbacks run on the download's thread, not on the loop.
    """

    def call(view: Any, **kw: Any) -> None:
        _download_object(from_fqcn, ref_id, per_request_timeout, view, consumer, **kw)

    await _run(cell, call, **kwargs)


async def _run(cell: AsyncCell, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if not isinstance(cell, AsyncCell):
        raise TypeError(
            f"cell must be an objdl.aio.Cell, got {type(cell).__name__} "
            "(a threaded Cell takes the functions of objdl.objects)"
        )
    abort = kwargs.get("abort_signal")
    if abort is None:
        abort = kwargs["abort_signal"] = Signal()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if done.done():
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def work() -> None:
        value: Any
        try:
            value, ok = fn(cell.threaded, *args, **kwargs), True
        except BaseException as exc:  # handed to the awaiting task, raised there
            value, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, ok, value)

    thread = threading.Thread(target=work, name=f"objdl-{cell.fqcn}-download", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        abort.trigger()
        with contextlib.suppress(BaseException):  # its DownloadError: we were cancelled
            await asyncio.wait_for(asyncio.shield(done), _CANCEL_WAIT)
        raise
