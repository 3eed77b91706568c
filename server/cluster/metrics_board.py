"""Every replica's `gptserve_*` metrics in one Prometheus scrape, each with a `replica` label.

Each model replica posts its registry's exposition text to one small named actor every couple of
seconds (`MetricsBoard`); the ingress's /metrics merges what is fresh there with its own router
and ingress counters. A replica that stopped posting drops out after `STALE_S` (its counters
leave with it, which Prometheus reads as the series ending). The board also tells /health and
/ready which replicas are up, their process ids and nodes.
"""

from __future__ import annotations

import time

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

POST_EVERY_S = 2.0
STALE_S = 3 * POST_EVERY_S
NAMESPACE = "gpt-serve"


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self):
        self.posts: dict[str, dict] = {}

    def post(self, replica: str, text: str, info: dict) -> None:
        self.posts[replica] = {"text": text, "at": time.time(), **info}

    def drop(self, replica: str) -> None:
        self.posts.pop(replica, None)

    def fresh(self) -> dict[str, dict]:
        now = time.time()
        return {r: p for r, p in self.posts.items() if now - p["at"] <= STALE_S}


def board_name(app_name: str) -> str:
    return f"{app_name}-metrics"


def get_board(app_name: str):
    """The app's board, created by whoever asks first. Detached, so that it outlives the replica
    that created it; the launcher kills it with the app."""
    return MetricsBoard.options(
        name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def kill_board(app_name: str) -> None:
    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace=NAMESPACE))
    except ValueError:  # never created
        pass


class _Merged:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge(posts: dict[str, str], *registries: CollectorRegistry) -> bytes:
    """The exposition of each replica's text with `replica="<id>"` added to every sample, one
    family per metric name, followed by `registries` as they are."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(posts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                merged.samples.append(s._replace(labels={**s.labels, "replica": replica}))
    out = CollectorRegistry(auto_describe=False)
    out.register(_Merged(list(families.values())))
    return generate_latest(out) + b"".join(generate_latest(r) for r in registries)
