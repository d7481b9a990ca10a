"""Instructions (or CPU time) the broker process spends per routed message.

How it works: ``python -m broker`` runs in its own process, optionally under
``valgrind --tool=callgrind``; this driver connects two bare DEALERs ``a`` and ``b``,
registers them and pushes MSGs through the broker in two patterns:

- ``pingpong``: a -> b, then b -> a, one message in the broker at a time (each one a
  wake-up of the broker: what a sequential request/reply costs it);
- ``burst``: a sends ``--burst`` MSGs to b, then b reads them all (the broker drains
  them in batches: what many requests in flight cost it).

``--raw`` runs, instead of the objdl broker, the floor of a pyzmq relay: the loop of
``_raw_broker`` in bench_messaging.py (``recv_multipart``, ``send_multipart``), taught
just enough of the protocol (REG answered REG_OK, MSG forwarded with the sender's
name stamped) for the same driver to run against it.

Under callgrind the counters are zeroed before each phase and dumped after it
(``callgrind_control``), so start-up and shut-down do not count; instruction counts
are deterministic where wall-clock CPU time on a loaded machine is not. Without
``--callgrind`` it reports the broker's CPU time per message instead.

    python benchmarks/bench_broker_path.py --callgrind --messages 2000
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import queue
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq

from benchmarks._util import Child, cpu_seconds_fine
from objdl import wire
from objdl.message import Message, MessageHeaderKey, MessageType

__all__ = ["main"]

_H = MessageHeaderKey
_TIMEOUT_MS = 30_000


def _frames(dest: bytes, payload: bytes) -> list[Any]:
    headers = {
        _H.CHANNEL: "bench",
        _H.TOPIC: "echo",
        _H.REQ_ID: "r" * 22,
        _H.MSG_TYPE: MessageType.REQUEST,
    }
    return [wire.KIND_MSG, dest, *wire.encode(Message(headers, payload))]


def _dealer(ctx: zmq.Context[Any], url: str, name: bytes) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(url)
    sock.send_multipart([wire.KIND_REG, wire.PROTOCOL_VERSION, name])
    if not sock.poll(_TIMEOUT_MS):
        raise RuntimeError(f"no REG_OK for {name!r}")
    reply = sock.recv_multipart()
    if reply[0] != wire.KIND_REG_OK:
        raise RuntimeError(f"REG {name!r}: {reply!r}")
    return sock


def _recv_msg(sock: zmq.Socket[Any]) -> list[bytes]:
    """The next MSG on `sock` (HBs and other broker traffic skipped)."""
    while True:
        if not sock.poll(_TIMEOUT_MS):
            raise RuntimeError("no message from the broker")
        frames = sock.recv_multipart()
        if frames[0] == wire.KIND_MSG:
            return frames
        if frames[0] == wire.KIND_NACK:
            raise RuntimeError(f"NACK: {frames[:3]!r}")


def _pingpong(a: zmq.Socket[Any], b: zmq.Socket[Any], n: int, size: int) -> int:
    to_b, to_a = _frames(b"b", os.urandom(size)), _frames(b"a", os.urandom(size))
    for _ in range(n // 2):
        a.send_multipart(to_b, copy=False)
        _recv_msg(b)
        b.send_multipart(to_a, copy=False)
        _recv_msg(a)
    return n // 2 * 2


def _burst(a: zmq.Socket[Any], b: zmq.Socket[Any], n: int, size: int, burst: int) -> int:
    to_b = _frames(b"b", os.urandom(size))
    sent = 0
    while sent < n:
        k = min(burst, n - sent)
        for _ in range(k):
            a.send_multipart(to_b, copy=False)
        for _ in range(k):
            _recv_msg(b)
        sent += k
    return sent


def _callgrind_total(pid: int, out_prefix: str, label: str) -> int:
    """Dump the counters of callgrind run `pid`; return the instructions since the zero."""
    before = set(glob.glob(out_prefix + "*"))
    subprocess.run(
        ["callgrind_control", "--dump=" + label, str(pid)],
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in sorted(set(glob.glob(out_prefix + "*")) - before):
            with open(path) as f:
                text = f.read()
            if f"desc: Trigger: Client Request: {label}" in text or label in text:
                match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
                if match:
                    return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind dump did not appear")


def _zero(pid: int) -> None:
    subprocess.run(
        ["callgrind_control", "--zero", str(pid)],
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _start_broker(out_prefix: str | None, raw: bool) -> tuple[Child, str]:
    """The broker (or the raw relay), under callgrind unless `out_prefix` is None."""
    argv = [sys.executable]
    if raw:
        argv += ["-m", "benchmarks.bench_broker_path", "--serve-raw"]
    else:
        argv += ["-m", "broker", "--bind", "tcp://127.0.0.1:*", *_BROKER_ARGS]
    if out_prefix is not None:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_prefix}%p", *argv]
    child = Child("broker", argv)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = child._lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"broker exited at start{child._tail()}")
        if "listening on" in line:
            return child, line.rsplit(" ", 1)[-1].strip()
    child.stop()
    raise RuntimeError("broker did not start")


def _raw_relay() -> None:
    """A minimal relay of the objdl protocol, as bench_messaging's raw relay does it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind("tcp://127.0.0.1:*")
    print(f"raw relay listening on {sock.getsockopt_string(zmq.LAST_ENDPOINT)}", flush=True)
    names: dict[bytes, bytes] = {}
    peers: dict[bytes, bytes] = {}
    try:
        while True:
            peer, kind, *rest = sock.recv_multipart()
            if kind == wire.KIND_REG:
                names[rest[1]], peers[peer] = peer, rest[1]
                sock.send_multipart([peer, wire.KIND_REG_OK, rest[1]], zmq.NOBLOCK)
            elif kind == wire.KIND_MSG and peer in peers and rest[0] in names:
                out = [names[rest[0]], wire.KIND_MSG, peers[peer], *rest[1:]]
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart(out, zmq.NOBLOCK)
    finally:
        sock.close(linger=0)
        ctx.term()


# Long timeouts: a slow run under valgrind must not expire the two cells.
_BROKER_ARGS = ("--cell-timeout", "3600", "--heartbeat-interval", "60")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000, help="MSGs per phase (%(default)s)")
    p.add_argument("--size", type=int, default=100, help="payload bytes (%(default)s)")
    p.add_argument("--burst", type=int, default=100, help="MSGs per burst (%(default)s)")
    p.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    p.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR")
    p.add_argument("--raw", action="store_true", help="measure the raw pyzmq relay instead")
    p.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_raw:
        _raw_relay()
        return 0

    tmp = args.keep or tempfile.mkdtemp(prefix="objdl-cg-")
    os.makedirs(tmp, exist_ok=True)
    out_prefix = os.path.join(tmp, "callgrind.out.")
    child, url = _start_broker(out_prefix if args.callgrind else None, args.raw)
    pid = child.proc.pid
    ctx = zmq.Context()
    try:
        a, b = _dealer(ctx, url, b"a"), _dealer(ctx, url, b"b")
        try:
            _pingpong(a, b, 200, args.size)  # warm-up
            _burst(a, b, 200, args.size, args.burst)
            phases = {
                "pingpong": lambda: _pingpong(a, b, args.messages, args.size),
                "burst": lambda: _burst(a, b, args.messages, args.size, args.burst),
            }
            for name, run in phases.items():
                if args.callgrind:
                    _zero(pid)
                    n = run()
                    total = _callgrind_total(pid, out_prefix, name)
                    print(f"{name:9s} {n} MSGs: {total / n:,.0f} instructions/MSG in the broker")
                else:
                    c0, t0 = cpu_seconds_fine(pid), time.perf_counter()
                    n = run()
                    c1, t1 = cpu_seconds_fine(pid), time.perf_counter()
                    assert c0 is not None and c1 is not None
                    print(
                        f"{name:9s} {n} MSGs: {(c1 - c0) / n * 1e6:.1f} us broker CPU/MSG, "
                        f"{n / (t1 - t0):,.0f} MSG/s"
                    )
        finally:
            a.close(linger=0)
            b.close(linger=0)
    finally:
        ctx.term()
        child.stop(timeout=60.0)
        with contextlib.suppress(OSError):
            for path in [] if args.keep else glob.glob(out_prefix + "*"):
                os.unlink(path)
            if not args.keep:
                os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
