"""The objdl broker: a ZeroMQ ROUTER that routes messages between cells by name."""

from __future__ import annotations

from broker.metrics import MetricsUnavailableError
from broker.routing import RoutingTable
from broker.server import Broker, BrokerError

__all__ = ["Broker", "BrokerError", "MetricsUnavailableError", "RoutingTable"]
