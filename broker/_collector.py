"""What a broker's ``/metrics`` says, read from the broker at scrape time.

Imported only when a broker is given ``metrics=`` (it needs ``prometheus_client``).
Every value comes from what the broker already keeps: ``Broker.stats()``'s counters,
``Broker.cells()``, and the routing table's per-peer outbound bytes, read under the
broker's lock; nothing is counted per message for it.

Which counter goes where (``broker.routing.COUNTERS``; prefixes carry over, so a
new ``drop_*`` or ``nack_*`` counter shows up under its family by itself):

=====================================  ==========================================
``routed``                             ``objdl_broker_routed_messages_total{kind="msg"}``
``routed_bytes``                       ``objdl_broker_routed_bytes_total{kind="msg"}``
``nack_REASON``                        ``objdl_broker_nacks_total{reason}``
``drop_CAUSE``                         ``objdl_broker_drops_total{cause}``
``reg_ok``, ``reg_err_WHY``            ``objdl_broker_registrations_total{result}``
``bye``, ``expired``, ``gone``,        ``objdl_broker_cells_left_total{reason}``
``evicted``
``zap_ok``, ``zap_denied``             ``objdl_broker_curve_connections_total{result}``
``deferred``, ``probes``, ``who``,     ``objdl_broker_{deferred_sends,probes,who,``
``list``, ``errors``                   ``list_requests,errors}_total``
``relay_reg_ok``, ``relay_reg_err``    ``objdl_broker_relay_registrations_total{result}``
``relay_lost``                         ``objdl_broker_relays_left_total``
``names_added``, ``names_removed``     ``objdl_broker_relay_names_total{change}``
``upstream_registered``, ``_lost``,    ``objdl_broker_upstream_events_total{event}``
``_refused``
``list_forwarded``                     ``objdl_broker_list_forwarded_total``
anything else                          ``objdl_broker_other_total{counter}``
=====================================  ==========================================
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import objdl
from broker.metrics import TOP_PEERS, RelayLink

if TYPE_CHECKING:
    from broker.server import Broker

__all__ = ["BrokerCollector", "Renderer", "queued_by_cell"]

_P = "objdl_broker_"

# (stats key or prefix, family, its label, help); a prefix ends with "_".
_LABELLED = (
    ("nack_", "nacks", "reason", "MSGs answered NACK instead of being routed, by reason."),
    ("drop_", "drops", "cause", "Messages the broker dropped without an answer, by cause."),
    ("reg_err_", "registrations", "result", "REGs answered REG_ERR, by reason (result!=ok)."),
)
_FIXED: dict[str, tuple[str, str, str]] = {
    # key: (family, label value, label name); families with one sample have no label.
    "routed": ("routed_messages", "msg", "kind"),
    "routed_bytes": ("routed_bytes", "msg", "kind"),
    "reg_ok": ("registrations", "ok", "result"),
    "bye": ("cells_left", "bye", "reason"),
    "expired": ("cells_left", "expired", "reason"),
    "gone": ("cells_left", "gone", "reason"),
    "evicted": ("cells_left", "evicted", "reason"),
    "zap_ok": ("curve_connections", "accepted", "result"),
    "zap_denied": ("curve_connections", "denied", "result"),
    "deferred": ("deferred_sends", "", ""),
    "probes": ("probes", "", ""),
    "who": ("who", "", ""),
    "list": ("list_requests", "", ""),
    "errors": ("errors", "", ""),
    "relay_reg_ok": ("relay_registrations", "ok", "result"),
    "relay_reg_err": ("relay_registrations", "refused", "result"),
    "relay_lost": ("relays_left", "", ""),
    "names_added": ("relay_names", "added", "change"),
    "names_removed": ("relay_names", "removed", "change"),
    "upstream_registered": ("upstream_events", "registered", "event"),
    "upstream_lost": ("upstream_events", "lost", "event"),
    "upstream_refused": ("upstream_events", "refused", "event"),
    "list_forwarded": ("list_forwarded", "", ""),
}
_HELP = {
    "routed_messages": "MSGs routed to their destination (net of sends that failed later).",
    "routed_bytes": "Bytes of the MSGs routed to their destination.",
    "nacks": _LABELLED[0][3],
    "drops": _LABELLED[1][3],
    "registrations": "REGs answered, by result (ok, or why the name was refused).",
    "cells_left": "Cells forgotten: bye (said so), expired (silent), gone (connection "
    "closed), evicted (did not answer a probe when another connection claimed the name).",
    "curve_connections": "CURVE connections let in (accepted) or turned away (denied).",
    "deferred_sends": "Sends libzmq refused (its pipe to the peer full) that waited here.",
    "probes": "PINGs sent to a name's holder because another connection claimed the name.",
    "who": "Heartbeats from unknown connections, answered WHO (cells of a restarted broker).",
    "list_requests": "Live-cell queries (LIST) answered.",
    "errors": "Errors in the broker's I/O thread (see its log).",
    "relay_registrations": "RREGs of relay brokers answered, by result (ok or refused).",
    "relays_left": "Relay links forgotten: silent, connection gone, or BYE.",
    "relay_names": "Cell names relays announced here (added) or withdrew (removed).",
    "upstream_events": "This relay's link to its parent: registered, lost (silence, WHO, "
    "stuck), refused (REG_ERR; it asks again).",
    "list_forwarded": "LISTs this relay asked its parent (answered for the whole tree).",
    "other": "Broker counters this version of the metrics does not name yet.",
}
_NOT_COUNTERS = frozenset({"peak_peer_bytes"})


def queued_by_cell(broker: Broker) -> tuple[dict[str, int], int, int]:
    """``({cell name: bytes outbound}, peers with bytes outbound, the per-peer bound)``:
    :meth:`broker.Broker.queued_by_cell`."""
    return broker.queued_by_cell()


class BrokerCollector(Collector):
    """A ``prometheus_client`` collector of one broker's numbers, read at each scrape.

    Counters never go down between two starts of the broker, even ``routed``, which
    the broker lowers when a send it counted fails later: each is shown as the
    highest value seen since :meth:`reset` (which the broker's start calls, with the
    counters it zeroes).
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._lock = threading.Lock()
        self._high: dict[str, int] = {}
        self._started = time.time()

    def reset(self) -> None:
        """The broker (re)started with zeroed counters."""
        with self._lock:
            self._high = {}
            self._started = time.time()

    def collect(self) -> Iterator[Any]:
        broker = self._broker
        stats = broker.stats()
        cells = len(broker.cells())
        by_cell, peers, limit = queued_by_cell(broker)
        links_of = getattr(broker, "relay_links", None)
        links: list[RelayLink] = list(links_of()) if callable(links_of) else []
        with self._lock:
            for key, value in stats.items():
                if key not in _NOT_COUNTERS:
                    self._high[key] = max(value, self._high.get(key, value))
                    stats[key] = self._high[key]
            started = self._started

        role = "relay" if any(link.direction == "up" for link in links) else "root"
        info = InfoMetricFamily("objdl_broker", "This broker: its address, role and version.")
        info.add_metric([], {"url": broker.url, "role": role, "version": objdl.__version__})
        yield info
        yield GaugeMetricFamily(
            _P + "start_time_seconds", "When the broker last started (Unix time).", started
        )
        yield GaugeMetricFamily(_P + "cells", "Live cells registered at this broker.", cells)
        yield from _counters(stats)
        yield from _queues(stats.get("peak_peer_bytes", 0), by_cell, peers, limit)
        yield from _links(links)


def _counters(stats: dict[str, int]) -> Iterator[CounterMetricFamily]:
    families: dict[str, CounterMetricFamily] = {}

    def family(name: str, label: str) -> CounterMetricFamily:
        if name not in families:
            labels = [label] if label else None
            families[name] = CounterMetricFamily(_P + name, _HELP[name], labels=labels)
        return families[name]

    for key, value in sorted(stats.items()):
        if key in _NOT_COUNTERS:
            continue
        if key in _FIXED:
            name, label_value, label = _FIXED[key]
            fam = family(name, label)
            if label:
                fam.add_metric([label_value], value)
            else:
                fam.add_metric([], value)
            continue
        for prefix, name, label, _ in _LABELLED:
            if key.startswith(prefix):
                family(name, label).add_metric([key[len(prefix) :]], value)
                break
        else:
            family("other", "counter").add_metric([key], value)
    yield from families.values()


def _queues(
    peak: int, by_cell: dict[str, int], peers: int, limit: int
) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily(
        _P + "queued_bytes",
        "Bytes the broker holds outbound for all peers now (in libzmq or waiting here).",
        sum(by_cell.values()),
    )
    yield GaugeMetricFamily(_P + "queued_peers", "Peers with bytes outbound now.", peers)
    top = GaugeMetricFamily(
        _P + "peer_queued_bytes",
        f"Bytes held outbound per cell, for the {TOP_PEERS} cells holding the most "
        '(cell="": connections that hold no name).',
        labels=["cell"],
    )
    for name, nbytes in heapq.nlargest(TOP_PEERS, by_cell.items(), key=lambda kv: kv[1]):
        top.add_metric([name], nbytes)
    yield top
    yield GaugeMetricFamily(
        _P + "peer_queue_limit_bytes",
        "The most bytes held outbound for one peer (max_peer_queue).",
        limit,
    )
    yield GaugeMetricFamily(
        _P + "peer_queue_peak_bytes",
        "The most bytes ever held outbound for one peer at once since the broker started.",
        peak,
    )


def _links(links: list[RelayLink]) -> Iterator[GaugeMetricFamily]:
    count = GaugeMetricFamily(
        _P + "relay_links",
        "Links to other brokers, by direction (up: to the parent; down: relays here) and state.",
        labels=["direction", "state"],
    )
    for direction in ("up", "down"):
        for state, up in (("connected", True), ("disconnected", False)):
            n = sum(1 for link in links if link.direction == direction and link.up == up)
            count.add_metric([direction, state], n)
    yield count
    each = GaugeMetricFamily(
        _P + "relay_link_up",
        "1 while a link to another broker is connected, else 0.",
        labels=["direction", "prefix", "url"],
    )
    for link in links:
        each.add_metric([link.direction, link.prefix, link.url], 1 if link.up else 0)
    yield each


class Renderer:
    """Renders one broker's metrics (and this process's) in the format a scraper accepts."""

    def __init__(self, broker: Broker) -> None:
        self.collector = BrokerCollector(broker)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def __call__(self, accept: str) -> tuple[bytes, str]:
        """The body and its Content-Type for a request with this Accept header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
