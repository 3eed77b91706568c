"""Prometheus metrics for the server, all named `gptserve_*`.

Each `Metrics` owns its own `CollectorRegistry` (unless given one), so several apps in one process
(tests) never collide on metric names. The engine updates everything except `requests_total`,
which the HTTP layer counts per route and status code.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latencies on a 2-core CPU range from milliseconds (one decode step of a tiny model) to minutes
# (a long generation queued behind a full batch), so the buckets span that whole range.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
_ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "gptserve_requests_total",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_finished_total = Counter(
            "gptserve_request_finished_total",
            "Generation requests finished, by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "gptserve_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "gptserve_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency_seconds = Histogram(
            "gptserve_e2e_request_latency_seconds",
            "From submission to the last token (or cancellation)",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "gptserve_queue_wait_seconds",
            "From submission to getting a KV-cache slot",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.requests_waiting = Gauge(
            "gptserve_requests_waiting", "Requests queued for a KV-cache slot", registry=r
        )
        self.requests_running = Gauge(
            "gptserve_requests_running",
            "Requests holding a KV-cache slot (prefilling or decoding)",
            registry=r,
        )
        self.kv_slots_used = Gauge("gptserve_kv_slots_used", "KV-cache rows in use", registry=r)
        self.prompt_tokens_total = Counter(
            "gptserve_prompt_tokens_total",
            "Prompt tokens of admitted requests (cached ones included)",
            registry=r,
        )
        self.prompt_tokens_cached_total = Counter(
            "gptserve_prompt_tokens_cached_total",
            "Prompt tokens taken from the prefix cache, not prefilled",
            registry=r,
        )
        self.prefix_cache_lookups_total = Counter(
            "gptserve_prefix_cache_lookups_total",
            "Admitted requests that looked for a cached prompt prefix",
            registry=r,
        )
        self.prefix_cache_hits_total = Counter(
            "gptserve_prefix_cache_hits_total",
            "Admitted requests that reused a cached prompt prefix",
            registry=r,
        )
        self.generation_tokens_total = Counter(
            "gptserve_generation_tokens_total", "Tokens generated", registry=r
        )
        self.constrained_requests_total = Counter(
            "gptserve_constrained_requests_total",
            "Requests whose output is constrained, by kind (json_schema, regex, choice, grammar)",
            ["kind"],
            registry=r,
        )
        self.constraint_compile_seconds = Histogram(
            "gptserve_constraint_compile_seconds",
            "Compiling a constraint that was not cached",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "gptserve_batch_size", "Rows in each batched decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.spec_draft_tokens_total = Counter(
            "gptserve_spec_draft_tokens_total",
            "Tokens drafted for speculative decoding and verified, by source (ngram, prediction)",
            ["source"],
            registry=r,
        )
        self.spec_accepted_tokens_total = Counter(
            "gptserve_spec_accepted_tokens_total",
            "Drafted tokens that were kept (the model chose them), by source",
            ["source"],
            registry=r,
        )
        self.spec_accepted_length = Histogram(
            "gptserve_spec_accepted_length",
            "Drafted tokens kept per verified draft",
            buckets=_ACCEPTED_BUCKETS,
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample, by its exposition name and labels, e.g.
        `value("gptserve_request_finished_total", finish_reason="stop")` or
        `value("gptserve_batch_size_count")`. A labelled series not observed yet reads 0; a name
        no metric here exposes is a KeyError."""
        v = self.registry.get_sample_value(name, labels)
        if v is not None:
            return v
        if not any(name == f.name or name.startswith(f.name + "_") for f in self.registry.collect()):
            raise KeyError(f"no metric exposes a sample named {name!r}")
        return 0.0

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
