"""Merging every replica's metrics into one scrape with a replica label."""

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.metrics_board import merge
from server.metrics import Metrics


def _exposition(tokens: int) -> str:
    m = Metrics()
    m.requests_total.labels(endpoint="/v1/completions", status="200").inc(tokens)
    body, _ = m.render()
    return body.decode()


def test_each_replica_sample_gets_its_replica_label_in_one_family():
    extra = CollectorRegistry()
    Counter("gptserve_router_decisions_total", "d", ["decision"], registry=extra).labels("affinity").inc()
    text = merge({"r1": _exposition(2), "r2": _exposition(5)}, extra).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["gptserve_requests"].samples if s.name == "gptserve_requests_total"]
    assert {(s.labels["replica"], s.value) for s in requests} == {("r1", 2.0), ("r2", 5.0)}
    assert text.count("# TYPE gptserve_requests_total counter") == 1
    decisions = families["gptserve_router_decisions"].samples
    assert any(s.labels == {"decision": "affinity"} and s.value == 1.0 for s in decisions)


def test_histograms_keep_their_buckets_per_replica():
    m = Metrics()
    m.time_to_first_token_seconds.observe(0.2)
    text = merge({"r1": m.render()[0].decode()}).decode()
    assert 'gptserve_time_to_first_token_seconds_bucket{le="0.25",replica="r1"} 1.0' in text


def test_no_replicas_is_an_empty_but_valid_scrape():
    assert list(text_string_to_metric_families(merge({}).decode())) == []
