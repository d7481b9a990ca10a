"""``objdl serve``, ``objdl get`` and ``objdl cells``."""

from __future__ import annotations

import argparse
import secrets
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from objdl.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    StopFlag,
    check_broker_url,
    check_destination,
    check_name,
    check_positive,
    check_source,
    human_size,
    start_cell,
    stop_on_signals,
)
from objdl.cli._progress import ProgressDisplay
from objdl.errors import CellError

__all__ = ["cells", "get", "serve"]


def serve(args: argparse.Namespace) -> int:
    from objdl.downloader import ObjDownloader, TransferStatus
    from objdl.objects import new_transaction, offer_file

    name = check_name("--name", args.name)
    url = check_broker_url(args.broker)
    check_positive("--timeout", args.timeout)
    check_positive("--connect-timeout", args.connect_timeout)
    if args.sites is not None and args.sites < 1:
        raise CliError(f"--sites: must be at least 1, got {args.sites}", EXIT_USAGE)
    paths = [Path(p) for p in args.paths]
    for p in paths:
        check_source(p)

    progress = ProgressDisplay(enabled=not args.quiet)
    labels: dict[str, str] = {}

    def on_progress(ref_id: str, site: str, done: int, total: int | None, rate: float) -> None:
        label = f"{site} {labels.get(ref_id, ref_id)}"
        progress.update(f"{ref_id}|{site}", label, done, total, rate)

    with stop_on_signals() as stop:
        cell = start_cell(name, url, args.connect_timeout)
        try:
            tx = new_transaction(
                cell, timeout=args.timeout, num_sites=args.sites, progress_cb=on_progress
            )
            outcome = ObjDownloader.get_outcome(tx)
            assert outcome is not None
            for p in paths:
                try:
                    ref = offer_file(cell, p, transaction_id=tx)
                except OSError as exc:
                    raise CliError(f"cannot serve {p}: {exc.strerror or exc}") from None
                labels[ref] = p.name
                get = (
                    f"objdl get {ref} --from {shlex.quote(name)} --name site-1 "
                    f"--broker {shlex.quote(url)} -o {shlex.quote(p.name)}"
                )
                print(f"ref {ref} {p} ({human_size(p.stat().st_size)})", flush=True)
                print(f"  {get}", flush=True)
            if args.sites is None:
                goal = "until stopped"
            else:
                have = "sites have" if args.sites > 1 else "site has"
                goal = f"until {args.sites} {have} every file"
            print(
                f"serving {len(paths)} file(s) as {name} on {url} {goal} "
                f"(gives up after {args.timeout:g}s without a request; Ctrl-C stops)",
                flush=True,
            )
            while outcome.wait(0.2).status == TransferStatus.RUNNING and not stop.is_set():
                pass
        finally:
            progress.close()
            cell.stop()
    stopped = stop.is_set() and outcome.status != TransferStatus.FINISHED
    _print_summary("stopped" if stopped else outcome.status, outcome, labels)
    if outcome.status == TransferStatus.FINISHED:
        return EXIT_OK
    if stop.is_set():
        if args.sites is None:
            return EXIT_OK  # serving until stopped was the job
        raise CliError(f"stopped before {args.sites} sites had every file", EXIT_INTERRUPTED)
    got = min((len(r.finished) for r in outcome.refs.values()), default=0)
    goal = f" {got} of {args.sites} sites have every file" if args.sites else ""
    raise CliError(f"gave up after {args.timeout:g}s without a download request;{goal}")


def _print_summary(status: str, outcome: Any, labels: dict[str, str]) -> None:
    print(f"summary ({status}):", flush=True)
    for ref_id, s in outcome.summary().items():
        failed = "; ".join(f"{site} ({why})" for site, why in s["failed"].items())
        print(
            f"  {labels.get(ref_id, ref_id)} {ref_id}: finished: {', '.join(s['finished']) or '-'}"
            + (f"; failed: {failed}" if failed else ""),
            flush=True,
        )


def get(args: argparse.Namespace) -> int:
    from objdl.message import Signal
    from objdl.objects import DownloadError, download_file

    name = check_name("--name", args.name)
    owner = check_name("--from", args.from_)
    url = check_broker_url(args.broker)
    if not args.ref.strip():
        raise CliError("REF: must not be empty", EXIT_USAGE)
    for opt, value in (
        ("--connect-timeout", args.connect_timeout),
        ("--request-timeout", args.request_timeout),
        ("--overall-timeout", args.overall_timeout),
    ):
        check_positive(opt, value)
    if args.tries < 1:
        raise CliError(f"--tries: must be at least 1, got {args.tries}", EXIT_USAGE)
    dest = Path(args.output)
    check_destination(dest)

    progress = ProgressDisplay(enabled=not args.quiet)
    abort = Signal()
    ended = threading.Event()

    def watch(stop: StopFlag) -> None:  # turns a signal into the download's abort
        while not ended.wait(0.05):
            if stop.is_set():
                abort.trigger()
                return

    with stop_on_signals() as stop:
        cell = start_cell(name, url, args.connect_timeout)
        watcher = threading.Thread(target=watch, args=(stop,), name="objdl-cli-abort")
        watcher.start()
        started = time.monotonic()
        try:
            download_file(
                cell,
                owner,
                args.ref,
                dest,
                per_request_timeout=args.request_timeout,
                overall_timeout=args.overall_timeout,
                tries=args.tries,
                abort_signal=abort,
                progress_cb=lambda ref, done, total, rate: progress.update(
                    ref, dest.name, done, total, rate
                ),
            )
        except DownloadError as exc:
            if abort.triggered:
                raise CliError("stopped; nothing was written", EXIT_INTERRUPTED) from None
            raise CliError(str(exc)) from None
        except OSError as exc:
            raise CliError(f"-o {dest}: {exc}") from None
        finally:
            progress.close()
            ended.set()
            watcher.join(1.0)
            cell.stop()
    seconds = time.monotonic() - started
    size = dest.stat().st_size
    print(
        f"saved {dest} ({human_size(size)}, digest verified) in {seconds:.2f}s, "
        f"{human_size(size / max(seconds, 1e-9))}/s",
        flush=True,
    )
    return EXIT_OK


def cells(args: argparse.Namespace) -> int:
    url = check_broker_url(args.broker)
    prefix = check_name("--prefix", args.prefix) if args.prefix else ""
    check_positive("--connect-timeout", args.connect_timeout)
    me = f"objdl-cli-{secrets.token_hex(4)}"
    cell = start_cell(me, url, args.connect_timeout)
    try:
        names = cell.list_cells(prefix, timeout=args.connect_timeout)
    except CellError as exc:
        raise CliError(str(exc)) from None
    finally:
        cell.stop()
    for n in names:
        if n != me:
            print(n)
    return EXIT_OK
