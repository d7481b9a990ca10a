"""Bad input: floods of junk leave the broker and cells running, counted, logs bounded."""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker
from objdl import wire
from objdl.cell import Cell
from objdl.downloader import ObjDownloader
from objdl.downloader._owner import _OwnerState
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.objects import ObjectProducer
from tests.conftest import wait_for

N_JUNK = 100_000


def junk_message(rng: random.Random, victim: bytes) -> list[bytes]:
    """One malformed message of a random sort (see the cases below)."""
    case = rng.randrange(10)
    if case == 0:  # random frame count and bytes
        return [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 8))]
    if case == 1:  # unknown kind
        return [rng.randbytes(rng.randrange(1, 8)), b"x"]
    if case == 2:  # a name that is not an FQCN
        return [
            wire.KIND_MSG,
            rng.choice([b"", b"a..b", b"\xff\xfe", b"x" * 300, b"bad name"]),
            b"h",
            b"b",
        ]
    if case == 3:  # wrong frame counts for control kinds
        return [
            rng.choice([wire.KIND_REG, wire.KIND_LIST, wire.KIND_HB]),
            *([b"z"] * rng.randrange(3, 7)),
        ]
    if case == 4:  # REG with junk version/name
        return [wire.KIND_REG, rng.randbytes(3), rng.randbytes(rng.randrange(0, 20))]
    # cases 5-9: routed to a live cell with junk inside, so the cell must reject it
    headers = rng.choice(
        [
            rng.randbytes(rng.randrange(0, 30)),  # not msgpack at all
            msgpack.packb({"msg_type": "req"})[:-1],  # truncated msgpack
            msgpack.packb(
                {"msg_type": 5, "req_id": "x", "channel": [1], "topic": None}
            ),  # wrong types
            msgpack.packb([1, 2, 3]),  # not a map
            msgpack.packb({1: 2}),  # not str keys
        ]
    )
    body = rng.choice(
        [
            rng.randbytes(rng.randrange(0, 30)),
            msgpack.packb(msgpack.ExtType(1, b"\x00\x00\x00\x09")),
        ]
    )
    extra = [rng.randbytes(rng.randrange(0, 50)) for _ in range(rng.randrange(0, 3))]
    return [wire.KIND_MSG, victim, headers, body, *extra]


@pytest.mark.timeout(180)
def test_flood_of_junk_leaves_everything_running(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(1234)
    proc = psutil.Process(os.getpid())
    with (
        Broker("tcp://127.0.0.1:*", max_message_size=1024 * 1024) as b,
        Cell("server", b.url) as victim,
        Cell("site-1", b.url) as peer,
    ):
        if True:
            victim.register_request_cb("ch", "echo", lambda req: Message(payload=req.payload))
            assert peer.send_request("ch", "server", "echo", Message(payload=1), 5.0).payload == 1
            ctx = zmq.Context.instance()
            attacker = ctx.socket(zmq.DEALER)
            attacker.setsockopt(zmq.LINGER, 0)
            attacker.setsockopt(zmq.SNDHWM, 0)
            try:
                attacker.connect(b.url)
                attacker.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, b"attacker"])
                assert attacker.poll(5000) and attacker.recv_multipart()[0] == wire.KIND_REG_OK
                rss_before = proc.memory_info().rss
                t0 = time.monotonic()
                for i in range(N_JUNK):
                    attacker.send_multipart(junk_message(rng, b"server"))
                    if i % 1000 == 0:  # keep the attacker registered, and drain its replies
                        attacker.send_multipart([wire.KIND_HB])
                        while attacker.poll(0):
                            attacker.recv_multipart()
                    if i == N_JUNK // 2:  # one oversized message too
                        attacker.send_multipart(
                            [wire.KIND_MSG, b"server", b"h", b"b", bytes(2 * 1024 * 1024)]
                        )

                # Every junk message is refused by the broker or by the cell it reached
                # (waited for before the attacker closes: linger 0 would discard the rest).
                def refused() -> int:
                    st = b.stats()
                    at_broker = sum(
                        v for k, v in st.items() if k.startswith(("drop_", "reg_err", "nack_"))
                    )
                    return at_broker + victim.stats["dropped_malformed"]

                wait_for(lambda: refused() >= N_JUNK, timeout=90)
                elapsed = time.monotonic() - t0
                # Normal traffic still flows after the flood.
                reply = peer.send_request(
                    "ch", "server", "echo", Message(payload="still here"), 10.0
                )
                assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK
                assert reply.payload == "still here"
            finally:
                attacker.close(linger=0)
            stats = b.stats()
            assert stats["nack_too_big"] + stats["drop_too_big"] == 1
            assert stats["errors"] == 0
            assert victim.stats["dropped_malformed"] > N_JUNK // 3  # junk did reach the cell
            growth_mib = (proc.memory_info().rss - rss_before) / 2**20
            assert growth_mib < 64, f"RSS grew {growth_mib:.0f} MiB under the flood"
            # Logging is rate-limited: a handful of lines, not one per message.
            assert len(caplog.records) < 200, len(caplog.records)
            dropped, routed_junk = (
                refused() - victim.stats["dropped_malformed"],
                victim.stats["dropped_malformed"],
            )
            print(f"{N_JUNK} junk in {elapsed:.1f}s; broker refused {dropped}, cell {routed_junk}")


class FakeCell:
    """Enough of a Cell for the downloader's handler, with no sockets."""

    fqcn = "server"

    def register_request_cb(self, *a: Any, **k: Any) -> None:
        pass

    def add_stop_callback(self, cb: Any) -> None:
        pass


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def owner_state() -> Any:
    state = _OwnerState(FakeCell())  # type: ignore[arg-type]
    yield state
    state.stop_monitor()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        values,
        st.fixed_dictionaries(
            {"ref_id": st.sampled_from(["R-live", "R-none"]) | values, "state": values}
        ),
        st.fixed_dictionaries(
            {
                "ref_id": st.just("R-live"),
                "state": st.fixed_dictionaries(
                    {},
                    optional={
                        "offset": st.integers(-(2**70), 2**70) | values,
                        "length": st.integers(-(2**70), 2**70) | values,
                        "ok": values,
                        "reason": values,
                    },
                ),
            }
        ),
    ),
    origin=st.sampled_from(["site-1", "site-2"]),
)
def test_request_handler_never_raises(owner_state: Any, payload: Any, origin: str) -> None:
    """Whatever a site sends, the owner answers with a reply; bad requests get invalid_request."""
    from objdl.downloader._tables import Ref, Transaction

    if owner_state.table.get_transaction("T-live") is None:
        tx = Transaction(ObjectProducer(chunk_size=16), 3600.0, time.monotonic(), "T-live")
        owner_state.table.add_transaction(tx)
        owner_state.table.add_ref("T-live", lambda t: Ref(t, b"0123456789" * 10, "R-live"))
    reply = owner_state.handle(Message({MessageHeaderKey.ORIGIN: origin}, payload))
    rc = reply.get_header(MessageHeaderKey.RETURN_CODE)
    assert rc in (ReturnCode.OK, ReturnCode.INVALID_REQUEST), (rc, reply.headers)
    if rc == ReturnCode.INVALID_REQUEST:
        assert reply.get_header(MessageHeaderKey.ERROR)
    state = payload.get("state") if isinstance(payload, dict) else None
    if isinstance(state, dict) and payload.get("ref_id") == "R-live":
        off = state.get("offset")
        if isinstance(off, int) and not isinstance(off, bool) and not 0 <= off <= 100:
            assert rc == ReturnCode.INVALID_REQUEST  # outside the object: named, not served
    ObjDownloader.shutdown()
