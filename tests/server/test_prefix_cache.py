"""Prefix caching: a request that starts where an earlier or concurrent one did reuses its keys
and values, and its output is the same as without the cache.

The differential tests run the same requests through two engines, one with the prefix cache and
one without, and compare token ids (identical) and logprobs (fp32, within 1e-5): multi-turn
conversations where each turn's prompt is the last prompt, the reply and a new line; more
conversations than cache rows (rows are evicted); `n` choices of one prompt; a request cancelled
while it prefills on top of a reused row.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from test_engine import collect, run, settle, slow_steps
from test_engine_matches_library import TOK, build_model

from gpt import SamplingParams
from server.config import Settings
from server.engine import Engine

LOGPROB_TOL = 1e-5


def engine(prefix_cache: bool, slots: int = 3, chunk: int = 16, kind: str = "gpt") -> Engine:
    return Engine(
        build_model(kind), TOK, max_batch_size=slots, prefill_chunk=chunk, prefix_cache=prefix_cache
    )


def turn_params(rng: random.Random, seed: int) -> SamplingParams:
    sampled = rng.random() < 0.6
    return SamplingParams(
        max_new_tokens=rng.randint(1, 6),
        temperature=rng.choice([0.7, 1.0, 1.3]) if sampled else 0.0,
        top_k=rng.choice([0, 5, 40]),
        seed=seed,
        logprobs=rng.choice([0, 0, 3]),
        ignore_eos=rng.random() < 0.7,
    )


async def conversation(eng: Engine, rng: random.Random, k: int, turns: int) -> list:
    """Turns of a chat: each prompt is the previous prompt, its reply and a new user line."""
    prompt = TOK.encode(f"#{k} ")
    outputs = []
    for t in range(turns):
        n = rng.choice([1, 1, 2])
        params = turn_params(rng, seed=1000 * k + t)
        results = await asyncio.gather(*[collect(eng.submit(prompt, params)) for _ in range(n)])
        outputs.append(
            [
                (ids, [lp for o in outs for lp in o.logprobs], [t for o in outs for t in o.top_logprobs])
                for _, ids, _, outs in results
            ]
        )
        reply = results[0][1]
        prompt = prompt + reply + TOK.encode(f"|{t}{'ab' * rng.randint(0, 3)}:")
        if len(prompt) > 44:  # tiny models have a 64-token context
            prompt = TOK.encode(f"#{k}+")
    return outputs


async def conversations(eng: Engine, seed: int, count: int, turns: int) -> list:
    try:
        return await asyncio.gather(
            *[conversation(eng, random.Random(seed * 100 + k), k, turns) for k in range(count)]
        )
    finally:
        await eng.shutdown()


def assert_same(with_cache, without_cache) -> None:
    for conv_a, conv_b in zip(with_cache, without_cache, strict=True):
        for turn_a, turn_b in zip(conv_a, conv_b, strict=True):
            for (ids_a, lp_a, top_a), (ids_b, lp_b, top_b) in zip(turn_a, turn_b, strict=True):
                assert ids_a == ids_b
                assert lp_a == pytest.approx(lp_b, abs=LOGPROB_TOL)
                for da, db in zip(top_a, top_b, strict=True):
                    assert da.keys() == db.keys()
                    assert list(da.values()) == pytest.approx(list(db.values()), abs=LOGPROB_TOL)


@pytest.mark.parametrize("count,slots", [(2, 4), (5, 3)], ids=["rows-to-spare", "more-chats-than-rows"])
def test_multi_turn_conversations_give_the_same_tokens_and_logprobs_with_and_without_the_cache(count, slots):
    cached_engine = engine(True, slots=slots)
    with_cache = run(conversations(cached_engine, seed=7, count=count, turns=6))
    without_cache = run(conversations(engine(False, slots=slots), seed=7, count=count, turns=6))
    assert_same(with_cache, without_cache)
    m = cached_engine.metrics
    assert m.value("gptserve_prefix_cache_hits_total") > 0
    if count < slots:  # every conversation keeps its row: most of each later prompt comes from the cache
        assert m.value("gptserve_prompt_tokens_cached_total") > 0.5 * m.value("gptserve_prompt_tokens_total")


def test_n_choices_of_one_prompt_prefill_it_once_and_match_the_uncached_output():
    prompt = TOK.encode("one prompt, four choices: ")
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, logprobs=2, ignore_eos=True)

    async def four(eng):
        try:
            return await asyncio.gather(*[collect(eng.submit(prompt, params)) for _ in range(4)])
        finally:
            await eng.shutdown()

    cached_engine = engine(True, slots=4)
    a, b = run(four(cached_engine)), run(four(engine(False, slots=4)))
    for (_, ids_a, _, outs_a), (_, ids_b, _, outs_b) in zip(a, b):
        assert ids_a == ids_b
        assert [lp for o in outs_a for lp in o.logprobs] == pytest.approx(
            [lp for o in outs_b for lp in o.logprobs], abs=LOGPROB_TOL
        )
    m = cached_engine.metrics
    # the first choice prefills the prompt; the other three copy all of it but the last token
    assert m.value("gptserve_prefix_cache_hits_total") == 3
    assert m.value("gptserve_prompt_tokens_cached_total") == 3 * (len(prompt) - 1)
    assert sorted(outs[-1].cached_tokens for _, _, _, outs in a) == [0] + [len(prompt) - 1] * 3


FIRST_TURN = TOK.encode("a first turn")


def test_a_request_cancelled_while_prefilling_on_a_reused_row_leaves_a_row_that_is_still_correct():
    first = FIRST_TURN
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)

    async def scenario(eng):
        try:
            _, reply, _, _ = await collect(eng.submit(first, params))
            second = first + reply + TOK.encode(", then a longer second, in chunks")
            handle = eng.submit(second, params)

            def prefilled() -> int:
                running = eng._sched.running
                return running[0].prefilled if running else 0

            while prefilled() < len(first) + 8:
                await asyncio.sleep(0.001)
            handle.cancel()  # after a chunk or two on top of the reused row
            await collect(handle)
            await settle(eng)
            again = await collect(eng.submit(second, params))  # reuses the part the cancelled one wrote
            return reply, again
        finally:
            await eng.shutdown()

    cached_engine = engine(True, chunk=8)
    slow_steps(cached_engine.model, 0.02)
    reply_a, (_, ids_a, _, outs_a) = run(scenario(cached_engine))
    reply_b, (_, ids_b, _, outs_b) = run(scenario(engine(False, chunk=8)))
    assert (reply_a, ids_a) == (reply_b, ids_b)
    assert [lp for o in outs_a for lp in o.logprobs] == pytest.approx(
        [lp for o in outs_b for lp in o.logprobs], abs=LOGPROB_TOL
    )
    assert outs_a[-1].cached_tokens >= len(FIRST_TURN) + 8  # what the cancelled request had prefilled


def test_without_the_prefix_cache_nothing_is_reused():
    eng = engine(False)
    run(conversations(eng, seed=1, count=2, turns=3))
    assert eng.metrics.value("gptserve_prefix_cache_lookups_total") == 0
    assert eng.metrics.value("gptserve_prompt_tokens_cached_total") == 0


def test_the_encoder_decoder_encodes_every_source_and_serves_as_before():
    eng = engine(True, kind="seq2seq")
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)

    async def twice():
        try:
            return [await collect(eng.submit(TOK.encode("same source"), params)) for _ in range(2)]
        finally:
            await eng.shutdown()

    (_, a, _, outs), (_, b, _, _) = run(twice())
    assert a == b and outs[-1].cached_tokens == 0
    # its prompt is a source, encoded whole at each admission: there is no prefix to reuse
    assert eng.metrics.value("gptserve_prefix_cache_lookups_total") == 0


def test_the_prefix_cache_can_be_turned_off_from_the_environment_and_the_command_line():
    from server.cli import build_parser

    assert Settings().prefix_cache is True
    assert Settings.from_env({"GPT_SERVE_PREFIX_CACHE": "0"}).prefix_cache is False
    assert Settings.from_env({"GPT_SERVE_PREFIX_CACHE": "true"}).prefix_cache is True
    with pytest.raises(ValueError, match="GPT_SERVE_PREFIX_CACHE"):
        Settings.from_env({"GPT_SERVE_PREFIX_CACHE": "maybe"})
    args = vars(build_parser().parse_args(["--no-prefix-cache"]))
    assert Settings.from_env({"GPT_SERVE_PREFIX_CACHE": "1"}, **args).prefix_cache is False
