"""Whether a benchmark's "direct" run really took objdl's direct owner->site link.

Why: a site falls back to the broker, silently, whenever the link cannot be made or
goes down (that is the library's job); a benchmark row labelled "direct" whose bytes
went through the broker would be a false figure. So each such run is checked from two
sides, and fails loudly when either says the link was not used:

- the broker: the objdl brokers of :mod:`benchmarks.bench_peers` and
  :mod:`benchmarks.bench_download` run with ``--metrics`` (Prometheus, on a free
  loopback port; it costs nothing until scraped), and after the transfer the parent
  reads ``objdl_broker_routed_bytes_total``: the bytes of every MSG the broker routed.
  A direct run passes only if that is at most :data:`MAX_BROKER_SHARE` of the bytes
  moved (sites x size). Some bytes always go that way: the first reply of each site
  (which carries the offer and its first chunk) and the requests sent, and answered,
  before the link is up;
- each site: it reports its cell's ``link_state(owner)`` and ``link_stats`` when its
  download ends (:func:`link_report`); every site's link must be ``up`` then, opened
  once, with none failed or lost.

The broker's figure is also shown for the runs through the broker (about 100%), so a
table compares the two paths by what crossed the broker, not only by speed.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

from benchmarks._util import Child, ChildError, _await_line, start_objdl_broker

__all__ = [
    "DATA_BIND",
    "MAX_BROKER_SHARE",
    "broker_share",
    "direct_problem",
    "link_report",
    "metrics_missing",
    "routed_bytes",
    "start_metered_broker",
]

DATA_BIND = "tcp://127.0.0.1:*"  # the owner's data socket: loopback, a port chosen at start
MAX_BROKER_SHARE = 0.5  # a direct run: at most this share of the bytes moved via the broker
_ROUTED = re.compile(r'^objdl_broker_routed_bytes_total\{kind="msg"\}\s+(\S+)\s*$', re.M)


def metrics_missing() -> str | None:
    """Why the broker's routed bytes cannot be read here, or None when they can."""
    if importlib.util.find_spec("prometheus_client") is None:
        return (
            "needs prometheus_client to check, through the broker's --metrics, that the bytes "
            "took the direct link: pip install -e '.[bench]' (or pip install prometheus_client)"
        )
    return None


def start_metered_broker(timeout: float = 10.0) -> tuple[Child, str, str | None]:
    """Run ``python -m broker`` on a free loopback port, with ``--metrics`` when it can;
    return the child, its url and its metrics url (None without prometheus_client)."""
    if metrics_missing() is not None:
        child, url = start_objdl_broker(timeout=timeout)
        return child, url, None
    child, url = start_objdl_broker(("--metrics", "127.0.0.1:0"), timeout)
    line = _await_line(child, "objdl broker's metrics", "metrics at", timeout)  # stops it if not
    return child, url, line.rsplit(" ", 1)[-1].strip()


def routed_bytes(metrics_url: str | None, timeout: float = 10.0) -> int | None:
    """The bytes of the MSGs the broker at `metrics_url` has routed, or None (no url).

    Raises:
        ChildError: the broker did not answer, or its page has no such counter.
    """
    if metrics_url is None:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(metrics_url, timeout=timeout) as page:
            text = page.read().decode("utf-8", "replace")
    except OSError as exc:
        raise ChildError(
            f"objdl-broker: its metrics at {metrics_url} did not answer: {exc}"
        ) from exc
    found = _ROUTED.search(text)
    if found is None:
        raise ChildError(
            f"objdl-broker: no objdl_broker_routed_bytes_total at {metrics_url}: a broker "
            "of another version? (benchmarks/_direct.py reads that counter)"
        )
    return int(float(found.group(1)))


def link_report(cell: Any, owner: str) -> dict[str, Any]:
    """In a site: its cell's direct link to `owner`, as :func:`direct_problem` reads it."""
    return {"state": cell.link_state(owner), **cell.link_stats}


def broker_share(routed: int | None, moved: int) -> float | None:
    """The share of the bytes moved that the broker routed (None: not measured)."""
    return None if routed is None or moved <= 0 else routed / moved


def direct_problem(routed: int | None, moved: int, links: Sequence[Any]) -> str:
    """Why a direct run did not take the direct link, or ``""`` when it did.

    `routed`: the broker's routed bytes during the run (None: not measured, a problem
    too: the run proves nothing); `moved`: sites x size; `links`: each site's
    :func:`link_report` (None for a site that sent none).
    """
    why: list[str] = []
    for i, link in enumerate(links):
        site = f"site-{i + 1}"
        if not isinstance(link, dict):
            why.append(f"{site} did not report its link")
            continue
        if not link.get("links_opened"):
            why.append(f"{site} opened no link")
        elif link.get("state") != "up":
            why.append(f"{site}'s link was {link.get('state')!r} at the end, not 'up'")
        bad = {k: link.get(k) for k in ("links_failed", "links_lost") if link.get(k)}
        if bad:
            why.append(f"{site}'s links: {', '.join(f'{k} {v}' for k, v in bad.items())}")
    share = broker_share(routed, moved)
    if share is None:
        why.append("the broker's routed bytes were not read (" + (metrics_missing() or "?") + ")")
    elif share > MAX_BROKER_SHARE:
        why.append(
            f"the broker routed {100 * share:.0f}% of the bytes moved "
            f"(at most {100 * MAX_BROKER_SHARE:.0f}% for a direct run; the first reply and "
            "the requests sent before the link is up go through it: a file of not many more "
            "chunks than the window never reaches the link)"
        )
    if not why:
        return ""
    text = "direct link not used: " + "; ".join(why)
    print(f"  !! {text}", file=sys.stderr, flush=True)
    return text
