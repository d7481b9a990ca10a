"""``objdl demo``: a broker, an owner and N site processes on this machine move one model.

How it goes: the owner (this process) starts a broker process (unless given one),
starts its cell, spawns the site processes and, while they start, builds a model (a
dict of float32 arrays) and offers it with :func:`offer_dict` in a transaction that
finishes once N sites have it. Each site says hello to the owner; once all have,
the owner sends every site the ref and the model's manifest (names, dtypes, shapes)
in one ordinary request. Each site downloads the dict, checks it against the
manifest, hashes its content and reports bytes, seconds and that hash to the owner,
which compares it with its own and prints a table. Every process started here is
ended here, by its pid.

With ``secure``, the demo runs as a real deployment would: it makes throw-away keys
in a private temporary folder (:mod:`objdl.cli._demokeys`), its broker runs CURVE with
an allow-list binding each key to its cell's name, every cell has its key pair and its
peers' public keys, the transaction is ``secure=True`` and limited to the demo's
sites, and every download and every demo request is sealed end to end. Each site
reports how many sealed replies it opened during its download; the demo fails if one
opened none or rejected any. The key folder is removed at the end, also on Ctrl-C.

With ``direct``, the owner's cell opens a data socket on 127.0.0.1 (``data_bind``):
each site takes the offer in its download's first reply and pulls the chunks over a
direct link, and reports its :meth:`~objdl.cell.Cell.link_state` at the end, which the
table shows. With ``secure`` too, that socket is a CURVE server with the demo's
allow-list, as the broker.

Sites are spawned, not forked: a ZeroMQ context and its sockets do not survive a fork.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from objdl.cell import Cell
from objdl.cli._common import EXIT_USAGE, CliError, StopFlag, stop_on_signals
from objdl.cli._demokeys import DemoKeys
from objdl.cli._keys import start_cell
from objdl.cli._progress import ProgressDisplay
from objdl.errors import ObjdlError
from objdl.message import Message, ReturnCode

__all__ = ["check_model", "make_model", "model_digest", "run", "site_main"]

CHANNEL = "objdl_demo"
HELLO, REF, RESULT = "hello", "ref", "result"
OWNER = "demo-owner"
LAYERS = 8
WIDTH = 1024
_MIB = 1024 * 1024
_REQUEST_TIMEOUT = 10.0


def site_name(index: int) -> str:
    return f"demo-site-{index}"


# ---------------------------------------------------------------- the model


def make_model(size: int, layers: int = LAYERS, seed: int = 0) -> dict[str, Any]:
    """About `size` bytes of float32 weights and biases in `layers` layers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = max(1, size // (4 * layers * (WIDTH + 1)))
    model: dict[str, Any] = {}
    for k in range(layers):
        model[f"layer{k}.weight"] = rng.standard_normal((rows, WIDTH), dtype=np.float32)
        model[f"layer{k}.bias"] = rng.standard_normal(rows, dtype=np.float32)
    return model


def model_digest(model: dict[str, Any]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of the arrays, in name order."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(model):
        a = np.ascontiguousarray(model[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def manifest_of(model: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [a.dtype.str, list(a.shape)] for k, a in model.items()}


def check_model(model: dict[str, Any], manifest: dict[str, list[Any]]) -> str:
    """'' if `model` has exactly the manifest's arrays, else what is wrong."""
    import numpy as np

    if set(model) != set(manifest):
        return f"names differ: got {len(model)}, expected {len(manifest)}"
    for key, (dtype, shape) in manifest.items():
        a = model[key]
        if not isinstance(a, np.ndarray):
            return f"{key} is a {type(a).__name__}, not an array"
        if a.dtype.str != dtype or list(a.shape) != list(shape):
            return f"{key} is {a.dtype.str}{list(a.shape)}, expected {dtype}{shape}"
    return ""


# ---------------------------------------------------------------- a site (child process)


def _sealed_stats(cell: Cell) -> tuple[int, int]:
    """(sealed messages opened, sealed messages rejected) by `cell` so far."""
    stats = cell.secure_stats
    return stats.get("opened", 0), sum(n for k, n in stats.items() if k != "opened")


def site_main(
    index: int,
    url: str,
    owner: str,
    connect_timeout: float,
    timeout: float,
    cell_kwargs: dict[str, Any] | None = None,
) -> None:
    """One site: say hello, wait for the ref, download, check, report. Runs spawned.

    With `cell_kwargs` (keys: the demo is secure), everything is sealed end to end.
    """
    from objdl.objects import DownloadError, download_dict

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner ends us, by pid
    secure = bool(cell_kwargs)
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cell = Cell(site_name(index), url, start_timeout=connect_timeout, **(cell_kwargs or {}))
    cell.register_request_cb(CHANNEL, REF, lambda req: jobs.put(req.payload))
    try:
        cell.start()
    except ObjdlError as exc:
        print(f"objdl: error: {site_name(index)}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    try:
        reply = cell.send_request(CHANNEL, owner, HELLO, Message(), _REQUEST_TIMEOUT, secure=secure)
        if reply.get_header("return_code") != ReturnCode.OK:
            raise SystemExit(1)
        job = jobs.get(timeout=timeout)
        opened, rejected = _sealed_stats(cell)
        started = time.monotonic()
        result: dict[str, Any]
        try:
            model = download_dict(
                cell,
                owner,
                job["ref"],
                per_request_timeout=30.0,
                overall_timeout=timeout,
                secure=secure,
            )
        except DownloadError as exc:
            result = {"error": exc.reason}
        else:
            seconds = time.monotonic() - started
            result = {
                "bytes": sum(a.nbytes for a in model.values()),
                "seconds": seconds,
                "problem": check_model(model, job["manifest"]),
                "digest": model_digest(model),
            }
        result["link"] = cell.link_state(owner)
        now_opened, now_rejected = _sealed_stats(cell)
        result["sealed"] = now_opened - opened  # sealed replies opened while downloading
        result["rejected"] = now_rejected - rejected
        cell.send_request(
            CHANNEL, owner, RESULT, Message(payload=result), _REQUEST_TIMEOUT, secure=secure
        )
    except queue.Empty:
        raise SystemExit(1) from None
    finally:
        cell.stop()


# ---------------------------------------------------------------- the owner


class _Board:
    """What the sites told the owner: who said hello, and each one's result."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.hello: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()

    def on_hello(self, request: Message) -> None:
        with self._cond:
            self.hello.add(request.get_header("origin"))
            self._cond.notify_all()

    def on_result(self, request: Message) -> None:
        site = request.get_header("origin")
        if site in self.names and isinstance(request.payload, dict):
            with self._cond:
                self.results[site] = request.payload
                self._cond.notify_all()

    def wait(self, what: str, deadline: float, stop: StopFlag, procs: list[BaseProcess]) -> None:
        """Until every site has said hello (or reported); CliError if one cannot."""
        while True:
            with self._cond:
                got = self.hello if what == "hello" else set(self.results)
                if set(self.names) <= got:
                    return
                self._cond.wait(0.1)
            if stop.is_set():
                raise CliError("stopped", 130)
            for p in procs:
                if p.exitcode is not None and p.name not in got:
                    raise CliError(f"{p.name} exited (status {p.exitcode}) before its {what}")
            if time.monotonic() > deadline:
                missing = sorted(set(self.names) - got)
                raise CliError(f"no {what} from {', '.join(missing)} in time")


def _start_broker(timeout: float, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    import broker

    # The same broker code as ours, whatever the working folder; its own session, so
    # a Ctrl-C at the terminal reaches only us and we end it, by pid, in order.
    env = dict(os.environ)
    root = str(Path(broker.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "--bind", "tcp://127.0.0.1:*", *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        _end_process(proc.pid, proc)
        raise CliError(f"the demo's broker did not start within {timeout:g}s")
    return proc, line.split("listening on ", 1)[1].split()[0]


def _end_process(pid: int, proc: subprocess.Popen[str] | BaseProcess, grace: float = 5.0) -> None:
    """Terminate one process we started, by its pid; kill it if it lingers."""
    alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
        if proc.stdout is not None:
            proc.stdout.close()
    else:
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join(grace)
        proc.close()


def run(
    *,
    sites: int,
    size: int,
    broker_url: str | None,
    connect_timeout: float,
    timeout: float,
    show_progress: bool = True,
    secure: bool = False,
    direct: bool = False,
) -> int:
    """Run the demo; print the table; 0 only if every site's digest matched (and, with
    `secure`, every site's download was sealed end to end).

    With `direct`, the owner offers the sites a direct link to a data socket on
    127.0.0.1; the table says which site's link was up.
    """
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise CliError("objdl demo needs numpy: python -m pip install numpy") from None
    from objdl.objects import new_transaction, offer_dict

    wall = time.monotonic()
    deadline = wall + timeout
    names = [site_name(i) for i in range(1, sites + 1)]
    board = _Board(names)
    procs: list[BaseProcess] = []
    broker: subprocess.Popen[str] | None = None
    progress = ProgressDisplay(enabled=show_progress)
    keys: DemoKeys | None = None
    with stop_on_signals() as stop:
        try:
            if secure:
                keys = _make_keys(names)
            if broker_url is None:
                broker, broker_url = _start_broker(
                    connect_timeout, keys.broker_args() if keys else []
                )
            cell = start_cell(
                OWNER,
                broker_url,
                connect_timeout,
                keys.options(OWNER) if keys else None,
                {"data_bind": "tcp://127.0.0.1:*"} if direct else None,
            )
            try:
                cell.register_request_cb(CHANNEL, HELLO, board.on_hello)
                cell.register_request_cb(CHANNEL, RESULT, board.on_result)
                ctx = multiprocessing.get_context("spawn")
                for i, name in enumerate(names, 1):
                    p: BaseProcess = ctx.Process(
                        target=site_main,
                        args=(
                            i,
                            broker_url,
                            OWNER,
                            connect_timeout,
                            timeout,
                            keys.cell_kwargs(name) if keys else None,
                        ),
                        name=name,
                    )
                    p.start()
                    procs.append(p)
                model = make_model(size)  # while the sites start
                digest = model_digest(model)
                nbytes = sum(a.nbytes for a in model.values())
                how = " (CURVE, sealed end to end)" if secure else ""
                if direct:
                    how += f", chunks over direct links to {cell.data_url}"
                print(
                    f"demo: {OWNER} offers a model of {len(model)} float32 arrays, "
                    f"{nbytes / _MIB:.1f} MiB, to {sites} site processes via {broker_url}{how}",
                    flush=True,
                )
                tx = new_transaction(
                    cell,
                    timeout=timeout,
                    num_sites=sites,
                    allowed_sites=names,
                    progress_cb=lambda ref, site, done, total, rate: progress.update(
                        site, site, done, total, rate
                    ),
                    secure=secure,
                )
                ref = offer_dict(cell, model, transaction_id=tx, secure=secure)
                board.wait("hello", deadline, stop, procs)
                job = Message(payload={"ref": ref, "manifest": manifest_of(model)})
                replies = cell.broadcast_request(
                    CHANNEL, REF, names, job, _REQUEST_TIMEOUT, secure=secure
                )
                for site, reply in replies.items():
                    rc = reply.get_header("return_code")
                    if rc != ReturnCode.OK:
                        raise CliError(f"could not give {site} the ref: {rc}")
                board.wait("result", deadline, stop, procs)
                progress.close()
                for p in procs:  # they exit once their report is answered
                    p.join(max(0.1, min(5.0, deadline - time.monotonic())))
            finally:
                progress.close()
                cell.stop()
        finally:
            for p in procs:
                if p.pid is not None:
                    _end_process(p.pid, p)
            if broker is not None:
                _end_process(broker.pid, broker)
            if keys is not None:
                keys.remove()
    return _report(board, digest, time.monotonic() - wall, secure, direct)


def _make_keys(names: list[str]) -> DemoKeys:
    try:
        import cryptography  # noqa: F401  (sealing needs it; say so before any key is made)
    except ImportError:
        raise CliError(
            "objdl demo --secure needs the cryptography package: "
            "python -m pip install cryptography",
            EXIT_USAGE,
            kind="secure_unavailable",
        ) from None
    return DemoKeys([OWNER, *names])


def _sealed_verdict(r: dict[str, Any]) -> str:
    sealed, rejected = r.get("sealed"), r.get("rejected")
    if not isinstance(sealed, int) or not isinstance(rejected, int):
        return "no: not reported"
    if rejected:
        return f"no: {rejected} rejected"
    return f"{sealed} replies" if sealed > 0 else "no: none"


def _link_verdict(r: dict[str, Any]) -> str:
    link = r.get("link")
    if not isinstance(link, str):
        return "no: not reported"
    return "yes" if link == "up" else f"no: {link}"


def _report(
    board: _Board, digest: str, wall: float, secure: bool = False, direct: bool = False
) -> int:
    # Columns: the site (left), numbers (right), then words (left): sealed, direct, digest ok.
    head: tuple[str, ...] = ("site", "MiB", "seconds", "MiB/s")
    words: tuple[str, ...] = (*(("sealed",) if secure else ()), *(("direct",) if direct else ()))
    head = (*head, *words, "digest ok")
    rows: list[tuple[str, ...]] = [head]
    ok_all = True
    for site in board.names:
        r = board.results[site]
        said: tuple[str, ...] = ()
        if secure:
            said = (_sealed_verdict(r),)
            ok_all = ok_all and not said[0].startswith("no")
        if direct:  # a link not up is reported, not a failure: the broker carried the chunks
            said = (*said, _link_verdict(r))
        if "error" in r:
            ok_all = False
            rows.append((site, "-", "-", "-", *said, f"no: {r['error']}"))
            continue
        ok = r["digest"] == digest and not r["problem"]
        ok_all = ok_all and ok
        mib, secs = r["bytes"] / _MIB, r["seconds"]
        verdict = "yes" if ok else f"no: {r['problem'] or 'digest differs'}"
        rate = f"{mib / max(secs, 1e-9):.1f}"
        rows.append((site, f"{mib:.1f}", f"{secs:.2f}", rate, *said, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    n_nums = 3
    for row in rows:
        line = [row[0].ljust(widths[0])]
        line += [row[i].rjust(widths[i]) for i in range(1, 1 + n_nums)]
        line += [row[i].ljust(widths[i]) for i in range(1 + n_nums, len(row) - 1)]
        print("  ".join([*line, row[-1]]), flush=True)
    total = sum(r.get("bytes", 0) for r in board.results.values()) / _MIB
    slowest = max((r.get("seconds", 0.0) for r in board.results.values()), default=0.0)
    print(
        f"{len(board.names)} sites, {total:.1f} MiB in all, slowest site {slowest:.2f}s "
        f"({total / max(slowest, 1e-9):.1f} MiB/s together); wall time {wall:.1f}s",
        flush=True,
    )
    if secure:
        print(
            "secure: CURVE on every connection (keys bound to names), the transaction "
            "secure=True, every request and reply sealed end to end; the keys are removed",
            flush=True,
        )
    if direct:
        print(
            "direct: yes = the site's link to the owner's data socket was up; from then on "
            "its chunks skipped the broker, which carried the first reply (with the offer)",
            flush=True,
        )
    if not ok_all:
        what = "intact and sealed" if secure else "intact"
        raise CliError(f"some sites did not get the model {what} (see the table)")
    return 0
