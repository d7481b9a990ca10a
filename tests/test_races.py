"""Two races found by reading, each driven to its exact window with hooks and events.

Neither test hopes for a thread switch: each forces the interleaving that lost
work before the fix, and checks what a user would see.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

import objdl._wake as wake_mod
from objdl.cell import Cell
from objdl.downloader import ObjDownloader, _owner
from objdl.message import Message
from tests.conftest import wait_for
from tests.test_downloader import ListProducer, fetch

pytestmark = pytest.mark.timeout(60)


class _OsWithHook:
    """The os module as objdl._wake sees it, with a hook run before each read."""

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

    The hook runs in the I/O thread inside Waker.woken(), right before the pipe is
    read, and makes another thread queue a message there. Before the fix the flag was
    already cleared, so that put wrote a byte the read then swallowed, leaving the flag
    set with an empty pipe: no later put ever wrote the pipe again and the cell sent
    only on its 100 ms poll timeout, for the rest of its life.
    """
    owner, site = cells
    got: list[Any] = []
    site.register_request_cb("ch", "note", lambda m: got.append(m.payload))
    outbox = owner._waker
    armed = threading.Event()
    raced = threading.Event()
    pipe_reads = [0]

    def producer() -> None:
        owner.fire_and_forget("ch", "note", "site-1", Message(payload="in the window"))

    def before_read(fd: int) -> None:
        if fd != outbox.read_fd or threading.get_ident() != outbox.owner_ident:
            return
        pipe_reads[0] += 1
        if armed.is_set():
            armed.clear()
            t = threading.Thread(target=producer)
            t.start()
            t.join(5.0)
            raced.set()

    monkeypatch.setattr(wake_mod, "os", _OsWithHook(before_read))
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


def test_first_transactions_at_once_make_one_served_state(
    cells: tuple[Cell, Cell], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads starting a cell's first transactions at once: both objects download.

    Before the fix each thread built a state (each registering its handler, the second
    replacing the first) and the registry kept the first: the cell served the second
    state's empty table and every ref got "no such ref". The hook holds the first
    thread just after its state registered its handler until the second has built one
    too, and holds the second until the first has put its state in the registry.
    """
    owner, site = cells
    first_built, second_built, first_done = threading.Event(), threading.Event(), threading.Event()
    made: list[Any] = []
    real_init = _owner._OwnerState.__init__

    def init(self: Any, cell: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, cell, *args, **kwargs)  # registers this state's handler on the cell
        made.append(self)
        if threading.current_thread().name == "first":
            first_built.set()
            second_built.wait(1.0)  # after the fix the second waits for us: time out
        else:
            second_built.set()
            first_done.wait(5.0)

    monkeypatch.setattr(_owner._OwnerState, "__init__", init)
    txs: dict[str, str] = {}

    def first() -> None:
        txs["first"] = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)
        first_done.set()

    def second() -> None:
        first_built.wait(5.0)
        txs["second"] = ObjDownloader.new_transaction(owner, ListProducer(), 30.0)

    threads = [threading.Thread(target=f, name=f.__name__) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert set(txs) == {"first", "second"}
    for name, tx in txs.items():
        ref = ObjDownloader.add_download_object(tx, [f"from {name}"])
        c = fetch(site, ref, tries=1)
        assert c.failed is None and c.items == [f"from {name}"]
    assert len(made) == 1, f"{len(made)} owner states were made for one cell"
