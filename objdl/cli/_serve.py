"""``objdl serve``: offer files until enough sites have them."""

from __future__ import annotations

import argparse
import contextlib
import errno
import shlex
import sys
from typing import Any

from objdl.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    check_broker_url,
    check_name,
    check_positive,
    human_size,
    stop_on_signals,
)
from objdl.cli._direct import data_options, link_report
from objdl.cli._events import Events
from objdl.cli._keys import key_options, start_cell
from objdl.cli._progress import ProgressDisplay
from objdl.cli._sources import Source, expand_sources, output_name

__all__ = ["get_line", "parse_sites", "serve"]


def parse_sites(text: str | None) -> list[str] | None:
    """``site-1,site-2`` as a list of checked names (None stays None)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CliError("--allowed-sites: give at least one cell name, e.g. site-1,site-2", 2)
    for n in names:
        check_name("--allowed-sites", n)
    return list(dict.fromkeys(names))


def get_line(ref: str, owner: str, site: str, url: str, name: str, secure: bool) -> str:
    """The ``objdl get`` command a site pastes, quoted for a POSIX shell whatever `name` is.

    ``--output=NAME`` keeps a name that starts with ``-`` from reading as an option, and
    ``--`` ends the options before the ref.
    """
    words = ["objdl", "get", "--from", owner, "--name", site, "--broker", url]
    if secure:
        words.append("--secure")
    words += [f"--output={output_name(name)}", "--", ref]
    return " ".join(shlex.quote(w) for w in words)


class _Watch:
    """Turns changes in a transaction's outcome into ``done``/``failed`` events."""

    def __init__(self, outcome: Any, events: Events) -> None:
        self.outcome = outcome
        self.events = events
        self.seen: dict[tuple[str, str], str] = {}

    def poll(self) -> None:
        for ref_id, ref in list(self.outcome.refs.items()):
            for site, rec in list(ref.sites.items()):
                state = rec.state
                if state == "in_progress" or self.seen.get((ref_id, site)) == state:
                    continue
                self.seen[(ref_id, site)] = state
                if state == "finished":
                    self.events.emit(
                        "done", ref=ref_id, site=site, bytes_sent=rec.bytes_sent, total=ref.total
                    )
                else:
                    self.events.emit(
                        "failed",
                        ref=ref_id,
                        site=site,
                        state=state,
                        reason=rec.reason,
                        bytes_sent=rec.bytes_sent,
                    )


def _check(args: argparse.Namespace) -> tuple[str, str, list[str] | None]:
    if args.name is None:
        raise CliError("--name: required (or set $OBJDL_NAME)", EXIT_USAGE)
    name = check_name("--name", args.name)
    url = check_broker_url(args.broker)
    check_positive("--timeout", args.timeout)
    check_positive("--connect-timeout", args.connect_timeout)
    if args.sites is not None and args.sites < 1:
        raise CliError(f"--sites: must be at least 1, got {args.sites}", EXIT_USAGE)
    allowed = parse_sites(args.allowed_sites)
    if allowed is not None and args.sites is not None and args.sites > len(allowed):
        raise CliError(
            f"--sites {args.sites} can never be met: --allowed-sites names only {len(allowed)}",
            EXIT_USAGE,
        )
    return name, url, allowed


def serve(args: argparse.Namespace) -> int:
    name, url, allowed = _check(args)
    keys = key_options(args, secure=args.secure)
    data = data_options(args, keys)
    with contextlib.ExitStack() as fds:  # the folders' descriptors, closed at the end
        return _serve(args, name, url, allowed, keys, data, *expand_sources(args.paths, fds))


def _serve(
    args: argparse.Namespace,
    name: str,
    url: str,
    allowed: list[str] | None,
    keys: Any,
    data: dict[str, Any],
    sources: list[Source],
    skipped: list[Any],
) -> int:
    from objdl.downloader import ObjDownloader, TransferStatus
    from objdl.objects import new_transaction, offer_file

    events = Events(args.json)
    progress = ProgressDisplay(enabled=not (args.quiet or args.json))
    labels: dict[str, str] = {}
    for s in skipped:
        if args.json:
            events.emit("skipped", path=str(s.path), reason=s.reason)
        else:
            print(f"objdl: skipping {s.path}: {s.reason}", file=sys.stderr, flush=True)

    def on_progress(ref_id: str, site: str, done: int, total: int | None, rate: float) -> None:
        key = f"{ref_id}|{site}"
        progress.update(key, f"{site} {labels.get(ref_id, ref_id)}", done, total, rate)
        events.progress(key, done, total, ref=ref_id, site=site, rate=round(rate))

    tx_kwargs: dict[str, Any] = {}
    if args.secure:
        tx_kwargs["secure"] = True
    if allowed is not None:
        tx_kwargs["allowed_sites"] = allowed
    site = allowed[0] if allowed else "site-1"
    with stop_on_signals() as stop:
        cell = start_cell(name, url, args.connect_timeout, keys, data)
        try:
            tx = new_transaction(
                cell,
                timeout=args.timeout,
                num_sites=args.sites,
                progress_cb=on_progress,
                chunk_size=args.chunk_size,
                digest=args.digest,
                **tx_kwargs,
            )
            outcome = ObjDownloader.get_outcome(tx)
            assert outcome is not None
            watch = _Watch(outcome, events)
            for src in sources:
                ref = _offer(offer_file, cell, src, tx)
                labels[ref] = src.name
                line = get_line(ref, name, site, url, src.name, args.secure)
                size = src.size()
                events.emit(
                    "offered", ref=ref, path=str(src.path), name=src.name, size=size, get=line
                )
                if not args.json:
                    print(f"ref {ref} {src.path} ({human_size(size)})", flush=True)
                    print(f"  {line}", flush=True)
            if not args.json:
                _say_serving(args, name, url, len(sources), cell.data_url)
            while outcome.wait(0.2).status == TransferStatus.RUNNING and not stop.is_set():
                watch.poll()
        finally:
            progress.close()
            cell.stop()
    watch.poll()
    stopped = stop.is_set() and outcome.status != TransferStatus.FINISHED
    status = "stopped" if stopped else outcome.status
    _summary(status, outcome, labels, events, args.json, link_report(cell) if data else None)
    if outcome.status == TransferStatus.FINISHED:
        return EXIT_OK
    if stop.is_set():
        if args.sites is None:
            return EXIT_OK  # serving until stopped was the job
        raise CliError(f"stopped before {args.sites} sites had every file", EXIT_INTERRUPTED)
    got = min((len(r.finished) for r in outcome.refs.values()), default=0)
    goal = f" {got} of {args.sites} sites have every file" if args.sites else ""
    raise CliError(
        f"gave up after {args.timeout:g}s without a download request;{goal}", kind="timeout"
    )


def _offer(offer_file: Any, cell: Any, src: Source, tx: str) -> str:
    """Offer `src`: a file from a folder is opened relative to the folder's descriptor,
    never through a symlink (one swapped in since the folder was read fails here)."""
    path, where = src.offer_args()
    try:
        ref: str = offer_file(cell, path, transaction_id=tx, **where)
    except OSError as exc:
        if where and exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CliError(
                f"cannot serve {src.path}: it (or a folder on its way) was replaced by a "
                "symlink after the folder was read; objdl does not follow it"
            ) from None
        raise CliError(f"cannot serve {src.path}: {exc.strerror or exc}") from None
    return ref


def _say_serving(
    args: argparse.Namespace, name: str, url: str, n: int, data_url: str | None
) -> None:
    if args.sites is None:
        goal = "until stopped"
    else:
        have = "sites have" if args.sites > 1 else "site has"
        goal = f"until {args.sites} {have} every file"
    extra = " (sealed requests only)" if args.secure else ""
    print(
        f"serving {n} file(s) as {name} on {url}{extra} {goal} "
        f"(gives up after {args.timeout:g}s without a request; Ctrl-C stops)",
        flush=True,
    )
    if data_url is not None:
        print(
            f"  direct links on {data_url}: sites that reach it pull the chunks from there, "
            "the others through the broker",
            flush=True,
        )
    if args.secure or args.broker_key:
        print(
            "  sites give their keys with --key/--broker-key/--peer-keys "
            "or $OBJDL_KEY/$OBJDL_BROKER_KEY/$OBJDL_PEER_KEYS",
            flush=True,
        )


def _summary(
    status: str,
    outcome: Any,
    labels: dict[str, str],
    events: Events,
    js: bool,
    direct: dict[str, Any] | None,
) -> None:
    summary = outcome.summary()
    if js:
        refs = {r: {"name": labels.get(r, r), **s} for r, s in summary.items()}
        extra = {} if direct is None else {"direct": direct}
        events.emit("summary", status=status, refs=refs, **extra)
        return
    print(f"summary ({status}):", flush=True)
    if direct is not None:
        print(
            f"  direct links on {direct['url']}: {direct['links_bound']} made, "
            f"{direct['links_refused']} refused",
            flush=True,
        )
    for ref_id, s in summary.items():
        failed = "; ".join(f"{site} ({why})" for site, why in s["failed"].items())
        refused = "; ".join(f"{site} ({code})" for site, code in s["refused"].items())
        print(
            f"  {labels.get(ref_id, ref_id)} {ref_id}: finished: {', '.join(s['finished']) or '-'}"
            + (f"; failed: {failed}" if failed else "")
            + (f"; refused: {refused}" if refused else ""),
            flush=True,
        )
