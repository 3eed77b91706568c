"""The routers' choices, on stand-ins for Serve's replicas and pending requests (no cluster)."""

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from server.cluster import ingress_metrics  # noqa: E402
from server.cluster.router import PrefixAffinityRouter, RoundRobinRouter  # noqa: E402


@dataclass(frozen=True)
class FakeID:
    unique_id: str


def _replicas(*names):
    return [SimpleNamespace(replica_id=FakeID(n)) for n in names]


def _request(text: str, rid: str):
    return SimpleNamespace(
        args=[SimpleNamespace(routing_text=text)], metadata=SimpleNamespace(internal_request_id=rid)
    )


def _router(cls, **kw):
    router = cls.__new__(cls)  # Serve builds it with its own state; the choice needs none of it
    router.initialize_state(**kw)
    return router


def _route(router, replicas, text, rid):
    """The replica the router ranks first, told it was sent there."""
    first = asyncio.run(router.choose_replicas(replicas, _request(text, rid)))[0][0]
    router.on_request_routed(_request(text, rid), first.replica_id, None)
    return first.replica_id.unique_id


CONVERSATION = "system: you are a helpful assistant who answers briefly. " * 3


def test_a_conversation_returns_to_its_replica_and_new_ones_spread():
    router = _router(PrefixAffinityRouter)
    replicas = _replicas("a", "b")
    first = _route(router, replicas, CONVERSATION + "user: hi", "1")
    router.on_request_completed(FakeID(first), "1")
    other = _route(router, replicas, "a different conversation entirely, " * 4, "2")
    router.on_request_completed(FakeID(other), "2")
    assert other != first  # new: the replica caching least
    assert _route(router, replicas, CONVERSATION + "user: hi\nassistant: hello\nuser: more", "3") == first


def test_an_overloaded_replica_loses_its_prefix_to_the_least_loaded():
    router = _router(PrefixAffinityRouter, imbalance=2)
    replicas = _replicas("a", "b")
    home = _route(router, replicas, CONVERSATION, "0")
    before = ingress_metrics.DECISIONS.labels(decision="overloaded")._value.get()
    sent = [
        _route(router, replicas, CONVERSATION + f"turn {i}", str(i)) for i in range(1, 6)
    ]  # none complete
    assert sent[:2] == [home, home] and sent[2] != home
    assert ingress_metrics.DECISIONS.labels(decision="overloaded")._value.get() > before


def test_a_replica_that_leaves_is_forgotten():
    router = _router(PrefixAffinityRouter)
    home = _route(router, _replicas("a", "b"), CONVERSATION, "0")
    router.index.forget(FakeID(home))
    assert router.index.longest_match(CONVERSATION, [FakeID(home)])[0] == {}


def test_round_robin_takes_replicas_in_turn_whatever_the_prompt():
    router = _router(RoundRobinRouter)
    replicas = _replicas("b", "a", "c")
    assert [_route(router, replicas, CONVERSATION, str(i)) for i in range(4)] == ["a", "b", "c", "a"]
