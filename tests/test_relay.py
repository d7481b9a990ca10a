"""Relay brokers on loopback: real brokers in a tree, real cells, and a hand-made relay.

Every rule of docs/PROTOCOL.md "Relay brokers" that holds on one broker is shown
here across a tree: routing down and up, nesting, names refused outside a relay's
subtree and under a relay's prefix at its parent, origins that a relay cannot forge,
unreachable at once, LIST of the whole tree, a parent restart, CURVE on the link.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import Broker
from broker._relay import KIND_ADD, KIND_FWD, KIND_RREG
from objdl import wire
from objdl.cell import Cell
from objdl.cli import main as objdl_main
from objdl.downloader import ObjDownloader
from objdl.errors import CellError, NameTakenError
from objdl.keys import main as keys_main
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import download_bytes, offer_bytes
from objdl.security import KeyPair, KeyPolicy
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"
RC, ORIGIN = MessageHeaderKey.RETURN_CODE, MessageHeaderKey.ORIGIN
REPO = Path(__file__).resolve().parent.parent

MakeBroker = Callable[..., Broker]
MakeCell = Callable[..., Cell]


@pytest.fixture
def brokers() -> Iterator[MakeBroker]:
    """Start brokers (``parent=`` and ``prefix=`` make a relay, started once registered)."""
    made: list[Broker] = []

    def make(parent: Broker | None = None, prefix: str | None = None, **kw: Any) -> Broker:
        wait = kw.pop("wait", True)
        if parent is not None:
            kw.update(upstream=parent.url, prefix=prefix)
        b = Broker(kw.pop("bind", ANY), **kw)
        b.start()
        made.append(b)
        if parent is not None and wait:
            wait_for(lambda: b.upstream_state() == "registered")
        return b

    yield make
    for b in reversed(made):
        b.stop()


def echo(request: Message, me: str) -> Message:
    return Message(payload={"me": me, "origin": request.get_header(ORIGIN), "was": request.payload})


@pytest.fixture
def cells() -> Iterator[MakeCell]:
    """Start cells that answer ("t", "echo") with their name and the request's origin."""
    made: list[Cell] = []

    def make(name: str, broker: Broker, **kw: Any) -> Cell:
        c = Cell(name, broker.url, **kw)
        c.register_request_cb("t", "echo", echo, me=name)
        c.start()
        made.append(c)
        return c

    yield make
    ObjDownloader.shutdown()
    for c in reversed(made):
        c.stop()


def ask(cell: Cell, target: str, timeout: float = 5.0) -> Message:
    return cell.send_request("t", target, "echo", Message(payload="hi"), timeout)


def assert_reaches(cell: Cell, target: str) -> None:
    """`cell` reaches `target`, which sees the request come from `cell`'s own name."""
    reply = ask(cell, target)
    assert reply.get_header(RC) == ReturnCode.OK, (cell.fqcn, target, reply.headers)
    assert reply.payload == {"me": target, "origin": cell.fqcn, "was": "hi"}
    assert reply.get_header(ORIGIN) == target


def known_everywhere(*brokers: Broker, names: tuple[str, ...]) -> None:
    for b in brokers:
        wait_for(lambda b=b: set(names) <= set(b.tree_cells()))


@pytest.fixture
def tree(brokers: MakeBroker, cells: MakeCell) -> dict[str, Any]:
    """root (cell server) -> site-1 (cell site-1.a) -> site-1.x (cell site-1.x.c);
    root -> site-2 (cell site-2.b)."""
    root = brokers()
    r1 = brokers(root, "site-1")
    r1x = brokers(r1, "site-1.x")
    r2 = brokers(root, "site-2")
    c = {
        "server": cells("server", root),
        "site-1.a": cells("site-1.a", r1),
        "site-1.x.c": cells("site-1.x.c", r1x),
        "site-2.b": cells("site-2.b", r2),
    }
    known_everywhere(root, names=tuple(c))
    known_everywhere(r1, names=("site-1.a", "site-1.x.c"))
    return {"root": root, "r1": r1, "r1x": r1x, "r2": r2, **c}


# ---------------------------------------------------------------- routing


def test_requests_go_down_and_up_through_a_relay(brokers: MakeBroker, cells: MakeCell) -> None:
    root = brokers()
    relay = brokers(root, "site-1")
    server, site = cells("server", root), cells("site-1.a", relay)
    wait_for(lambda: "site-1.a" in root.tree_cells())
    assert_reaches(server, "site-1.a")  # down
    assert_reaches(site, "server")  # up
    assert root.cells() == ["server"] and relay.cells() == ["site-1.a"]
    links = root.relay_links()
    assert [(k.direction, k.prefix, k.up, k.names) for k in links] == [("down", "site-1", True, 1)]
    up = relay.relay_links()[0]
    assert (up.direction, up.prefix, up.url, up.up) == ("up", "site-1", root.url, True)


def test_relays_nest(tree: dict[str, Any]) -> None:
    for a in ("server", "site-1.a", "site-1.x.c", "site-2.b"):
        for b in ("server", "site-1.a", "site-1.x.c", "site-2.b"):
            if a != b:
                assert_reaches(tree[a], b)
    assert tree["root"].stats()["drop_forged_origin"] == 0


def test_list_at_any_broker_lists_the_whole_tree(tree: dict[str, Any]) -> None:
    everyone = ["server", "site-1.a", "site-1.x.c", "site-2.b"]
    for name in everyone:
        assert tree[name].list_cells() == everyone, name
        assert tree[name].list_cells("site-1") == ["site-1.a", "site-1.x.c"], name
        assert tree[name].list_cells("site-2.b") == ["site-2.b"], name
    assert tree["r1x"].stats()["list_forwarded"] >= 3  # asked its parent...
    before = tree["r1x"].stats()["list_forwarded"]
    assert tree["site-1.x.c"].list_cells("site-1.x") == ["site-1.x.c"]
    assert tree["r1x"].stats()["list_forwarded"] == before  # ...but not for its own subtree


def test_a_target_connected_nowhere_is_unreachable_at_once(tree: dict[str, Any]) -> None:
    for asker, target in (
        ("site-1.x.c", "nobody"),  # up two brokers, then NACKed back down
        ("server", "site-1.x.nobody"),  # the root knows the relay does not have it
        ("site-1.a", "site-1.nobody"),  # the relay itself knows
        ("site-2.b", "site-1.x.nobody"),
    ):
        start = time.monotonic()
        reply = ask(tree[asker], target, timeout=20.0)
        assert reply.get_header(RC) == ReturnCode.TARGET_UNREACHABLE, (asker, target)
        assert time.monotonic() - start < 2.0, (asker, target)


# ---------------------------------------------------------------- names


def test_a_relay_refuses_names_outside_its_subtree(brokers: MakeBroker, cells: MakeCell) -> None:
    root = brokers()
    relay = brokers(root, "site-1")
    for name in ("server", "site-10", "site-2.a"):
        with pytest.raises(CellError, match="outside subtree: this broker is the relay for"):
            cells(name, relay, start_timeout=5.0)
    cells("site-1", relay)  # the prefix itself, and names under it, are its own
    cells("site-1.job-7", relay)
    assert relay.stats()["reg_err_outside"] == 3


def test_duplicate_names_are_refused_across_the_tree(brokers: MakeBroker, cells: MakeCell) -> None:
    root = brokers()
    relay = brokers(root, "site-1")
    cells("site-1.a", relay)
    cells("site-2.x", root)
    with pytest.raises(NameTakenError):
        cells("site-1.a", relay, start_timeout=5.0)
    # At the parent, no name under a relay's prefix may register, live or not:
    for name in ("site-1.a", "site-1", "site-1.new"):
        with pytest.raises(CellError, match=r"relayed: .* which a relay broker holds"):
            cells(name, root, start_timeout=5.0)
    # A second relay for the same subtree, or one that overlaps a cell or a relay:
    twin = brokers(root, "site-1", wait=False)
    inner = brokers(root, "site-1.a", wait=False)
    over = brokers(root, "site-2", wait=False)
    for b in (twin, inner, over):
        wait_for(lambda b=b: b.upstream_state() == "refused")
    assert [k.prefix for k in root.relay_links()] == ["site-1"]
    assert root.stats()["relay_reg_err"] >= 3
    assert root.tree_cells() == ["site-1.a", "site-2.x"]


# ---------------------------------------------------------------- a hand-made relay


RawRelay = Callable[[str, bytes], zmq.Socket[Any]]


@pytest.fixture
def raw_relay() -> Iterator[RawRelay]:
    """DEALERs that register a prefix at a broker by hand (docs/PROTOCOL.md), closed after."""
    ctx: zmq.Context[Any] = zmq.Context()
    socks: list[zmq.Socket[Any]] = []

    def make(url: str, prefix: bytes) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.DEALER)
        socks.append(sock)
        sock.linger = 0
        sock.connect(url)
        sock.send_multipart([KIND_RREG, wire.PROTOCOL_VERSION, prefix])
        assert sock.poll(5000), "no answer to RREG"
        assert sock.recv_multipart() == [wire.KIND_REG_OK, prefix]
        return sock

    try:
        yield make
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def test_a_relay_cannot_forge_an_origin_outside_its_prefix(
    brokers: MakeBroker, cells: MakeCell, raw_relay: RawRelay
) -> None:
    root = brokers()
    relay = brokers(root, "site-1")
    server = cells("server", root)
    cells("site-1.a", relay)
    seen: list[str] = []
    server.register_request_cb("t", "note", lambda m: seen.append(m.get_header(ORIGIN)))
    evil = raw_relay(root.url, b"site-9")
    evil.send_multipart([KIND_ADD, b"site-9.evil\nserver\nsite-1.a"])  # two not its own
    note = wire.encode(Message({"msg_type": "fire", "channel": "t", "topic": "note"}, "x"))
    for forged in (b"site-1.a", b"server", b"site-90.x"):
        evil.send_multipart([KIND_FWD, b"server", forged, *note])
    evil.send_multipart([KIND_FWD, b"server", b"site-9.evil", *note])  # its own: delivered
    wait_for(lambda: seen == ["site-9.evil"])
    stats = root.stats()
    assert stats["drop_forged_origin"] == 3 and stats["drop_outside"] == 1
    assert root.tree_cells() == ["server", "site-1.a", "site-9.evil"]
    assert not evil.poll(200) or evil.recv_multipart()[0] == wire.KIND_HB  # nothing bounced
    assert seen == ["site-9.evil"]


def test_a_silent_relay_link_is_forgotten_with_its_names(
    brokers: MakeBroker, cells: MakeCell, raw_relay: RawRelay
) -> None:
    root = brokers(heartbeat_interval=0.1, cell_timeout=0.5)
    server = cells("server", root, heartbeat_interval=0.1, broker_timeout=1.0)
    hung = raw_relay(root.url, b"site-9")
    hung.send_multipart([KIND_ADD, b"site-9.a"])
    wait_for(lambda: "site-9.a" in root.tree_cells())
    wait_for(lambda: root.relay_links() == [], timeout=5.0)  # it never says a word
    assert root.stats()["relay_lost"] == 1
    assert ask(server, "site-9.a").get_header(RC) == ReturnCode.TARGET_UNREACHABLE


# ---------------------------------------------------------------- a parent that goes away


def test_a_relay_keeps_local_traffic_while_its_parent_is_down_and_registers_again(
    brokers: MakeBroker, cells: MakeCell
) -> None:
    root = brokers()
    relay = brokers(root, "site-1", upstream_timeout=1.0)
    server = cells("server", root)
    a, b = cells("site-1.a", relay), cells("site-1.b", relay)
    known_everywhere(root, names=("server", "site-1.a", "site-1.b"))
    root.stop()
    wait_for(lambda: relay.upstream_state() == "connecting", timeout=5.0)
    assert relay.stats()["upstream_lost"] == 1
    assert_reaches(a, "site-1.b")  # local traffic goes on
    assert_reaches(b, "site-1.a")
    start = time.monotonic()
    assert ask(a, "server", timeout=20.0).get_header(RC) == ReturnCode.TARGET_UNREACHABLE
    assert time.monotonic() - start < 2.0
    assert a.list_cells() == ["site-1.a", "site-1.b"]  # what the relay knows, at once
    root.start()  # the same address, no cells: the relay registers its subtree again
    wait_for(lambda: {"site-1.a", "site-1.b"} <= set(root.tree_cells()), timeout=10.0)
    # "server" registered again at the restarted root and took the REG_OK (both sides)
    wait_for(lambda: "server" in root.cells() and server.is_connected, timeout=10.0)
    assert_reaches(server, "site-1.a")
    assert_reaches(b, "server")
    assert relay.stats()["upstream_registered"] >= 2


def test_a_relay_that_stops_leaves_its_parent_at_once(brokers: MakeBroker, cells: MakeCell) -> None:
    root = brokers()
    relay = brokers(root, "site-1")
    server = cells("server", root)
    site = Cell("site-1.a", relay.url)
    site.start()
    try:
        wait_for(lambda: "site-1.a" in root.tree_cells())
    finally:
        site.stop()
    relay.stop()
    wait_for(lambda: root.relay_links() == [], timeout=2.0)  # BYE, not the cell timeout
    assert root.stats()["expired"] == 0 and root.stats()["relay_lost"] == 1
    assert ask(server, "site-1.a").get_header(RC) == ReturnCode.TARGET_UNREACHABLE
    relay.start()  # started again: the same address, registered afresh
    wait_for(lambda: relay.upstream_state() == "registered")
    back = cells("site-1.a", relay)
    wait_for(lambda: "site-1.a" in root.tree_cells())
    assert_reaches(server, "site-1.a")
    assert_reaches(back, "server")


def test_the_metrics_of_a_root_and_its_relay_show_the_link(
    brokers: MakeBroker, cells: MakeCell, raw_relay: RawRelay
) -> None:
    pytest.importorskip("prometheus_client")
    from tests.test_metrics import scrape, value

    root = brokers(metrics="127.0.0.1:0")
    relay = brokers(root, "site-1", metrics="127.0.0.1:0")
    cells("site-1.a", relay)
    wait_for(lambda: "site-1.a" in root.tree_cells())
    evil = raw_relay(root.url, b"site-9")
    evil.send_multipart([KIND_FWD, b"site-1.a", b"server", b"\x80"])  # not its own name
    wait_for(lambda: root.stats()["drop_forged_origin"] == 1)
    at_root, at_relay = scrape(root), scrape(relay)
    down = {"direction": "down", "prefix": "site-1", "url": ""}
    assert value(at_root, "objdl_broker_relay_link_up", **down) == 1
    assert value(at_root, "objdl_broker_relay_links", direction="down", state="connected") == 2
    assert value(at_root, "objdl_broker_drops_total", cause="forged_origin") == 1
    up = {"direction": "up", "prefix": "site-1", "url": root.url}
    assert value(at_relay, "objdl_broker_relay_link_up", **up) == 1
    assert value(at_relay, "objdl_broker_cells") == 1  # its own cells; the root's: 0
    assert value(at_root, "objdl_broker_cells") == 0
    info = next(labels for (name, labels) in at_relay if name == "objdl_broker_info")
    assert dict(info)["role"] == "relay"


# ---------------------------------------------------------------- objects across the tree


def test_a_download_from_an_owner_at_the_root_to_cells_under_relays(
    tree: dict[str, Any],
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    ref = offer_bytes(tree["server"], data, chunk_size=512 * 1024)
    results: dict[str, Any] = {}

    def fetch(name: str) -> None:
        results[name] = download_bytes(tree[name], "server", ref, per_request_timeout=10.0)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in ("site-1.a", "site-1.x.c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    want = hashlib.sha256(data).hexdigest()
    for name in ("site-1.a", "site-1.x.c"):
        assert hashlib.sha256(results[name]).hexdigest() == want, name
    assert tree["r1"].stats()["drop_busy"] == 0 and tree["root"].stats()["errors"] == 0


class CutProxy:
    """A TCP proxy between a relay and its parent that can cut the link and restore it,
    and caps each direction at `rate` bytes/s (so a download lasts long enough to cut)."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate = rate
        self.port = 0
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listen()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(8)
        srv.settimeout(0.05)
        self.port = srv.getsockname()[1]
        t = threading.Thread(target=self._accept, args=(srv,), daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, srv: socket.socket) -> None:
        with srv:
            while not (self._stop.is_set() or self._cut.is_set()):
                try:
                    down, _ = srv.accept()
                except TimeoutError:
                    continue
                up = socket.create_connection(self.upstream, timeout=5.0)
                with self._lock:
                    self._conns += [down, up]
                for a, b in ((down, up), (up, down)):
                    t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.05)
        try:
            while not (self._stop.is_set() or self._cut.is_set()):
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
                time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every connection and stop listening: the relay's reconnects are refused."""
        self._cut.set()
        self._join()

    def restore(self) -> None:
        """Listen again on the same port."""
        self._cut.clear()
        self._listen()

    def close(self) -> None:
        self._stop.set()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(5.0)
        self._threads = []
        with self._lock:
            for s in self._conns:
                s.close()
            self._conns = []


@pytest.fixture
def proxy(brokers: MakeBroker) -> Iterator[Callable[[Broker], CutProxy]]:
    made: list[CutProxy] = []

    def make(parent: Broker) -> CutProxy:
        made.append(CutProxy(int(parent.url.rsplit(":", 1)[1]), rate=8 * 1024 * 1024))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_a_download_goes_on_when_the_relays_link_is_cut_and_restored(
    brokers: MakeBroker, cells: MakeCell, proxy: Callable[[Broker], CutProxy]
) -> None:
    root = brokers()
    link = proxy(root)
    relay = Broker(ANY, upstream=link.url, prefix="site-1", upstream_timeout=1.0)
    with relay:
        wait_for(lambda: relay.upstream_state() == "registered")
        server, site = cells("server", root), cells("site-1.a", relay)
        wait_for(lambda: "site-1.a" in root.tree_cells())
        data = os.urandom(8 * 1024 * 1024)
        ref = offer_bytes(server, data, chunk_size=256 * 1024)
        got: list[Any] = []
        fetch = threading.Thread(
            target=lambda: got.append(download_bytes(site, "server", ref, per_request_timeout=2.0))
        )
        fetch.start()
        try:
            wait_for(lambda: server.stats["received"] >= 4)  # under way
            link.cut()
            wait_for(lambda: relay.upstream_state() != "registered", timeout=5.0)
            assert not got, "the download ended before the cut: make it longer"
            link.restore()
            wait_for(lambda: "site-1.a" in root.tree_cells(), timeout=10.0)
        finally:
            fetch.join(30.0)
        assert got and hashlib.sha256(got[0]).digest() == hashlib.sha256(data).digest()
        assert relay.stats()["upstream_lost"] >= 1 and relay.stats()["upstream_registered"] >= 2


# ---------------------------------------------------------------- CURVE on the link


def test_with_curve_a_relay_authenticates_with_its_own_key_bound_to_its_subtree(
    brokers: MakeBroker, cells: MakeCell
) -> None:
    broker_keys, relay_key, narrow_key, server_key, stranger_key = (
        KeyPair(*zmq.curve_keypair()) for _ in range(5)
    )
    policy = KeyPolicy(
        {
            relay_key.public: ["site-1", "site-1.*"],
            narrow_key.public: ["site-2.x"],  # may not hold all of site-2
            server_key.public: ["server"],
        }
    )
    root = brokers(curve_keys=broker_keys, allowed_keys=policy)
    relay = brokers(root, "site-1", upstream_key=relay_key, upstream_broker_key=broker_keys.public)
    narrow = brokers(
        root, "site-2", upstream_key=narrow_key, upstream_broker_key=broker_keys.public, wait=False
    )
    keyless = brokers(root, "site-3", wait=False)  # no key: no CURVE handshake at all
    stranger = brokers(  # a key the parent does not know: ZAP turns it away
        root,
        "site-4",
        upstream_key=stranger_key,
        upstream_broker_key=broker_keys.public,
        wait=False,
    )
    server = cells("server", root, curve_keys=server_key, broker_public_key=broker_keys.public)
    site = cells("site-1.a", relay)  # the relay's own cells connect in plain
    wait_for(lambda: "site-1.a" in root.tree_cells())
    assert_reaches(server, "site-1.a")
    assert_reaches(site, "server")
    wait_for(lambda: narrow.upstream_state() == "refused")
    wait_for(lambda: root.stats()["zap_denied"] >= 1)
    assert keyless.upstream_state() == stranger.upstream_state() == "connecting"
    assert [k.prefix for k in root.relay_links()] == ["site-1"]


def _read_until(proc: subprocess.Popen[bytes], want: str, timeout: float) -> list[str]:
    """`proc`'s stdout lines up to the first one that starts with `want`."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not any(line.startswith(want) for line in buf.decode().splitlines()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {want!r} from the relay within {timeout}s: {buf!r}")
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"relay exited early: {buf!r}")
                buf += chunk
    return buf.decode().splitlines()


def test_relay_command_line_with_curve_key_files(
    brokers: MakeBroker, cells: MakeCell, tmp_path: Path
) -> None:
    for name in ("root", "site-1", "server"):
        assert keys_main(["new", name, "--dir", str(tmp_path / name)]) == 0
        if name != "root":
            pub = tmp_path / name / f"{name}.key"
            allow = ["allow", name, "--dir", str(tmp_path / "allowed"), "--pub", str(pub)]
            assert keys_main(allow) == 0
    root = brokers(
        curve_keys=tmp_path / "root" / "root.key_secret", allowed_keys=tmp_path / "allowed"
    )
    argv = [
        sys.executable, "-m", "broker", "--bind", ANY, "--upstream", root.url,
        "--prefix", "site-1", "--upstream-key", str(tmp_path / "site-1" / "site-1.key_secret"),
        "--upstream-broker-key", str(tmp_path / "root" / "root.key"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as p:
        try:
            lines = _read_until(p, "objdl broker relays", 20.0)
            assert lines[-1] == f"objdl broker relays 'site-1' for {root.url}"
            url = lines[0].rsplit(" ", 1)[1]
            wait_for(lambda: [k.prefix for k in root.relay_links()] == ["site-1"], timeout=10.0)
            server = cells(
                "server",
                root,
                curve_keys=tmp_path / "server" / "server.key_secret",
                broker_public_key=tmp_path / "root" / "root.key",
            )
            site = Cell("site-1.a", url)
            site.register_request_cb("t", "echo", echo, me="site-1.a")
            with site:
                wait_for(lambda: "site-1.a" in root.tree_cells())
                assert_reaches(server, "site-1.a")
                assert_reaches(site, "server")
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def test_objdl_broker_takes_the_relay_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert objdl_main(["broker", "--upstream", "tcp://127.0.0.1:9"]) == 2
    assert "upstream and prefix go together" in capsys.readouterr().err
    assert objdl_main(["broker", "--upstream", "tcp://127.0.0.1:9", "--prefix", "a..b"]) == 2
    assert "invalid cell name" in capsys.readouterr().err
    assert objdl_main(["broker", "--upstream-key", "x.key_secret"]) == 2
    assert "upstream_key and upstream_broker_key go together" in capsys.readouterr().err
