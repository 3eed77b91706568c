"""Prefix-aware routing on Ray Serve's request-router interface.

A request goes to the replica that holds the longest prefix of its prompt (`PrefixIndex`), so a
conversation keeps landing where its history is in the prefix cache. Unless that replica already
has `imbalance` more requests in flight than the least loaded one: then to the least loaded,
as it does when no replica holds any of the prompt. Requests are routed first in, first out.

Ours rather than Ray's `PrefixCacheAffinityRouter` (ray.serve.llm): that one needs `ray[llm]`
(vLLM, pyarrow), keeps its character tree in a detached actor that every routing decision waits
on with a blocking `ray.get`, and grows without bound unless eviction is turned on. Here the
index lives in the router (the ingress process), is bounded, and costs a few hashes a request;
with more than one ingress replica, each routes on what it has seen itself.

Every decision is counted (`gptserve_router_decisions_total{decision}`):
- `affinity`: sent to the replica holding the prefix;
- `overloaded`: that replica was too busy, the least loaded one got it;
- `new`: no replica held enough of its prefix; the least loaded, then the least cached, replica got it;
- `busy`: the chosen replicas were full and another took it.
"""

from __future__ import annotations

from collections import Counter as Tally

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from . import ingress_metrics
from .prefix_index import PrefixIndex


def routing_text(pending: PendingRequest | None) -> str | None:
    """The text a forwarded request is routed on (see `ForwardedRequest.routing_text`)."""
    if pending is None or not pending.args:
        return None
    return getattr(pending.args[0], "routing_text", None)


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(
        self, imbalance: int = 8, min_match: float = 0.5, block_chars: int = 64, max_blocks: int = 200_000
    ):
        """`imbalance`: how many more requests in flight than the least loaded replica the
        replica holding a prompt's prefix may have and still get it. `min_match`: the share of
        the prompt a replica must hold for that; less (a system prompt that every conversation
        shares, say) is cheap to prefill anywhere, and routing on it would pile every new
        conversation onto one replica."""
        self.imbalance, self.min_match = imbalance, min_match
        self.index = PrefixIndex(block_chars, max_blocks)
        self.in_flight: Tally[ReplicaID] = Tally()
        self._decisions: dict[str, tuple[str, frozenset, int]] = {}  # request id -> (why, best, chars)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_load = sorted(candidate_replicas, key=lambda r: self.in_flight[r.replica_id])
        least = self.in_flight[by_load[0].replica_id]
        text = routing_text(pending_request)
        matched, blocks = {}, 0
        if text:
            matched, blocks = self.index.longest_match(text, (r.replica_id for r in candidate_replicas))
        rid = pending_request.metadata.internal_request_id if pending_request is not None else None
        longest = max(matched.values(), default=0)
        if longest > self.min_match * blocks * self.index.block_chars:
            best = [r for r in by_load if matched.get(r.replica_id) == longest]
            if self.in_flight[best[0].replica_id] - least <= self.imbalance:
                self._note(rid, "affinity", best, longest)
                return [best, [r for r in by_load if r not in best]]
            self._note(rid, "overloaded", by_load[:1], 0)
            return [by_load[:2], by_load[2:]]
        # a new prefix: the least loaded replica, and of those the one caching the least
        idle = [r for r in by_load if self.in_flight[r.replica_id] == least]
        idle.sort(key=lambda r: self.index.held[r.replica_id])
        self._note(rid, "new", idle[:1], 0)
        return [idle[:1], [r for r in by_load if r is not idle[0]]]

    def _note(self, rid: str | None, why: str, chosen: list[RunningReplica], chars: int) -> None:
        if rid is not None:
            self._decisions[rid] = (why, frozenset(r.replica_id for r in chosen), chars)
            if len(self._decisions) > 4096:  # requests cancelled while being routed never report back
                self._decisions.pop(next(iter(self._decisions)))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight[replica_id] += 1
        why, chosen, chars = self._decisions.pop(
            pending_request.metadata.internal_request_id, ("new", frozenset(), 0)
        )
        if why != "overloaded" and replica_id not in chosen:
            why = "busy"
        ingress_metrics.DECISIONS.labels(decision=why).inc()
        if why == "affinity":
            ingress_metrics.MATCHED.inc(chars)
        text = routing_text(pending_request)
        if text:
            self.index.insert(text, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.in_flight[replica_id] > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id)
        self.in_flight.pop(replica_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self._replica_id_set) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.index.forget(replica_id)
            self.in_flight.pop(replica_id, None)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn, blind to prompts and load: the baseline that
    prefix-aware routing is measured against (`--routing round-robin`)."""

    def initialize_state(self, **_):
        self._turn = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = self._turn % len(ordered)
        self._turn += 1
        return [[ordered[i]], ordered[i + 1 :] + ordered[:i]]
