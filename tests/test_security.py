"""Security: key policy, ZAP, end-to-end sealing and replays; then CURVE brokers and cells.

The first half needs no sockets (policy, table, ZAP, crypto, replay window). The
second runs a CURVE broker on loopback with keys made by ``objdl keys``; brokers that
tap, corrupt or replay frames are subclasses that hook the broker's send.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker, BrokerError, RoutingTable
from broker.__main__ import main as broker_main
from broker.routing import Send
from objdl import wire
from objdl.cell import Cell
from objdl.cell import _core as cell_core
from objdl.errors import BrokerUnavailableError
from objdl.keys import main as keys_main
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.security import (
    AuthenticationError,
    KeyFileError,
    KeyPair,
    KeyPolicy,
    PeerKeys,
    Rejected,
    SecureUnavailableError,
    end_to_end,
    load_keypair,
    load_public_key,
    zap_reply,
)
from objdl.security._e2e import SEAL_LEN, EndToEnd, ReplayWindow, seal_of
from tests.conftest import wait_for

RC = MessageHeaderKey.RETURN_CODE
ANY_PORT = "tcp://127.0.0.1:*"
MARKER = b"PLAINTEXT-MARKER-7f3a9c"
REPO = Path(__file__).resolve().parent.parent


def pair() -> KeyPair:
    return KeyPair(*zmq.curve_keypair())


def z(key: KeyPair) -> str:
    return key.public.decode()


# ------------------------------------------------------------------ policy (no sockets)


def test_policy_binds_keys_to_names() -> None:
    site, admin, other = pair(), pair(), pair()
    policy = KeyPolicy({site.public: ["site-1", "site-1.*"], admin.public: ["*"]})
    assert policy.check(z(site), "site-1") == ""
    assert policy.check(z(site), "site-1.job-7.w0") == ""
    for name in ("site-2", "server", "site-10", "site-1x"):
        assert policy.check(z(site), name).startswith("not allowed: ")
    assert policy.check(z(admin), "anything.at.all") == ""
    assert "may use no names" in policy.check(z(other), "site-1")
    assert policy.check(None, "site-1").startswith("not allowed")
    assert policy.allows_key(site.public) and not policy.allows_key(other.public)
    with pytest.raises(ValueError, match="bad name pattern"):
        KeyPolicy({site.public: ["site-*"]})
    with pytest.raises(KeyFileError):
        KeyPolicy({b"short": ["x"]})


def test_policy_lookup_takes_the_most_specific_binding() -> None:
    site, worker, admin, twin = pair(), pair(), pair(), pair()
    policy = KeyPolicy(
        {
            site.public: ["site-1", "site-1.*"],
            worker.public: ["site-1.w0"],
            admin.public: ["*"],
        }
    )
    assert policy.lookup("site-1")[0] == site.public
    assert policy.lookup("site-1.w0")[0] == worker.public
    assert policy.lookup("site-1.w1.x")[0] == site.public
    assert policy.lookup("server")[0] == admin.public
    key, why = KeyPolicy({site.public: ["a"], twin.public: ["a"]}).lookup("a")
    assert key is None and "ambiguous" in why
    assert KeyPolicy({site.public: ["a"]}).lookup("b") == (None, "no public key is bound to 'b'")


def test_policy_from_dir_defaults_and_errors(tmp_path: Path) -> None:
    keys = tmp_path / "allowed"
    assert keys_main(["new", "site-1", "--dir", str(tmp_path)]) == 0
    assert keys_main(["new", "tool", "--dir", str(tmp_path)]) == 0
    assert (
        keys_main(["allow", "site-1", "--dir", str(keys), "--pub", str(tmp_path / "site-1.key")])
        == 0
    )
    # A key file dropped in by hand, with no allowed.json entry: its own name and below.
    (keys / "tool.key").write_bytes((tmp_path / "tool.key").read_bytes())
    policy = KeyPolicy.from_dir(keys)
    tool = load_public_key(tmp_path / "tool.key")
    assert policy.names_for(tool) == ("tool", "tool.*")
    assert policy.names_for(load_public_key(tmp_path / "site-1.key")) == ("site-1", "site-1.*")
    (keys / "allowed.json").write_text(json.dumps({"tool": ["bad..name"]}))
    with pytest.raises(KeyFileError, match="bad name pattern"):
        KeyPolicy.from_dir(keys)
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyPolicy.from_dir(tmp_path / "nowhere")


def test_key_loading(tmp_path: Path) -> None:
    assert keys_main(["new", "a", "--dir", str(tmp_path)]) == 0
    kp = load_keypair(tmp_path / "a.key_secret")
    assert load_public_key(tmp_path / "a.key") == kp.public
    assert load_public_key(kp.public.decode()) == kp.public
    assert load_keypair((kp.public.decode(), kp.secret.decode())) == kp
    assert "secret" not in repr(kp)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        load_keypair(tmp_path / "a.key")
    with pytest.raises(KeyFileError, match="does not belong"):
        load_keypair((pair().public, kp.secret))
    with pytest.raises(KeyFileError, match="no such file"):
        load_public_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="Z85"):
        load_keypair(('"' * 40, kp.secret))


# ------------------------------------------------------------------ routing table and ZAP


def reg(name: str) -> list[bytes]:
    return [wire.KIND_REG, wire.PROTOCOL_VERSION, name.encode()]


def test_table_refuses_names_the_key_is_not_bound_to() -> None:
    site, server = pair(), pair()
    policy = KeyPolicy({site.public: ["site-1", "site-1.*"], server.public: ["server"]})
    table = RoutingTable(authorize=policy.check)
    act = table.handle(b"s", reg("server"), 0.0, z(server))
    assert act.sends[0].frames == [wire.KIND_REG_OK, b"server"]
    for name in ("site-2", "server"):  # "server" is live: no PING may disturb it
        act = table.handle(b"p", reg(name), 0.1, z(site))
        [send] = act.sends
        assert send.peer == b"p" and send.frames[0] == wire.KIND_REG_ERR
        assert bytes(send.frames[2]).startswith(b"not allowed: ")
    assert table.counters()["reg_err_not_allowed"] == 2 and table.counters()["probes"] == 0
    assert table.handle(b"p", reg("site-1.w0"), 0.2, z(site)).sends[0].frames[0] == (
        wire.KIND_REG_OK
    )
    refused = table.handle(b"q", reg("site-1"), 0.3)  # no identity at all
    assert refused.sends[0].frames[0] == wire.KIND_REG_ERR
    assert table.cells() == ["server", "site-1.w0"]


def test_table_without_policy_ignores_identity() -> None:
    table = RoutingTable()
    assert table.handle(b"p", reg("x"), 0.0, "whatever").sends[0].frames[0] == wire.KIND_REG_OK


def test_zap_reply() -> None:
    good, bad = pair(), pair()
    allows = {good.public}.__contains__

    def request(mech: bytes, *creds: bytes) -> list[bytes]:
        return [b"1.0", b"7", b"objdl", b"127.0.0.1", b"", mech, *creds]

    ok = zap_reply(request(b"CURVE", zmq.utils.z85.decode(good.public)), allows)
    assert ok == [b"1.0", b"7", b"200", b"OK", good.public, b""]
    assert zap_reply(request(b"CURVE", zmq.utils.z85.decode(bad.public)), allows)[2] == b"400"
    assert zap_reply(request(b"NULL"), allows)[2] == b"400"
    assert zap_reply(request(b"PLAIN", b"u", b"p"), allows)[2] == b"400"
    assert zap_reply([b"0.9", b"1"], allows)[2] == b"400"
    assert zap_reply([], allows)[2] == b"400"


# ------------------------------------------------------------------ crypto (no sockets)


class Pair:
    """Two end-to-end states that know each other: a sender 'site-1', a receiver 'server'."""

    def __init__(self, **kw: Any) -> None:
        self.a, self.b = pair(), pair()
        self.keys = {"site-1": self.a.public, "server": self.b.public}
        self.sender = end_to_end("site-1", self.a, self.keys)
        self.receiver = EndToEnd("server", self.b, PeerKeys(self.keys), **kw)
        self.sender.outbound("server").learn(self.receiver.session)  # the handshake's result

    def seal(self, payload: Any = None, headers: dict[str, Any] | None = None) -> list[bytes]:
        frames = wire.encode(Message({"secure": True, **(headers or {})}, payload))
        return [bytes(memoryview(f)) for f in self.sender.outbound("server").seal(frames)]

    def open(self, frames: list[bytes], origin: str = "site-1") -> Message:
        return wire.decode(self.receiver.open(origin, frames))


payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
bulk = st.lists(st.binary(min_size=0, max_size=300), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads, buffers=bulk, topic=st.text(max_size=10))
def test_seal_open_round_trip(payload: Any, buffers: list[bytes], topic: str) -> None:
    p = Pair()
    body = {"v": payload, "bufs": [bytearray(b) for b in buffers]}
    frames = wire.encode(Message({"topic": topic, "secure": True}, body), threshold=16)
    sealed = p.sender.outbound("server").seal(frames)
    assert len(sealed) == len(frames)
    for plain, secret in zip(frames[1:], sealed[1:], strict=True):
        if len(plain) >= 8:
            assert bytes(plain) not in bytes(secret)
    msg = wire.decode(p.receiver.open("site-1", sealed))
    assert msg.headers["topic"] == topic
    assert msg.payload["v"] == payload
    assert [bytes(b) for b in msg.payload["bufs"]] == buffers


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_rejected(data: st.DataObject) -> None:
    p = Pair()
    frames = p.seal({"blob": MARKER * 5000, "n": 1}, {"req_id": 3})
    assert len(frames) == 3  # headers, body, one out-of-band buffer
    i = data.draw(st.integers(0, len(frames) - 1), label="frame")
    at = data.draw(st.integers(0, len(frames[i]) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    bad = bytearray(frames[i])
    bad[at] ^= 1 << bit
    frames[i] = bytes(bad)
    with pytest.raises(Rejected) as info:
        p.open(frames)
    assert info.value.kind in ("auth", "malformed")
    assert p.receiver.stats["opened"] == 0


def test_frames_cannot_be_dropped_added_swapped_or_readdressed() -> None:
    p = Pair()
    frames = p.seal({"a": MARKER * 5000, "b": b"y" * 70000})
    assert len(frames) == 4
    for bad in (frames[:3], [*frames, frames[3]], [frames[0], frames[1], frames[3], frames[2]]):
        with pytest.raises(Rejected, match="failed authentication"):
            p.open(bad)
    # The broker stamps the origin: re-stamped, it no longer authenticates.
    both = EndToEnd("server", p.b, PeerKeys({**p.keys, "site-2": p.a.public}))
    with pytest.raises(Rejected, match="failed authentication"):  # even under the same key
        both.open("site-2", frames)
    assert p.open(frames).payload["a"] == MARKER * 5000


def test_unknown_peer_and_marked_but_unsealed() -> None:
    p = Pair()
    frames = p.seal("x")
    with pytest.raises(Rejected) as info:
        p.open(frames, origin="stranger")
    assert info.value.kind == "unknown_peer"
    plain = [bytes(memoryview(f)) for f in wire.encode(Message({"secure": True}, "hello"))]
    with pytest.raises(Rejected) as info:
        p.open(plain)
    assert info.value.kind == "malformed"
    with pytest.raises(SecureUnavailableError, match="no public key is bound to 'nobody'"):
        p.sender.outbound("nobody")
    assert p.receiver.stats == {
        "opened": 0,
        "malformed": 1,
        "unknown_peer": 1,
        "auth": 0,
        "replay": 0,
        "unknown_session": 0,
        "first_contact": 0,
        "superseded": 0,
    }


def test_wrong_keys_do_not_authenticate() -> None:
    p = Pair()
    impostor = end_to_end("site-1", pair(), {"server": p.b.public})
    frames = wire.encode(Message({"secure": True}, "hi"))
    sealed = impostor.outbound("server").seal(frames)
    with pytest.raises(Rejected, match="failed authentication"):
        p.receiver.open("site-1", sealed)


def test_replays_are_rejected_and_reordering_within_the_window_is_not() -> None:
    p = Pair()
    sealed = [p.seal(i) for i in range(200)]
    order = list(range(200))
    random.Random(5).shuffle(order)
    assert [p.open(sealed[i]).payload for i in order] == order
    for i in (0, 99, 199):
        with pytest.raises(Rejected, match="seen before"):
            p.open(sealed[i])
    assert p.receiver.stats["replay"] == 3 and p.receiver.stats["opened"] == 200


def test_messages_older_than_the_window_are_rejected() -> None:
    p = Pair(window=64)
    sealed = [p.seal(i) for i in range(70)]
    assert p.open(sealed[69]).payload == 69
    assert p.open(sealed[10]).payload == 10  # 59 behind: inside
    with pytest.raises(Rejected, match="older than the replay window"):
        p.open(sealed[5])  # 64 behind: outside


def test_forgotten_sessions_cannot_be_replayed() -> None:
    a, b = pair(), pair()
    keys = {"site-1": a.public, "server": b.public}
    clock = [1000.0]
    receiver = EndToEnd("server", b, PeerKeys(keys), sessions_per_peer=2)

    def sender() -> list[bytes]:  # a restarted cell: a new session, a later clock
        clock[0] += 1
        e2e = EndToEnd("site-1", a, PeerKeys(keys), wall_clock=lambda: clock[0])
        e2e.outbound("server").learn(receiver.session)
        return e2e.outbound("server").seal(wire.encode(Message({"secure": True}, clock[0])))

    first, second, third = sender(), sender(), sender()
    for frames in (first, second, third):
        receiver.open("site-1", frames)  # the third pushes the first session out
    with pytest.raises(Rejected, match="older than those this cell forgot"):
        receiver.open("site-1", first)
    with pytest.raises(Rejected, match="seen before"):
        receiver.open("site-1", third)
    receiver.open("site-1", sender())  # a newer session is welcome


@settings(max_examples=200, deadline=None)
@given(
    counters=st.lists(st.integers(0, 300), max_size=200),
    width=st.sampled_from([1, 8, 64, 1024]),
)
def test_replay_window_matches_a_model(counters: list[int], width: int) -> None:
    window = ReplayWindow(width)
    seen: set[int] = set()
    highest = -1
    for c in counters:
        expect_ok = c not in seen and (c > highest or highest - c < width)
        assert (window.check(c) == "") == expect_ok, (c, highest)
        if expect_ok:
            window.mark(c)
            seen.add(c)
            highest = max(highest, c)


def test_missing_cryptography_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "objdl.security._e2e")
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(SecureUnavailableError, match=r"pip install 'objdl\[secure\]'"):
        end_to_end("site-1", pair(), {})
    with pytest.raises(SecureUnavailableError, match="cryptography"):
        Cell("site-1", "tcp://127.0.0.1:1", curve_keys=pair(), peer_keys={})


def test_cell_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need curve_keys"):
        Cell("site-1", "tcp://127.0.0.1:1", peer_keys={})
    with pytest.raises(KeyFileError, match="no such file"):
        Cell("site-1", "tcp://127.0.0.1:1", curve_keys=tmp_path / "missing.key_secret")
    with pytest.raises(KeyFileError):
        Cell("site-1", "tcp://127.0.0.1:1", curve_keys=pair(), broker_public_key="nope")
    with pytest.raises(ValueError, match="go together"):
        Broker(ANY_PORT, curve_keys=pair())


# ------------------------------------------------------------------ objdl keys


def test_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, allowed = tmp_path / "keys", tmp_path / "allowed"
    assert keys_main(["new", "site-1", "--dir", str(d)]) == 0
    assert stat.S_IMODE((d / "site-1.key_secret").stat().st_mode) == 0o600
    assert keys_main(["new", "site-1", "--dir", str(d)]) == 1  # no silent overwrite
    pub = str(d / "site-1.key")
    assert keys_main(["allow", "site-1", "--dir", str(allowed), "--pub", pub]) == 0
    assert (
        keys_main(["allow", "ops", "--dir", str(allowed), "--pub", pub, "--names", "ops, tools.*"])
        == 0
    )
    assert json.loads((allowed / "allowed.json").read_text()) == {
        "ops": ["ops", "tools.*"],
        "site-1": ["site-1", "site-1.*"],
    }
    assert not list(allowed.glob("*.key_secret"))  # only the public key is copied
    capsys.readouterr()
    assert keys_main(["list", "--dir", str(allowed)]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "tools.*" in out and load_public_key(pub).decode() in out
    assert keys_main(["revoke", "ops", "--dir", str(allowed)]) == 0
    assert not (allowed / "ops.key").exists()
    for bad in (
        ["allow", "x", "--dir", str(allowed), "--pub", pub, "--names", "a..b"],
        ["allow", "x", "--dir", str(allowed), "--pub", str(tmp_path / "nope.key")],
        ["new", "../evil", "--dir", str(d)],
        ["revoke", "ghost", "--dir", str(allowed)],
        ["list", "--dir", str(tmp_path / "nowhere")],
    ):
        capsys.readouterr()
        assert keys_main(bad) == 1, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("objdl keys: "), err
    other = tmp_path / "other"
    assert keys_main(["new", "other", "--dir", str(other)]) == 0
    replace = ["allow", "site-1", "--dir", str(allowed), "--pub", str(other / "other.key")]
    assert keys_main(replace) == 1  # another key under an existing entry
    assert keys_main([*replace, "--force"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        keys_main(["allow", "x"])
    assert exit_info.value.code == 2


def test_allow_does_not_write_through_a_link_planted_at_its_temporary(tmp_path: Path) -> None:
    """Another user who can write into the allow-list folder plants a symlink at the
    temporary name `objdl keys allow` used (``.NAME.tmpPID``, the PID is no secret):
    the file the link points at must stay as it was."""
    d, allowed = tmp_path / "keys", tmp_path / "allowed"
    assert keys_main(["new", "site-1", "--dir", str(d)]) == 0
    allowed.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("site-1.key", "allowed.json"):
        os.symlink(victim, allowed / f".{name}.tmp{os.getpid()}")
    pub = str(d / "site-1.key")
    assert keys_main(["allow", "site-1", "--dir", str(allowed), "--pub", pub]) == 0
    assert victim.read_text() == "precious\n"
    assert load_public_key(allowed / "site-1.key") == load_public_key(d / "site-1.key")
    assert json.loads((allowed / "allowed.json").read_text()) == {"site-1": ["site-1", "site-1.*"]}
    assert not list(allowed.glob(".*.tmp"))  # no temporary of ours left behind


@pytest.mark.parametrize("force", [False, True])
def test_new_does_not_write_a_secret_through_a_planted_link(tmp_path: Path, force: bool) -> None:
    """A symlink planted at NAME.key_secret (dangling: `exists()` is False for it; or,
    with --force, to a file the planter can read) must not receive the secret key."""
    d = tmp_path / "keys"
    d.mkdir()
    theirs = tmp_path / "theirs"
    if force:
        theirs.write_text("")
        theirs.chmod(0o666)
    os.symlink(theirs, d / "site-1.key_secret")
    code = keys_main(["new", "site-1", "--dir", str(d), *(["--force"] if force else [])])
    if not force:
        assert code == 1  # refused: the name is taken, by a link
        assert not theirs.exists()
        return
    assert code == 0
    assert theirs.read_text() == ""  # nothing written through the link
    secret = d / "site-1.key_secret"
    assert not secret.is_symlink() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text()
    assert sorted(p.name for p in d.iterdir()) == ["site-1.key", "site-1.key_secret"]


# ------------------------------------------------------------------ CURVE broker and cells


@dataclasses.dataclass
class Keys:
    root: Path
    allowed: Path

    def secret(self, name: str) -> Path:
        return self.root / name / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.root / name / f"{name}.key"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Keys for a broker, server, site-1, site-2 and an outsider, made with `objdl keys`."""
    root = tmp_path_factory.mktemp("keys")
    k = Keys(root, root / "allowed")
    for name in ("broker", "server", "site-1", "site-2", "outsider"):
        assert keys_main(["new", name, "--dir", str(root / name)]) == 0
    for name in ("server", "site-1", "site-2"):
        assert (
            keys_main(["allow", name, "--dir", str(k.allowed), "--pub", str(k.public(name))]) == 0
        )
    return k


class TapBroker(Broker):
    """A CURVE broker that records every frame it sends and may alter MSGs in flight."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.captured: list[list[bytes]] = []
        self.alter: Callable[[Send[Any]], list[Send[Any]]] | None = None

    def _send(self, sock: zmq.Socket[Any], send: Send[Any], now: float) -> None:
        frames = [bytes(memoryview(f)) for f in send.frames]
        self.captured.append(frames)
        sends = [send]
        if self.alter is not None and frames[0] == wire.KIND_MSG:
            sends = self.alter(dataclasses.replace(send, frames=list(frames)))
        for s in sends:
            super()._send(sock, s, now)

    def saw(self, needle: bytes) -> bool:
        return any(needle in f for frames in self.captured for f in frames)


@pytest.fixture
def secure_broker(keys: Keys) -> Iterator[TapBroker]:
    b = TapBroker(ANY_PORT, curve_keys=keys.secret("broker"), allowed_keys=keys.allowed)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def make_cell(keys: Keys, secure_broker: TapBroker) -> Iterator[Callable[..., Cell]]:
    """Start keyed cells on the secure broker (key = name unless given); all stopped after."""
    cells: list[Cell] = []

    def make(name: str, key: str | None = None, timeout: float = 5.0, **kw: Any) -> Cell:
        kw.setdefault("curve_keys", keys.secret(key or name))
        kw.setdefault("broker_public_key", keys.public("broker"))
        kw.setdefault("peer_keys", keys.allowed)
        c = Cell(name, secure_broker.url, **kw)
        cells.append(c)
        c.start(timeout=timeout)
        return c

    yield make
    for c in cells:
        c.stop()


def echo(req: Message) -> Message:
    return Message({"was_secure": bool(req.get_header("secure"))}, req.payload)


def test_allowed_cells_talk_over_curve(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)
    reply = site.send_request("ch", "server", "echo", Message(payload="hello"), 5.0)
    assert reply.get_header(RC) == ReturnCode.OK and reply.payload == "hello"
    assert reply.get_header("was_secure") is False
    assert secure_broker.stats()["zap_ok"] == 2
    assert site.list_cells() == ["server", "site-1"]


def test_unknown_key_cannot_connect_or_send(
    make_cell: Callable[..., Cell], keys: Keys, secure_broker: TapBroker
) -> None:
    server = make_cell("server")
    got: list[Message] = []
    server.register_request_cb("ch", "t", got.append)
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="does not allow this cell's key"):
        make_cell("site-3", key="outsider", timeout=5.0)
    assert time.monotonic() - t0 < 3.0  # refused at once, not after the start timeout
    # A raw socket with that key, sending anyway: nothing gets through.
    outsider = load_keypair(keys.secret("outsider"))
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    try:
        raw.curve_serverkey = load_public_key(keys.public("broker"))
        raw.curve_publickey, raw.curve_secretkey = outsider.public, outsider.secret
        raw.connect(secure_broker.url)
        raw.send_multipart(reg("site-3"))
        payload = wire.encode(Message({"msg_type": "fire", "channel": "ch", "topic": "t"}))
        raw.send_multipart([wire.KIND_MSG, b"server", *payload])
        wait_for(lambda: secure_broker.stats()["zap_denied"] >= 2)
        assert not raw.poll(300)
    finally:
        raw.close(linger=0)
    assert got == [] and secure_broker.stats()["routed"] == 0
    # A plain cell cannot connect either.
    with pytest.raises(BrokerUnavailableError):
        Cell("site-4", secure_broker.url).start(timeout=0.5)
    assert secure_broker.cells() == ["server"]


def test_key_bound_to_site_1_cannot_take_other_names(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    make_cell("server")
    for name in ("site-2", "server"):
        with pytest.raises(AuthenticationError, match=r"not allowed: .* may use only site-1"):
            make_cell(name, key="site-1")
    make_cell("site-1.job-7", key="site-1")  # under its own name: fine
    stats = secure_broker.stats()
    assert stats["reg_err_not_allowed"] == 2 and stats["probes"] == 0
    assert secure_broker.cells() == ["server", "site-1.job-7"]


def test_wrong_broker_key_fails_start_with_a_key_hint(
    make_cell: Callable[..., Cell], keys: Keys
) -> None:
    with pytest.raises(AuthenticationError, match="broker_public_key"):
        make_cell("site-1", broker_public_key=keys.public("outsider"), timeout=2.0)


def test_secure_request_reply_end_to_end(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)
    payload = {"small": MARKER, "big": MARKER * 20000}  # inline and out of band
    reply = site.send_request("ch", "server", "echo", Message(payload=payload), 5.0, secure=True)
    assert reply.get_header(RC) == ReturnCode.OK, reply.headers
    assert reply.get_header("was_secure") is True and reply.get_header("secure") is True
    assert reply.payload["small"] == MARKER and bytes(reply.payload["big"]) == MARKER * 20000
    got: list[Any] = []
    server.register_request_cb("ch", "note", lambda req: got.append(req.payload))
    assert site.fire_and_forget("ch", "note", ["server"], Message(payload=MARKER), secure=True) == {
        "server": ReturnCode.OK
    }
    wait_for(lambda: got == [MARKER])
    site.register_request_cb("ch", "echo", echo)
    replies = site.broadcast_request(
        "ch", "echo", ["server", "site-1"], Message(payload=1), 5.0, secure=True
    )
    assert [r.payload for r in replies.values()] == [1, 1]  # its own name included
    assert not secure_broker.saw(MARKER)  # the broker never saw a byte of it
    assert server.stats["rejected_secure"] == 0 and site.stats["rejected_secure"] == 0


def test_secure_download_of_bytes(make_cell: Callable[..., Cell], secure_broker: TapBroker) -> None:
    from objdl.objects import download_bytes, offer_bytes

    owner, site = make_cell("server"), make_cell("site-1")
    data = (MARKER + os.urandom(4000)) * 700  # about 2.8 MiB, many chunks
    ref = offer_bytes(owner, data, timeout=30.0, chunk_size=256 * 1024)
    got = download_bytes(site, "server", ref, secure=True, chunk_size=256 * 1024)
    assert bytes(got) == data
    assert not secure_broker.saw(MARKER)
    assert owner.secure_stats["opened"] >= 11 and site.secure_stats["opened"] >= 11


def test_asyncio_cells_seal_end_to_end_with_threaded_ones(
    make_cell: Callable[..., Cell], keys: Keys, secure_broker: TapBroker
) -> None:
    """CURVE to the broker and sealed messages both ways between objdl.aio and Cell."""
    import asyncio

    from objdl import aio
    from objdl.objects import offer_bytes

    server = make_cell("server")
    server.register_request_cb("ch", "echo", echo)
    got: list[Any] = []
    server.register_request_cb("ch", "note", lambda req: got.append(req.payload))
    data = (MARKER + os.urandom(4000)) * 300
    ref = offer_bytes(server, data, timeout=30.0, chunk_size=256 * 1024)
    seen: list[Any] = []

    async def main() -> tuple[Message, dict[str, str], bytes, Message]:
        cell = aio.Cell(
            "site-1",
            secure_broker.url,
            curve_keys=keys.secret("site-1"),
            broker_public_key=keys.public("broker"),
            peer_keys=keys.allowed,
        )
        async with cell:

            async def served(req: Message) -> Message:
                seen.append(req.get_header("secure"))
                return Message(payload=req.payload)

            cell.register_request_cb("ch", "aio-echo", served)
            reply = await cell.send_request(
                "ch", "server", "echo", Message(payload=MARKER), 5.0, secure=True
            )
            fired = await cell.fire_and_forget(
                "ch", "note", ["server"], Message(payload=MARKER), secure=True
            )
            blob = bytes(await aio.download_bytes(cell, "server", ref, secure=True))
            back = await asyncio.to_thread(
                server.send_request, "ch", "site-1", "aio-echo", Message(payload=MARKER), 5.0, True
            )
            return reply, fired, blob, back

    reply, fired, blob, back = asyncio.run(main())
    assert reply.get_header(RC) == ReturnCode.OK and reply.payload == MARKER
    assert reply.get_header("was_secure") is True
    assert fired == {"server": ReturnCode.OK}
    wait_for(lambda: got == [MARKER])
    assert blob == data
    assert back.get_header(RC) == ReturnCode.OK and back.payload == MARKER and seen == [True]
    assert not secure_broker.saw(MARKER)


def test_broker_sees_plaintext_only_without_secure(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)
    big = MARKER * 10000
    for secure in (True, False):
        secure_broker.captured.clear()
        reply = site.send_request(
            "ch", "server", "echo", Message(payload={"m": MARKER, "b": big}), 5.0, secure=secure
        )
        assert reply.get_header(RC) == ReturnCode.OK and reply.payload["m"] == MARKER
        assert len(secure_broker.captured) >= 2  # the request and its reply were tapped
        assert secure_broker.saw(MARKER) is not secure


def test_flipped_bit_in_transit_is_rejected(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    ran: list[Any] = []
    server.register_request_cb("ch", "t", lambda req: ran.append(req.payload))

    def flip(send: Send[Any]) -> list[Send[Any]]:
        if send.dest == b"server":
            last = bytearray(send.frames[-1])
            last[len(last) // 2] ^= 0x10
            send.frames[-1] = bytes(last)
        return [send]

    secure_broker.alter = flip
    for payload in ({"b": b"z" * 100000}, "small"):
        reply = site.send_request("ch", "server", "t", Message(payload=payload), 5.0, secure=True)
        assert reply.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR, reply.headers
        assert "failed authentication" in reply.get_header(MessageHeaderKey.ERROR)
    assert ran == [] and server.stats["rejected_secure"] == 2


def test_flipped_bit_in_a_reply_is_rejected(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    server.register_request_cb("ch", "echo", echo)

    def flip(send: Send[Any]) -> list[Send[Any]]:
        if send.dest == b"site-1":
            body = bytearray(send.frames[3])
            body[-1] ^= 1
            send.frames[3] = bytes(body)
        return [send]

    secure_broker.alter = flip
    reply = site.send_request("ch", "server", "echo", Message(payload=MARKER), 5.0, secure=True)
    assert reply.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR
    assert reply.payload is None and site.stats["rejected_secure"] == 1


def test_replayed_messages_are_rejected(
    make_cell: Callable[..., Cell], secure_broker: TapBroker
) -> None:
    server, site = make_cell("server"), make_cell("site-1")
    ran: list[Any] = []
    server.register_request_cb("ch", "t", lambda req: ran.append(req.payload))

    def twice(send: Send[Any]) -> list[Send[Any]]:  # a replay of the captured frames
        if send.dest != b"server":
            return [send]
        return [send, dataclasses.replace(send, frames=list(send.frames))]

    first = site.send_request("ch", "server", "t", Message(payload="first"), 5.0, secure=True)
    assert first.get_header(RC) == ReturnCode.OK  # the session handshake is behind us
    ran.remove("first")
    secure_broker.alter = twice
    site.fire_and_forget("ch", "t", "server", Message(payload="once"), secure=True)
    reply = site.send_request("ch", "server", "t", Message(payload="req"), 5.0, secure=True)
    assert reply.get_header(RC) == ReturnCode.OK
    wait_for(lambda: server.stats["rejected_secure"] == 2)
    assert sorted(ran) == ["once", "req"]
    assert server.secure_stats["replay"] == 2
    # The plaintext twin of the same traffic runs twice: replay protection is secure=True's.
    site.fire_and_forget("ch", "t", "server", Message(payload="plain"), secure=False)
    wait_for(lambda: ran.count("plain") == 2)


def test_secure_without_keys_refuses_before_sending(
    make_cell: Callable[..., Cell], secure_broker: TapBroker, keys: Keys
) -> None:
    make_cell("server")
    site = make_cell("site-1", peer_keys={"server": keys.public("server")})
    bare = make_cell("site-2", peer_keys=None)
    secure_broker.captured.clear()
    with pytest.raises(SecureUnavailableError, match="no public key is bound to 'site-2'"):
        site.send_request("ch", "site-2", "t", Message(), 1.0, secure=True)
    with pytest.raises(SecureUnavailableError, match="plaintext"):
        site.broadcast_request("ch", "t", ["server", "site-2"], Message(), 1.0, secure=True)
    with pytest.raises(NotImplementedError, match="plaintext"):
        bare.fire_and_forget("ch", "t", ["server"], Message(), secure=True)
    time.sleep(0.2)
    assert not any(f[0] == wire.KIND_MSG for f in secure_broker.captured)


def test_cell_without_e2e_keys_rejects_sealed_requests(
    make_cell: Callable[..., Cell], keys: Keys
) -> None:
    ran: list[Any] = []
    server = make_cell("server", peer_keys=None)
    server.register_request_cb("ch", "t", lambda req: ran.append(1))
    site = make_cell("site-1")
    reply = site.send_request("ch", "server", "t", Message(payload=MARKER), 5.0, secure=True)
    assert reply.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR
    assert "cannot open secure messages" in reply.get_header(MessageHeaderKey.ERROR)
    assert ran == [] and server.stats["rejected_secure"] == 1


def test_plaintext_reply_to_a_secure_request_is_not_accepted(broker: Broker) -> None:
    """A 'server' that answers in plaintext (or a broker forging replies) gets nowhere."""
    site_keys, server_keys = pair(), pair()
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.DEALER)
    fake.linger = 0
    try:
        fake.connect(broker.url)
        fake.send_multipart(reg("server"))
        assert fake.poll(5000) and fake.recv_multipart()[0] == wire.KIND_REG_OK
        with Cell(
            "site-1",
            broker.url,
            curve_keys=site_keys,
            peer_keys={"server": server_keys.public},
        ) as site:
            results: list[Message] = []
            for rc in (ReturnCode.OK, ReturnCode.PROCESS_EXCEPTION):
                t = threading.Thread(
                    target=lambda: results.append(
                        site.send_request("ch", "server", "t", Message(), 5.0, secure=True)
                    )
                )
                t.start()
                frames = _recv_msg(fake)
                headers = wire.decode_headers(frames[2])
                assert headers["secure"] is True and MARKER not in b"".join(frames)
                reply = Message(
                    {"msg_type": "rep", "req_id": headers["req_id"], RC: rc, "error": "boom"},
                    {"forged": True},
                )
                fake.send_multipart([wire.KIND_MSG, b"site-1", *wire.encode(reply)])
                t.join(10)
            ok_forged, error_reply = results
            assert ok_forged.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR
            assert "not sealed" in ok_forged.get_header(MessageHeaderKey.ERROR)
            assert error_reply.get_header(RC) == ReturnCode.PROCESS_EXCEPTION
            assert error_reply.payload is None  # an unauthenticated error carries nothing
    finally:
        fake.close(linger=0)


def _recv_msg(sock: zmq.Socket[Any], timeout: float = 5.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(left * 1000), "no MSG in time"
        frames = sock.recv_multipart()
        if frames[0] == wire.KIND_MSG:
            return frames
        if frames[0] == wire.KIND_PING:
            sock.send_multipart([wire.KIND_HB])


def test_reload_keys_lets_a_new_key_in(keys: Keys, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    pub = keys.public("server")
    assert keys_main(["allow", "server", "--dir", str(allowed), "--pub", str(pub)]) == 0
    with Broker(ANY_PORT, curve_keys=keys.secret("broker"), allowed_keys=allowed) as b:
        opts = {"curve_keys": keys.secret("site-1"), "broker_public_key": keys.public("broker")}
        with pytest.raises(AuthenticationError):
            Cell("site-1", b.url, **opts).start(timeout=5.0)
        pub1 = str(keys.public("site-1"))
        assert keys_main(["allow", "site-1", "--dir", str(allowed), "--pub", pub1]) == 0
        assert b.reload_keys() == 2
        with Cell("site-1", b.url, **opts) as site:
            assert site.is_connected
        (allowed / "allowed.json").write_text("not json")
        with pytest.raises(KeyFileError):
            b.reload_keys()
    with pytest.raises(BrokerError, match="does not use CURVE"):
        Broker(ANY_PORT).reload_keys()


def test_curve_broker_needs_its_own_context(keys: Keys) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Broker(
            ANY_PORT, context=ctx, curve_keys=keys.secret("broker"), allowed_keys=keys.allowed
        ):
            second = Broker(
                ANY_PORT, context=ctx, curve_keys=keys.secret("broker"), allowed_keys=keys.allowed
            )
            with pytest.raises(BrokerError, match="ZAP handler"):
                second.start()
    finally:
        ctx.term()


def test_broker_command_line_flags(
    keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert broker_main(["--bind", ANY_PORT, "--curve-keys", str(keys.secret("broker"))]) == 2
    assert "go together" in capsys.readouterr().err
    missing = ["--curve-keys", str(tmp_path / "nope"), "--allowed-keys", str(keys.allowed)]
    assert broker_main(["--bind", ANY_PORT, *missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


@pytest.mark.slow
def test_python_m_broker_with_curve(keys: Keys, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "broker", "--bind", ANY_PORT, "--cell-timeout", "60"]
    args += ["--curve-keys", str(keys.secret("broker")), "--allowed-keys", str(keys.allowed)]
    with (
        open(tmp_path / "stderr", "wb") as err,
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path) as proc,
    ):
        try:
            from tests.test_broker import _read_line

            line = _read_line(proc, timeout=20.0)
            assert "(CURVE, public key " in line
            url = line.split(" ")[4]
            opts = {"broker_public_key": keys.public("broker"), "peer_keys": keys.allowed}
            with (
                Cell("server", url, curve_keys=keys.secret("server"), **opts) as server,
                Cell("site-1", url, curve_keys=keys.secret("site-1"), **opts) as site,
            ):
                server.register_request_cb("ch", "echo", echo)
                reply = site.send_request(
                    "ch", "server", "echo", Message(payload=7), 5.0, secure=True
                )
                assert reply.payload == 7
                proc.send_signal(signal.SIGHUP)  # reload: still running afterwards
                reply = site.send_request(
                    "ch", "server", "echo", Message(payload=8), 5.0, secure=True
                )
                assert reply.payload == 8
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, (tmp_path / "stderr").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


# ------------------------------------------------------------------ sessions across restarts


def _sealed_kind(frames: list[bytes]) -> str | None:
    """The msg_type of a sealed MSG as the broker sends it on ([MSG, origin, headers, ...])."""
    if frames[0] != wire.KIND_MSG or len(frames) < 4:
        return None
    headers = wire.decode_headers(frames[2])
    return str(headers.get("msg_type")) if headers.get("secure") else None


class Recorder:
    """A hostile broker's plan: record sealed MSGs to `dest`, replay them when armed.

    Installed as a :class:`TapBroker`'s ``alter``; it runs on the broker's I/O thread.
    While armed, every MSG for `dest` is preceded by all recorded frames, sent to the
    connection that now holds the name (a restarted cell).
    """

    def __init__(self, dest: bytes, kinds: tuple[str, ...]) -> None:
        self.dest = dest
        self.kinds = kinds
        self.recording = True
        self.armed = False
        self.recorded: list[list[bytes]] = []
        self.replayed = 0

    def __call__(self, send: Send[Any]) -> list[Send[Any]]:
        if send.dest != self.dest:
            return [send]
        frames = [bytes(f) for f in send.frames]
        if self.armed:
            replays = [dataclasses.replace(send, frames=list(f)) for f in self.recorded]
            self.replayed += len(replays)
            return [*replays, send]
        if self.recording and _sealed_kind(frames) in self.kinds:
            self.recorded.append(frames)
        return [send]


def _server_keys(keys: Keys) -> dict[str, str]:
    return {
        "secret": str(keys.secret("server")),
        "broker": str(keys.public("broker")),
        "peers": str(keys.allowed),
    }


class Inbox:
    """What child processes report, ``(tag, what, *data)``, kept in arrival order."""

    def __init__(self, results: Any) -> None:
        self.results = results
        self.seen: list[tuple[Any, ...]] = []

    def next(self, tag: str, what: str, timeout: float = 20.0) -> tuple[Any, ...]:
        """The first report `what` from `tag` not yet taken, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for item in self.seen:
                if item[0] == tag and item[1] == what:
                    self.seen.remove(item)
                    return item
            left = deadline - time.monotonic()
            assert left > 0, f"no {what!r} from {tag!r} within {timeout}s"
            self.seen.append(tuple(self.results.get(timeout=left)))

    def ran(self, tag: str) -> list[Any]:
        """Payloads `tag` reported running, taken so far."""
        return [item[2] for item in self.seen if item[0] == tag and item[1] == "ran"]


@pytest.mark.timeout(120)
def test_requests_recorded_before_a_receiver_restart_never_run_again(
    make_cell: Callable[..., Cell], secure_broker: TapBroker, keys: Keys
) -> None:
    """A recording broker replays sealed requests to the receiver's next process: refused."""
    import multiprocessing

    from tests import _procs

    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    inbox = Inbox(results)
    stop_a, stop_b = mp.Event(), mp.Event()
    rec = Recorder(b"server", ("req", "fire"))
    secure_broker.alter = rec
    srv = _server_keys(keys)
    a = mp.Process(
        target=_procs.sealed_server_main,
        args=("a", secure_broker.url, srv, results, stop_a, 60.0),
    )
    b = mp.Process(
        target=_procs.sealed_server_main,
        args=("b", secure_broker.url, srv, results, stop_b, 60.0),
    )
    try:
        a.start()
        inbox.next("a", "ready")
        site = make_cell("site-1")
        for i in range(3):
            reply = site.send_request(
                "ch", "server", "count", Message(payload=i), 10.0, secure=True
            )
            assert reply.get_header(RC) == ReturnCode.OK, reply.headers
        assert site.fire_and_forget(
            "ch", "count", "server", Message(payload="fire"), secure=True
        ) == {"server": ReturnCode.OK}
        ran_a = [inbox.next("a", "ran", 10.0)[2] for _ in range(4)]
        assert sorted(map(str, ran_a)) == ["0", "1", "2", "fire"]
        # the first try of request 0 (refused: first contact), 3 requests, 1 fire
        assert len(rec.recorded) == 5
        rec.recording = False
        stop_a.set()
        inbox.next("a", "stats")
        a.join(20)
        assert a.exitcode == 0
        wait_for(lambda: "server" not in secure_broker.cells(), timeout=10)

        b.start()  # the same name and keys, a new process
        inbox.next("b", "ready")
        rec.armed = True  # from now on every MSG to the server follows the recorded ones
        resent = site.stats["resent_secure"]
        t0 = time.monotonic()
        reply = site.send_request(
            "ch", "server", "count", Message(payload="fresh"), 10.0, secure=True
        )
        elapsed = time.monotonic() - t0
        assert reply.get_header(RC) == ReturnCode.OK, reply.headers
        assert elapsed < 3.0, elapsed  # the site noticed the restart and re-established
        assert site.stats["resent_secure"] == resent + 1
        # Again, now that the site addresses the new session: still refused.
        reply = site.send_request(
            "ch", "server", "count", Message(payload="again"), 10.0, secure=True
        )
        assert reply.get_header(RC) == ReturnCode.OK, reply.headers
        assert rec.replayed >= 3 * len(rec.recorded)
        stop_b.set()
        _, _, e2e_stats, cell_stats = inbox.next("b", "stats")
        ran_b = inbox.ran("b")  # the child reports a call before it reports its stats
        assert ran_b == ["fresh", "again"]  # not one recorded message ran in the new process
        # Every replay refused as sealed for another session (the recorded first try of
        # request 0 was addressed to no session at all), and the first try of "fresh".
        refused = e2e_stats["unknown_session"] + e2e_stats["first_contact"]
        assert refused == rec.replayed + 1, e2e_stats
        assert e2e_stats["opened"] == 2, e2e_stats  # the resent "fresh", "again": nothing else
        assert cell_stats["rejected_secure"] == e2e_stats["unknown_session"]
        b.join(20)
        assert b.exitcode == 0
    finally:
        stop_a.set()
        stop_b.set()
        _procs.end_children([a, b], results)


def test_replies_recorded_before_a_requester_restart_answer_nothing(
    make_cell: Callable[..., Cell], secure_broker: TapBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted requester reuses req_ids: a recorded reply must not answer its request.

    objdl's req_ids are random, so a reuse is unlikely; the seal must hold even so (a
    second implementation may count from 1). Here each cell counts from 1, as objdl's
    cells once did, so every new request meets a recorded reply with its req_id.
    """
    monkeypatch.setattr(cell_core, "new_request_id", itertools.count(1).__next__)
    server = make_cell("server")
    server.register_request_cb("ch", "echo", echo)
    rec = Recorder(b"site-1", ("rep",))
    secure_broker.alter = rec
    first = make_cell("site-1")
    for i in range(3):
        reply = first.send_request("ch", "server", "echo", Message(payload=f"old-{i}"), 5.0, True)
        assert reply.payload == f"old-{i}"
    first.stop()
    rec.recording, rec.armed = False, True
    wait_for(lambda: "site-1" not in secure_broker.cells())
    monkeypatch.setattr(cell_core, "new_request_id", itertools.count(1).__next__)
    again = make_cell("site-1")  # its req_ids start from 1 again, as the recorded replies'
    for i in range(3):
        reply = again.send_request("ch", "server", "echo", Message(payload=f"new-{i}"), 5.0, True)
        assert reply.get_header(RC) == ReturnCode.OK, reply.headers
        assert reply.payload == f"new-{i}"
    assert rec.replayed >= 3 * len(rec.recorded) > 0
    # Each new request met a recorded reply with its req_id, and dropped it unanswered.
    assert again.secure_stats["unknown_session"] >= 3


def test_an_unsealed_unknown_session_refusal_makes_no_resend(broker: Broker) -> None:
    """Only a sealed refusal bound to the request may trigger the resend (no forged rerun)."""
    site_keys, server_keys = pair(), pair()
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.DEALER)
    fake.linger = 0
    try:
        fake.connect(broker.url)
        fake.send_multipart(reg("server"))
        assert fake.poll(5000) and fake.recv_multipart()[0] == wire.KIND_REG_OK
        peers = {"server": server_keys.public}
        with Cell("site-1", broker.url, curve_keys=site_keys, peer_keys=peers) as site:
            results: list[Message] = []
            t = threading.Thread(
                target=lambda: results.append(
                    site.send_request("ch", "server", "t", Message(), 5.0, secure=True)
                )
            )
            t.start()
            headers = wire.decode_headers(_recv_msg(fake)[2])
            forged = Message(
                {
                    "msg_type": "rep",
                    "req_id": headers["req_id"],
                    RC: ReturnCode.AUTHENTICATION_ERROR,
                    "auth_reason": "unknown_session",
                }
            )
            fake.send_multipart([wire.KIND_MSG, b"site-1", *wire.encode(forged)])
            t.join(10)
            [reply] = results
            assert reply.get_header(RC) == ReturnCode.AUTHENTICATION_ERROR
            assert reply.get_header("auth_reason") == "unknown_session"  # passed on, not acted on
            assert not fake.poll(300)  # the request was not sent again
            assert site.stats["resent_secure"] == 0
    finally:
        fake.close(linger=0)


# ------------------------------------------------------------------ every refusal is answered


def _raw_request(
    sock: zmq.Socket[Any], frames: list[Any], req_id: int, timeout: float = 3.0
) -> dict[str, Any]:
    sock.send_multipart([wire.KIND_MSG, b"server", *frames])
    t0 = time.monotonic()
    while True:
        got = _recv_msg(sock, timeout)
        headers = wire.decode_headers(got[2])
        if headers.get("req_id") == req_id:
            assert time.monotonic() - t0 < timeout
            return {**headers, "_frames": got}


def test_every_refused_secure_request_gets_a_prompt_reason(broker: Broker) -> None:
    """Raw frames from a bare socket: each way a sealed request fails is answered at once."""
    raw_keys, server_keys, stranger = pair(), pair(), pair()
    ran: list[Any] = []
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    peers = {"raw": raw_keys.public}
    try:
        with Cell("server", broker.url, curve_keys=server_keys, peer_keys=peers) as server:
            server.register_request_cb("ch", "t", lambda req: ran.append(req.payload))
            sock.connect(broker.url)
            sock.send_multipart(reg("raw"))
            assert sock.poll(5000) and sock.recv_multipart()[0] == wire.KIND_REG_OK
            mine = EndToEnd("raw", raw_keys, PeerKeys({"server": server_keys.public}))
            theirs = EndToEnd("raw", stranger, PeerKeys({"server": server_keys.public}))

            def request(req_id: int, payload: Any = "x") -> list[Any]:
                return wire.encode(
                    Message(
                        {
                            "msg_type": "req",
                            "req_id": req_id,
                            "channel": "ch",
                            "topic": "t",
                            "secure": True,
                        },
                        payload,
                    )
                )

            def sealed(e2e: EndToEnd, req_id: int) -> list[bytes]:
                return [bytes(memoryview(f)) for f in e2e.outbound("server").seal(request(req_id))]

            cases: list[tuple[str, list[Any]]] = [("malformed", request(1))]
            cases.append(("auth", sealed(theirs, 2)))  # not the key bound to 'raw'
            bad = sealed(mine, 3)
            bad[1] = bad[1][:-1] + bytes([bad[1][-1] ^ 1])
            cases.append(("auth", bad))
            # Addressed to no session / an old one: answered sealed, for the resend.
            cases.append(("unknown_session", sealed(mine, 4)))
            for code, frames in cases:
                reply = _raw_request(sock, frames, int(wire.decode_headers(frames[0])["req_id"]))
                assert reply[RC] == ReturnCode.AUTHENTICATION_ERROR, (code, reply)
                assert reply["auth_reason"] == code, (code, reply)
            assert reply["secure"] is True  # the last refusal is sealed, bound to the request
            mine.open("server", reply["_frames"][2:], seal_of(frames))  # teaches the session
            assert ran == []
            ok = sealed(mine, 5)
            answer = _raw_request(sock, ok, 5)["_frames"][2:]
            opened = wire.decode(mine.open("server", answer, seal_of(ok)))
            assert opened.headers[RC] == ReturnCode.OK and ran == ["x"]
            replay = _raw_request(sock, ok, 5)
            assert replay["auth_reason"] == "replay" and ran == ["x"]
        # A cell with no keys at all: answered no_keys.
        with Cell("server", broker.url) as bare:
            bare.register_request_cb("ch", "t", lambda req: ran.append(req.payload))
            for frames in (request(6), sealed(mine, 7)):
                req_id = int(wire.decode_headers(frames[0])["req_id"])
                reply = _raw_request(sock, frames, req_id)
                assert reply["auth_reason"] == "no_keys" and ran == ["x"]
    finally:
        sock.close(linger=0)


# ------------------------------------------------------------ attacks on the seal (no sockets)


def test_a_recorded_message_does_not_open_in_the_receivers_next_life() -> None:
    p = Pair()
    frames = p.seal("once")
    assert p.open(frames).payload == "once"
    restarted = EndToEnd("server", p.b, PeerKeys(p.keys))  # same name, same keys
    with pytest.raises(Rejected) as info:
        restarted.open("site-1", frames)
    assert info.value.kind == "unknown_session" and info.value.peer_session is not None
    assert restarted.stats["opened"] == 0


def test_a_reply_answers_only_the_request_it_was_sealed_for() -> None:
    p = Pair()
    back = p.receiver.outbound("site-1")
    first, second = p.seal("q1", {"req_id": 1}), p.seal("q2", {"req_id": 1})
    assert p.open(first).payload == "q1" and p.open(second).payload == "q2"
    reply = back.seal(
        wire.encode(Message({"secure": True, "req_id": 1}, "a1")), in_reply_to=seal_of(first)
    )
    with pytest.raises(Rejected, match="failed authentication"):  # to the same req_id, later
        p.sender.open("server", reply, seal_of(second))
    with pytest.raises(Rejected, match="failed authentication"):  # as a request
        p.sender.open("server", reply)
    assert wire.decode(p.sender.open("server", reply, seal_of(first))).payload == "a1"
    # A reply sealed for the requester's earlier life is not even tried.
    later = EndToEnd("site-1", p.a, PeerKeys(p.keys))
    with pytest.raises(Rejected) as info:
        later.open("server", reply, seal_of(first))
    assert info.value.kind == "unknown_session"


def test_headers_cannot_be_swapped_between_sealed_messages() -> None:
    p = Pair()
    one, two = p.seal("a", {"topic": "read"}), p.seal("b", {"topic": "delete"})
    with pytest.raises(Rejected, match="failed authentication"):
        p.open([two[0], *one[1:]])
    assert p.open(one).payload == "a" and p.open(two).payload == "b"


def test_readdressed_to_another_cell_with_the_same_keys() -> None:
    p = Pair()
    twin = EndToEnd("server-2", p.b, PeerKeys(p.keys))
    p.sender.outbound("server").learn(twin.session)  # even addressed to the twin's session
    frames = p.seal("for server")
    with pytest.raises(Rejected, match="failed authentication"):
        twin.open("site-1", frames)


def test_truncated_frames_are_rejected() -> None:
    p = Pair()
    frames = p.seal({"blob": MARKER * 5000})
    assert len(frames) == 3
    cuts: list[list[bytes]] = [
        frames[:1],
        [frames[0], frames[1][:SEAL_LEN]],
        [frames[0], frames[1][: SEAL_LEN + 15]],
        [frames[0], frames[1][:-1], frames[2]],
        [frames[0], frames[1], frames[2][:-1]],
        [frames[0], frames[1], b""],
        [b"", *frames[1:]],
    ]
    for bad in cuts:
        with pytest.raises(Rejected) as info:
            p.open(bad)
        assert info.value.kind in ("malformed", "auth"), bad
    assert p.open(frames).payload["blob"] == MARKER * 5000
    assert p.receiver.stats["opened"] == 1


def test_cell_and_e2e_read_seals_with_one_function() -> None:
    import objdl.cell._core as cell_mod
    import objdl.cell._pending as pending_mod
    import objdl.security._e2e as e2e_mod
    from objdl.security import _seal

    assert cell_mod.seal_of is pending_mod.seal_of is e2e_mod.seal_of is _seal.seal_of
    assert SEAL_LEN == _seal.SEAL_LEN == 33


def test_a_sealed_refusal_is_followed_even_if_the_peer_clock_stepped_back() -> None:
    a, b = pair(), pair()
    keys = {"site-1": a.public, "server": b.public}
    sender = EndToEnd("site-1", a, PeerKeys(keys))
    before = EndToEnd("server", b, PeerKeys(keys), wall_clock=lambda: 2000.0)
    after = EndToEnd("server", b, PeerKeys(keys), wall_clock=lambda: 1000.0)  # restarted
    out = sender.outbound("server")
    out.learn(before.session)
    frames = out.seal(wire.encode(Message({"secure": True}, "q")))
    with pytest.raises(Rejected) as info:
        after.open("site-1", frames)
    assert info.value.peer_session == sender.session
    refusal = after.outbound("site-1").seal(
        wire.encode(Message({"secure": True}, None)), in_reply_to=seal_of(frames)
    )
    sender.open("server", refusal, seal_of(frames))  # authentic, bound to our request
    assert out.peer_session == before.session  # an older-looking session is not learned...
    sender.adopt("server", refusal)  # ...unless a bound refusal proves it current
    again = out.seal(wire.encode(Message({"secure": True}, "q")))
    assert wire.decode(after.open("site-1", again)).payload == "q"
