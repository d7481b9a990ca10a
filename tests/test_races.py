"""Two races found by reading, each driven to its exact window with hooks and events.

Neither test hopes for a thread switch: each forces the interleaving that lost
work before the fix, and checks what a user would see.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

import objdl.cell._io as cell_io
from objdl.cell import Cell
from objdl.message import Message
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)


class _OsWithHook:
    """The os module as objdl.cell._io sees it, with a hook run before each read."""

    def __init__(self, before_read: Any) -> None:
        self._before_read = before_read

    def read(self, fd: int, n: int) -> bytes:
        self._before_read(fd)
        return os.read(fd, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_wake_between_flag_and_pipe_is_not_lost(
    cells: tuple[Cell, Cell], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put() landing while the I/O thread handles the pipe still wakes it later.

    The hook runs in the I/O thread inside Outbox.woken(), right before the pipe is
    read, and makes another thread queue a message there. Before the fix the flag was
    already cleared, so that put wrote a byte the read then swallowed, leaving the flag
    set with an empty pipe: no later put ever wrote the pipe again and the cell sent
    only on its 100 ms poll timeout, for the rest of its life.
    """
    owner, site = cells
    got: list[Any] = []
    site.register_request_cb("ch", "note", lambda m: got.append(m.payload))
    outbox = owner._outbox
    armed = threading.Event()
    raced = threading.Event()
    pipe_reads = [0]

    def producer() -> None:
        owner.fire_and_forget("ch", "note", "site-1", Message(payload="in the window"))

    def before_read(fd: int) -> None:
        if fd != outbox.read_fd or threading.get_ident() != outbox.io_ident:
            return
        pipe_reads[0] += 1
        if armed.is_set():
            armed.clear()
            t = threading.Thread(target=producer)
            t.start()
            t.join(5.0)
            raced.set()

    monkeypatch.setattr(cell_io, "os", _OsWithHook(before_read))
    armed.set()
    owner.fire_and_forget("ch", "note", "site-1", Message(payload="opens the window"))
    assert raced.wait(5.0), "the I/O thread never read its pipe"
    wait_for(lambda: len(got) == 2)
    # Every later put must wake the I/O thread through the pipe, not its poll timeout.
    for i in range(3):
        before = pipe_reads[0]
        owner.fire_and_forget("ch", "note", "site-1", Message(payload=i))
        wait_for(lambda before=before: pipe_reads[0] > before, timeout=3.0)
    wait_for(lambda: len(got) == 5)
