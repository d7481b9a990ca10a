"""``objdl get`` and ``objdl cells`` (``objdl serve`` is in :mod:`objdl.cli._serve`)."""

from __future__ import annotations

import argparse
import secrets
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
    human_size,
    stop_on_signals,
)
from objdl.cli._direct import DIRECT_SAID, link_used
from objdl.cli._events import Events
from objdl.cli._keys import key_options, start_cell
from objdl.cli._progress import ProgressDisplay
from objdl.cli._serve import serve
from objdl.errors import CellError

__all__ = ["cells", "get", "serve"]


def _check_get(args: argparse.Namespace) -> tuple[str, str, str]:
    if args.name is None:
        raise CliError("--name: required (or set $OBJDL_NAME)", EXIT_USAGE)
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
    for opt, n in (("--tries", args.tries), ("--window", args.window)):
        if n is not None and n < 1:
            raise CliError(f"{opt}: must be at least 1, got {n}", EXIT_USAGE)
    return name, owner, url


def get(args: argparse.Namespace) -> int:
    from objdl.downloader.sized import MAX_CHUNK_SIZE
    from objdl.message import Signal
    from objdl.objects import DownloadError, download_file

    name, owner, url = _check_get(args)
    if args.chunk_size is not None and args.chunk_size > MAX_CHUNK_SIZE:
        raise CliError(
            f"--chunk-size: at most {human_size(MAX_CHUNK_SIZE)}, got {args.chunk_size}", EXIT_USAGE
        )
    keys = key_options(args, secure=args.secure)
    dest = Path(args.output)
    check_destination(dest)

    events = Events(args.json)
    progress = ProgressDisplay(enabled=not (args.quiet or args.json))
    abort = Signal()
    ended = threading.Event()

    def on_progress(ref: str, done: int, total: int | None, rate: float) -> None:
        progress.update(ref, dest.name, done, total, rate)
        events.progress(ref, done, total, ref=ref, rate=round(rate))

    def watch(stop: StopFlag) -> None:  # turns a signal into the download's abort
        while not ended.wait(0.05):
            if stop.is_set():
                abort.trigger()
                return

    options: dict[str, Any] = {}
    for opt in ("window", "chunk_size", "max_size"):
        if getattr(args, opt) is not None:
            options[opt] = getattr(args, opt)
    if args.secure:
        options["secure"] = True
    extra = {"direct_links": False} if args.no_direct else None
    with stop_on_signals() as stop:
        cell = start_cell(name, url, args.connect_timeout, keys, extra)
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
                resume=args.resume,
                progress_cb=on_progress,
                **options,
            )
        except DownloadError as exc:
            events.emit("failed", ref=args.ref, reason=exc.reason, resume=args.resume)
            if abort.triggered:
                if args.resume:
                    raise CliError(
                        "stopped; what arrived is kept: run the same command to continue",
                        EXIT_INTERRUPTED,
                    ) from None
                raise CliError("stopped; nothing was written", EXIT_INTERRUPTED) from None
            raise CliError(str(exc)) from None
        except OSError as exc:
            raise CliError(f"-o {dest}: {exc}") from None
        finally:
            direct = link_used(cell, owner)  # before stop(), which closes the links
            progress.close()
            ended.set()
            watcher.join(1.0)
            cell.stop()
    seconds = time.monotonic() - started
    size = dest.stat().st_size
    rate = size / max(seconds, 1e-9)
    events.emit(
        "done",
        ref=args.ref,
        path=str(dest),
        size=size,
        seconds=round(seconds, 3),
        rate=round(rate),
        digest_verified=True,
        direct=direct,
    )
    if not args.json:
        how = DIRECT_SAID.get(direct, "")
        print(
            f"saved {dest} ({human_size(size)}, digest verified{how}) in {seconds:.2f}s, "
            f"{human_size(rate)}/s",
            flush=True,
        )
    return EXIT_OK


def cells(args: argparse.Namespace) -> int:
    url = check_broker_url(args.broker)
    prefix = check_name("--prefix", args.prefix) if args.prefix else ""
    me = check_name("--name", args.name) if args.name else f"objdl-cli-{secrets.token_hex(4)}"
    check_positive("--connect-timeout", args.connect_timeout)
    keys = key_options(args)
    cell = start_cell(me, url, args.connect_timeout, keys)
    try:
        names = cell.list_cells(prefix, timeout=args.connect_timeout)
        # One broker answers for all of them today; with relays, each cell's own.
        on = cell.broker_url
    except CellError as exc:
        raise CliError(str(exc)) from None
    finally:
        cell.stop()
    shown = [n for n in names if n != me]
    events = Events(args.json)
    for n in shown:
        if args.json:
            events.emit("cell", name=n, broker=on)
        else:
            print(f"{n}\t{on}")  # the name first: `cut -f1` and `read name _` keep working
    events.emit("summary", count=len(shown), prefix=prefix, broker=on)
    return EXIT_OK
