"""Shared fixtures: a real broker on loopback with a port chosen at run time, and the
fake network of objdl.testing for tests that need only request/reply semantics."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import xxhash


def reference_digest(algo: str, data: bytes) -> str:
    """`data`'s digest computed straight from hashlib or xxhash, not through objdl."""
    if algo == "xxh3_128":
        return xxhash.xxh3_128(data).hexdigest()
    return hashlib.new(algo, data).hexdigest()


def wait_for(cond: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> object:
    """Poll `cond` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {cond}")
        time.sleep(interval)


@pytest.fixture
def broker() -> Iterator[object]:
    """A started broker bound to 127.0.0.1 on a free port; `broker.url` is its address."""
    from broker import Broker

    b = Broker("tcp://127.0.0.1:*")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def make_cell(broker: Any) -> Iterator[Callable[..., Any]]:
    """Start cells on `broker` (``make_cell(name, **Cell kwargs)``); all stopped after."""
    from objdl.cell import Cell

    cells: list[Cell] = []

    def make(name: str, **kw: Any) -> Cell:
        c = Cell(name, broker.url, **kw)
        c.start()
        cells.append(c)
        return c

    yield make
    for c in cells:
        c.stop()


@pytest.fixture
def cells(broker: Any) -> Iterator[tuple[Any, Any]]:
    """An owner cell ("server") and a site cell ("site-1"), started; downloader state
    is shut down after the test."""
    from objdl.cell import Cell
    from objdl.downloader import ObjDownloader

    owner, site = Cell("server", broker.url), Cell("site-1", broker.url)
    owner.start()
    site.start()
    try:
        yield owner, site
    finally:
        ObjDownloader.shutdown()
        site.stop()
        owner.stop()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port that is held (so nothing else takes it) but where no broker listens."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


@pytest.fixture
def fake_net() -> Iterator[Any]:
    """A fake network whose clock jumps ahead whenever everything on it waits; its cells
    are stopped and the downloader state shut down after the test."""
    from objdl.downloader import ObjDownloader
    from objdl.testing import FakeClock, FakeNetwork

    net = FakeNetwork(FakeClock(autojump=True))
    try:
        yield net
    finally:
        ObjDownloader.shutdown()
        net.close()


@pytest.fixture
def fake_cells(fake_net: Any) -> tuple[Any, Any]:
    """As `cells`, on the fake network: "server" and "site-1", started."""
    owner, site = fake_net.cell("server"), fake_net.cell("site-1")
    owner.start()
    site.start()
    return owner, site


@pytest.fixture(params=["broker", "fake"])
def any_cells(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """`cells` (through a real broker), then `fake_cells`: for tests run on both."""
    cells: tuple[Any, Any] = request.getfixturevalue(
        "cells" if request.param == "broker" else "fake_cells"
    )
    return cells


@pytest.fixture
def proxies() -> Iterator[Callable[[int], Any]]:
    """``proxies(port)``: a :class:`tests._netproxy.Proxy` in front of `port`; all closed after."""
    from tests._netproxy import Proxy

    made: list[Proxy] = []

    def make(port: int) -> Proxy:
        p = Proxy(port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
