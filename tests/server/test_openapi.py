"""The OpenAPI schema tells the truth: schemathesis generates requests from the live server's
schema (valid ones and broken ones) and checks that none gets a 5xx, every response matches
its documented status, content type and body, and every schema-valid request is accepted,
except where the schema says it cannot know (a prompt and max_tokens that do not fit the context
together, or fields that are each valid but not together)."""

import hypothesis
import pytest
import schemathesis
from conftest import start_live_server, tiny_settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.app import load_engine
from server.openapi import below
from server.protocol import SEED_MAX

# 400s the schema documents in words rather than in JSON Schema
# (and which schemas, regexes and grammars are valid, and how long they take to compile)
UNEXPRESSIBLE = {
    "context_length_exceeded",
    "invalid_combination",
    "invalid_constraint",
    "constraint_too_complex",
}


@pytest.fixture(scope="module")
def fuzzed_server(tiny_checkpoint):
    settings = tiny_settings(tiny_checkpoint, max_batch_size=4, max_queue=8, default_max_tokens=8)
    server = start_live_server(settings, engine=load_engine(settings))
    yield server
    server.stop()


@schemathesis.check
def valid_data_is_accepted(ctx, response, case):
    """positive_data_acceptance, with the 400s the schema cannot express allowed."""
    if response.status_code == 400:
        code = response.json()["error"]["code"]
        if code in UNEXPRESSIBLE:
            return None
        body = case.body if isinstance(case.body, dict) else {}
        seed = body.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool) and seed > SEED_MAX:
            # the generator compares with the schema's maximum (2**64 - 1) as a float, 2**64,
            # and draws integers just above it: not schema-valid, rightly refused
            return None
    return positive_data_acceptance(ctx, response, case)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_live_schema_matches_what_the_server_does(fuzzed_server, mode):
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def check(case):
            case.call_and_validate(
                excluded_checks=[positive_data_acceptance],
                additional_checks=[valid_data_is_accepted],
                timeout=60,
            )

        try:
            check()
        except hypothesis.errors.Unsatisfiable:  # nothing to break: a GET without parameters
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET"


@pytest.mark.parametrize("n", [1, 9, 10, 257, 999, 1000, 50257])
def test_the_token_id_pattern_matches_exactly_the_ids_below_the_vocabulary(n):
    import re

    pattern = re.compile(below(n))
    assert [i for i in range(n + 100) if pattern.match(str(i))] == list(range(n))


def test_the_schema_carries_the_served_models_limits(fuzzed_server):
    import httpx

    spec = httpx.get(fuzzed_server.url + "/openapi.json").json()
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["maximum"] == 8
    assert props["model"]["anyOf"][0]["enum"] == [fuzzed_server.model]
    formats = props["response_format"]["anyOf"][0]["discriminator"]["mapping"]
    assert set(formats) == {"text", "json_object", "json_schema"}
    assert props["max_tokens"]["anyOf"][0]["minimum"] == 0  # with echo: score the prompt, generate nothing
    assert props["echo"]["anyOf"][0]["type"] == "boolean" and "prompt" in props["echo"]["description"]
    assert "echo" in props["logprobs"]["description"] and "echo" in props["max_tokens"]["description"]
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0]["minimum"] == 1 and chat["echo"]["enum"] == [None, False]
    ids = props["prompt"]["anyOf"][1]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, 256)
    post = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "413", "415", "429", "503"} <= set(post) and "422" not in post
