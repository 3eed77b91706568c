"""The ingress process's own metrics: the router's decisions and the replica failures it saw.

Used as `ingress_metrics.NAME` (module attribute lookups): Ray pickles deployment classes by
value, and a copy of these objects would count where /metrics never looks.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()
DECISIONS = Counter(
    "gptserve_router_decisions_total",
    "Requests routed, by what decided the replica: affinity, overloaded, new or busy",
    ["decision"],
    registry=REGISTRY,
)
MATCHED = Counter(
    "gptserve_router_matched_chars_total",
    "Prompt characters found cached on the replica a request was sent to",
    registry=REGISTRY,
)
REPLICA_FAILURES = Counter(
    "gptserve_ingress_replica_failures_total",
    "Requests whose replica failed: before its first byte (retried elsewhere) or mid-stream",
    ["when"],
    registry=REGISTRY,
)
