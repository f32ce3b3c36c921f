"""The proxy's Prometheus metrics (GET /metrics): per node, requests in flight, requests sent, failures
and health; routing decisions by strategy and branch, with how much of a request's prefix its node had
seen (cache_aware); retries; and the errors the proxy answered itself. Per-node gauges are read from
the registry when scraped, so they cannot drift from it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from serving.proxy.nodes import NodeRegistry
from serving.proxy.routing import Choice

MATCH_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class ProxyMetrics:
    def __init__(self, nodes: NodeRegistry):
        self.registry = CollectorRegistry()
        self.requests = Counter("xlserve:proxy_node_requests", "Requests sent to each node (retries too).", ["node"],
                                registry=self.registry)
        self.failures = Counter(
            "xlserve:proxy_node_failures",
            "Failures counted against a node: connect (or connection lost), timeout, server_error (5xx), "
            "stream (lost mid-stream). 4xx answers never count.",
            ["node", "kind"],
            registry=self.registry,
        )
        self.decisions = Counter("xlserve:proxy_routing_decisions", "Routing decisions, by strategy and branch.",
                                 ["strategy", "branch"], registry=self.registry)
        self.match = Histogram("xlserve:proxy_prefix_match_ratio",
                               "cache_aware: share of a request's prompt pages its node's recent traffic held.",
                               buckets=MATCH_BUCKETS, registry=self.registry)
        self.retries = Counter("xlserve:proxy_retries", "Requests sent to a second node, by why the first failed.",
                               ["reason"], registry=self.registry)
        self.errors = Counter("xlserve:proxy_errors", "Error answers the proxy itself gave, by code.", ["code"],
                              registry=self.registry)
        self.registry.register(_NodeGauges(nodes))
        ProcessCollector(registry=self.registry)

    def routed(self, choice: Choice) -> None:
        self.decisions.labels(choice.strategy, choice.branch).inc()
        if choice.match is not None:
            self.match.observe(choice.match)
        self.requests.labels(choice.node.url).inc()

    def exposition(self, accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _NodeGauges:
    def __init__(self, nodes: NodeRegistry):
        self.nodes = nodes

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("xlserve:proxy_node_requests_in_flight", "Requests relayed to each node "
                                      "and not finished.", labels=["node"])
        healthy = GaugeMetricFamily("xlserve:proxy_node_healthy", "1 while a node is in rotation.", labels=["node"])
        for node in self.nodes:
            in_flight.add_metric([node.url], node.in_flight)
            healthy.add_metric([node.url], int(node.healthy))
        yield in_flight
        yield healthy
