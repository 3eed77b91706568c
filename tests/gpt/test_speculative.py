"""Speculative decoding (gpt.speculative): drafts are verified through each sequence's own
decoder, so the output is the one decoding a token at a time gives. The many-request random
differential test is tests/server/test_engine_matches_library.py (the Engine speculating, the
library not); these are the library's own paths and the pieces they are built from."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import gpt
from gpt import Constraint, SamplingParams
from gpt.speculative import (
    Acceptance,
    Drafter,
    NgramIndex,
    SpeculativeConfig,
    Speculator,
    StepCosts,
    Verified,
    _bucket,
    expected_tokens,
    speculative_step,
)

BYTES = gpt.get_tokenizer("byte")
ALWAYS = SpeculativeConfig("ngram", num_tokens=5, ngram_min=1)  # speculate whenever there is a draft


def tiny(kind: str = "gpt", int8: bool = False):
    torch.manual_seed(7)
    model = gpt.build_model(gpt.preset("gpt-tiny" if kind == "gpt" else "seq2seq-tiny", tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked distributions, like a trained model's
    if int8:
        gpt.quantize(model)
    return model.eval()


def same(a: gpt.Completion, b: gpt.Completion) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.completion_tokens) == (
        b.token_ids,
        b.text,
        b.finish_reason,
        b.completion_tokens,
    )
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert [set(t) for t in a.top_logprobs] == [set(t) for t in b.top_logprobs]


@pytest.mark.parametrize("kind,int8", [("gpt", False), ("gpt", True), ("seq2seq", False)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_prediction_always_right_or_always_wrong_gives_the_output_without_one(kind, int8, temperature):
    model = tiny(kind, int8)
    base = SamplingParams(max_new_tokens=40, temperature=temperature, seed=5, ignore_eos=True, logprobs=2)
    prompts = ["the cat sat on the mat; the cat", "abcabcabcabc"]
    want = gpt.complete(model, BYTES, prompts, base, speculative="off")
    right = [dataclasses.replace(base, prediction=w.token_ids) for w in want]
    wrong = [dataclasses.replace(base, prediction=[(t + 1) % 256 for t in w.token_ids]) for w in want]
    for params, kept in ((right, True), (wrong, False)):
        got = gpt.complete(model, BYTES, prompts, params, speculative=ALWAYS)
        for g, w in zip(got, want):
            same(g, w)
            if kept:  # every drafted token is the output's; each step also gives one of its own
                assert g.rejected_prediction_tokens == 0
                assert g.accepted_prediction_tokens >= len(w.token_ids) * 5 // 6 - 1
            else:
                assert g.accepted_prediction_tokens == 0 and g.rejected_prediction_tokens > 0


def test_prompt_lookup_keeps_drafts_where_the_output_repeats_the_prompt_and_changes_nothing():
    model = tiny()
    # a greedy random model falls into a loop: its own output is what prompt lookup finds
    params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
    want = gpt.complete(model, BYTES, ["xyz"], params, speculative="off")[0]
    calls = []
    step = model.step
    model.step = lambda *a, **k: calls.append(k.get("every", False)) or step(*a, **k)
    got = gpt.complete(model, BYTES, ["xyz"], params, speculative=ALWAYS)[0]
    same(got, want)
    assert any(calls) and len(calls) < 47  # verified drafts, fewer forwards than tokens


def test_stop_strings_that_straddle_a_kept_draft_end_the_output_where_they_would_have():
    model = tiny()
    base = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    full = gpt.complete(model, BYTES, ["hello"], base, speculative="off")[0]
    stop = full.text[10:13]  # several tokens, met inside one verified draft
    params = dataclasses.replace(base, stop=[stop], prediction=full.token_ids)
    want = gpt.complete(
        model, BYTES, ["hello"], dataclasses.replace(params, prediction=None), speculative="off"
    )[0]
    got = gpt.complete(model, BYTES, ["hello"], params, speculative=ALWAYS)[0]
    same(got, want)
    assert stop not in got.text and got.finish_reason == "stop"


def test_budget_and_end_of_text_inside_a_draft_end_the_output_where_they_would_have():
    model = tiny()
    for params in (
        SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.8, seed=1, logit_bias={BYTES.eot_token: 3.0}),
    ):
        want = gpt.complete(model, BYTES, ["ab"], params, speculative="off")[0]
        long = want.token_ids + [65] * 20  # the prediction runs past the output's end
        got = gpt.complete(
            model, BYTES, ["ab"], dataclasses.replace(params, prediction=long), speculative=ALWAYS
        )[0]
        same(got, want)


def test_a_constrained_output_is_verified_through_its_constraint():
    model = tiny()
    c = Constraint.regex(r"(yes|no|maybe) [0-9]{2,4}")
    params = SamplingParams(max_new_tokens=20, temperature=0.7, seed=3, constraint=c)
    want = gpt.complete(model, BYTES, ["Q"], params, speculative="off")[0]
    # drafts that break the constraint are never taken: the constraint chooses as before
    for pred in (want.token_ids, BYTES.encode("nope 9x9x9x"), BYTES.encode("maybe 12345678")):
        got = gpt.complete(
            model, BYTES, ["Q"], dataclasses.replace(params, prediction=pred), speculative=ALWAYS
        )
        same(got[0], want)


def test_penalties_see_the_kept_tokens_of_the_draft_before_the_next_position_is_chosen():
    model = tiny()
    params = SamplingParams(
        max_new_tokens=30,
        temperature=0.6,
        seed=9,
        repetition_penalty=1.5,
        frequency_penalty=0.8,
        min_tokens=10,
    )
    want = gpt.complete(model, BYTES, ["aaaa"], params, speculative="off")[0]
    got = gpt.complete(
        model, BYTES, ["aaaa"], dataclasses.replace(params, prediction=want.token_ids), speculative=ALWAYS
    )
    same(got[0], want)
    assert got[0].accepted_prediction_tokens > 0


def test_rows_without_drafts_share_the_wide_forward_and_keep_their_output():
    model = tiny()
    params = [
        SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=1.0, seed=2, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=0.5, seed=4, top_p=0.9, logprobs=3),
    ]
    prompts = ["first", "second one", "3"]
    want = gpt.complete(model, BYTES, prompts, params, speculative="off")
    params[0] = dataclasses.replace(params[0], prediction=want[0].token_ids)  # only row 0 has a prediction
    got = gpt.complete(model, BYTES, prompts, params, speculative=SpeculativeConfig("ngram", ngram_min=4))
    for g, w in zip(got, want):
        same(g, w)
    assert got[0].accepted_prediction_tokens > 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_draft_model_always_right_or_mostly_wrong_gives_the_output_without_one(temperature):
    model = tiny()
    twin = tiny()  # the same weights: every greedy proposal is the target's own greedy choice
    torch.manual_seed(8)
    stranger = gpt.build_model(gpt.preset("gpt-tiny", n_layer=1)).eval()
    params = [
        SamplingParams(max_new_tokens=30, temperature=temperature, seed=s, ignore_eos=True, logprobs=1)
        for s in (1, 2, 3)
    ]
    prompts = ["hello world", "abcabc", "x"]
    want = gpt.complete(model, BYTES, prompts, params, speculative="off")
    for draft in (twin, stranger):
        for mode in ("draft", "auto"):
            config = SpeculativeConfig(mode, num_tokens=4, draft_model=draft)
            for g, w in zip(gpt.complete(model, BYTES, prompts, params, speculative=config), want):
                same(g, w)
    calls = []
    step = model.step
    model.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    gpt.complete(
        model, BYTES, ["hello world"], params[0], speculative=SpeculativeConfig("draft", 4, draft_model=twin)
    )
    if temperature == 0:
        assert len(calls) <= 8  # 29 tokens after the prompt's: 5 a forward with every draft kept


def test_a_draft_model_must_suit_the_model():
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeConfig("draft")
    s2s = tiny("seq2seq")
    with pytest.raises(ValueError, match="encoder-decoder"):
        gpt.complete(
            s2s,
            BYTES,
            ["x"],
            SamplingParams(max_new_tokens=2),
            SpeculativeConfig("draft", draft_model=tiny()),
        )
    wide = gpt.build_model(gpt.preset("gpt-tiny", vocab_size=300)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        gpt.complete(
            tiny(),
            BYTES,
            ["x"],
            SamplingParams(max_new_tokens=2),
            SpeculativeConfig("draft", draft_model=wide),
        )


def test_the_cache_keeps_only_the_kept_tokens_after_a_verified_step():
    model = tiny()
    cache = model.new_cache(2)
    decs = [
        gpt.SequenceDecoder(BYTES, p, SamplingParams(max_new_tokens=20, temperature=0)) for p in ([1, 2], [3])
    ]
    gpt.decode_tokens(model.start([d.prompt_ids for d in decs], cache), decs)
    drafts = [[decs[0].last_token] * 4, []]  # row 1 brings no draft: one real token, padding after
    verified = speculative_step(model, cache, slice(0, 2), decs, drafts)
    # every kept token but the newest is in the cache (the newest is fed on the next step)
    for b, d in enumerate(decs):
        assert int(cache.lengths[b]) == len(d.prompt_ids) + len(d.output_ids) - 1
    assert verified.drafted == [4, 0] and verified.matched[1] == 0


def test_ngram_index_finds_the_latest_occurrence_with_room_or_the_first_after_a_position():
    idx = NgramIndex(1, 3, [1, 2, 3, 9, 1, 2, 3, 7, 1, 2])
    assert idx.find([1, 2]) == 6  # "1 2" was followed by 3 at positions 2 and 6; latest wins
    assert idx.find([1, 2], after=3) == 6 and idx.find([1, 2], after=0) == 2
    assert idx.find([5, 5]) is None
    assert idx.find([9, 3, 7]) == 8  # the longest n-gram that occurs decides ("3 7" then "7")
    idx.extend([3, 4])
    assert idx.find([2, 3]) == 11
    run = NgramIndex(2, 4, [7] + [5] * 12)  # in a run, the latest occurrence is the run's own end
    assert run.find(run.tokens) == 12 and run.find(run.tokens, room=8) == 13 - 8
    assert run.find(run.tokens, room=20) == 5  # none leaves that much: the one that leaves most


def steps_with_prediction(output: list[int], prediction: list[int], limit: int = 8) -> tuple[int, int]:
    """Decode `output` step by step with drafts from `prediction` only (as a verified step does:
    the draft's matching prefix is kept, then one token of the model's own): the steps taken and
    the drafted tokens kept."""
    drafter = Drafter.new((2, 4), [0], prediction)
    drafter.lookup = NgramIndex(99, 99)  # no prompt lookup: the prediction alone
    n, kept, steps = 1, 0, 0
    while n < len(output):
        steps += 1
        draft = drafter.propose(output[:n], limit)
        matched = next((i for i, (a, b) in enumerate(zip(draft, output[n:])) if a != b), len(draft))
        matched = min(matched, len(output) - n)
        drafter.record(len(draft), matched)
        kept, n = kept + matched, n + matched + 1
    return steps, kept


def test_a_prediction_is_followed_again_after_a_changed_added_or_dropped_span():
    rng = random.Random(0)
    # 30 lines: indentation as a run of token 2, a name, a newline (token 1)
    lines = [[2] * rng.choice([2, 4, 6, 8]) + [10 + i, 1] for i in range(30)]

    def edit(at: int, change) -> list[int]:
        return [t for i, line in enumerate(lines) for t in (change(line) if i == at else line)]

    text = edit(-1, None)
    steps, kept = steps_with_prediction(text, text)
    assert steps <= math.ceil((len(text) - 1) / 9) + 2  # in step along runs of one token
    for output, prediction in [
        (text, edit(4, lambda line: line[:-1] + [8, 9, 1])),  # the prediction has a comment more
        (text, edit(6, lambda line: [8, 9, 1])),  # ... another line instead
        (edit(6, lambda line: [2, 2, 30, 1] + line), text),  # the output has a line more
        (edit(3, lambda line: line[:-2] + [33, 1]), text),  # ... another name
    ]:
        # a step or two for the span that differs, one or two to find the prediction again
        assert steps_with_prediction(output, prediction)[0] <= steps + 4
    # an output that has nothing to do with its prediction is not drafted for from it
    assert steps_with_prediction(list(range(100, 160)), text) == (59, 0)


def test_auto_speculates_only_where_the_measured_costs_say_it_pays():
    decs = [
        gpt.SequenceDecoder(BYTES, [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=50, temperature=0))
        for _ in range(4)
    ]
    for d in decs:
        d.sampler.output_ids.append(3)
    costs = StepCosts()
    costs.refresh = 0  # read the costs at every step: this test changes them between steps
    spec = Speculator(SpeculativeConfig("auto", num_tokens=4, ngram_min=1), costs)
    drafters = [spec.drafter(d) for d in decs]
    assert not any(spec.plan(decs, drafters))  # plain steps are measured first
    for _ in range(2):  # the first forward of each shape warms up and is not counted
        costs.record(4, 1, 0.010)
    assert all(spec.plan(decs, drafters))  # wider forwards not measured yet: they are tried
    for _ in range(2):
        for width in range(2, 6):
            costs.record(
                4, width, 0.010 * width
            )  # bound by arithmetic: a wider forward costs what it computes
    assert not any(spec.plan(decs, drafters))
    decs[0].sampler.output_ids.append(1)
    assert not any(spec.plan(decs, drafters)) and drafters[0].seen == 1  # hopeless: not even proposed
    tried = [i for i in range(1, 64 * 7 + 1) if any(spec.plan(decs, drafters))]
    # declined drafts are measured again, less and less often (three declines came before the loop)
    assert tried == [61, 61 + 128, 61 + 128 + 256]
    for width in range(2, 6):
        costs.seconds[(4, width)] = 0.0105  # bound by reading weights: nearly free
    assert all(spec.plan(decs, drafters))
    assert spec.drafter(decs[0]) is not None and Speculator(SpeculativeConfig("off")).drafter(decs[0]) is None
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 4) == 5


def test_unmeasured_widths_are_interpolated_or_guessed_and_tried_a_doubling_at_a_time():
    costs = StepCosts()
    for width, seconds in [(1, 0.010), (2, 0.015)]:
        for _ in range(2):
            costs.record(1, width, seconds)
    assert costs.relative(1, 2) == pytest.approx(1.5)
    assert costs.relative(1, 8) == pytest.approx(1.5 * 2)  # past the widest measured: as the square root
    assert costs.widest_to_try(1) == 4 and costs.widest_to_try(2) == 2  # twice the widest measured there
    for _ in range(2):
        costs.record(1, 9, 0.030)
    assert costs.relative(1, 5) == pytest.approx(1.5 + 1.5 * 3 / 7)  # between measured widths
    sizes = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 25)
    assert [_bucket(b) for b in sizes] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 16, 24, 32]

    decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3] * 9, SamplingParams(max_new_tokens=50, temperature=0))]
    decs[0].sampler.output_ids.append(1)
    spec = Speculator(SpeculativeConfig("auto", num_tokens=8, ngram_min=1), StepCosts())
    drafters = [spec.drafter(decs[0])]
    drafters[0].acceptance["ngram"] = Acceptance(9.5, 10.0)  # its drafts are nearly always right
    for _ in range(2):
        spec.costs.record(1, 1, 0.010)
    assert [len(d) for d in spec.plan(decs, drafters)] == [1]  # nothing wider measured: two tokens first
    for _ in range(2):
        spec.costs.record(1, 2, 0.011)
    assert [len(d) for d in spec.plan(decs, drafters)] == [3]  # then up to twice as wide


def test_auto_verifies_no_draft_that_would_not_pay_yet_learns_from_the_output_when_it_would():
    def setup(costs, temperature=0.0):
        params = SamplingParams(max_new_tokens=50, temperature=temperature, seed=1)
        dec = gpt.SequenceDecoder(BYTES, [1, 2, 3] * 9, params)
        dec.sampler.output_ids.append(1)
        spec = Speculator(SpeculativeConfig("auto", num_tokens=4, ngram_min=1), StepCosts())
        # auto gives a sampled row without a prediction no drafter: one as such a row with one has
        drafter = spec.drafter(dec) or Drafter.new((1, 4), dec.prompt_ids)
        for width, seconds in costs:
            for _ in range(2):
                spec.costs.record(1, width, seconds)
        drafter.acceptance["ngram"] = Acceptance(1.0, 10.0)  # seldom kept lately
        return dec, spec, drafter

    dec, spec, drafter = setup([(1, 0.010), (2, 0.015), (3, 0.017), (5, 0.020)])
    assert not any(spec.plan([dec], [drafter]))  # not verified ...
    assert drafter.shadow == (1, [2, 3, 1, 2], "ngram")  # ... but kept, to compare with what follows
    steps = 0
    while not any(spec.plan([dec], [drafter])):  # the output goes on repeating its prompt
        dec.sampler.output_ids.append([1, 2, 3][len(dec.output_ids) % 3])
        steps += 1
    assert steps <= 8 and drafter.acceptance["ngram"].rate() > 0.6
    # a sampled row keeps none: its drafts are seldom right, and a lucky run of them misleads
    dec, spec, drafter = setup([(1, 0.010), (2, 0.015), (3, 0.017), (5, 0.020)], temperature=0.8)
    assert not any(spec.plan([dec], [drafter])) and drafter.shadow is None
    # where not even drafts that are always right would pay, none is looked for
    dec, spec, drafter = setup([(1, 0.010), (2, 0.020), (3, 0.030), (5, 0.050)])
    assert not any(spec.plan([dec], [drafter])) and drafter.seen == 0 and drafter.shadow is None


def test_auto_asks_several_rows_for_a_larger_gain_than_one():
    def plan(rows: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=50, temperature=0)
        decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3] * 9, params) for _ in range(rows)]
        spec = Speculator(SpeculativeConfig("auto", num_tokens=3, ngram_min=1), StepCosts())
        drafters = [spec.drafter(d) for d in decs]
        for d, dr in zip(decs, drafters):
            d.sampler.output_ids.append(1)
            dr.acceptance["ngram"] = Acceptance(9.0, 10.0)
        for width, seconds in [(1, 0.010), (2, 0.015), (4, 0.030)]:
            for _ in range(2):
                spec.costs.record(rows, width, seconds)
        return spec.plan(decs, drafters)

    # a 2-token draft kept at 90% is worth 1.9 tokens for 1.5 steps: 27% faster, enough for one
    # row (5%), not for two (30%); nor are the wider drafts
    assert [len(d) for d in plan(1)] == [1]
    assert not any(plan(2))


def test_a_new_row_starts_from_the_acceptance_its_source_has_had_lately():
    decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=50)) for _ in range(2)]
    spec = Speculator(SpeculativeConfig("ngram", ngram_min=1))  # auto: no prompt lookup for sampled rows
    first = spec.drafter(decs[0])
    assert first.acceptance["ngram"].rate() == pytest.approx(0.5)
    first.source = "ngram"
    for _ in range(40):  # its drafts have all been kept
        spec.record(decs[:1], [first], Verified([gpt.Piece()], [4], [4]))
    assert first.rate() == pytest.approx(1.0, abs=0.01)
    assert spec.drafter(decs[1]).acceptance["ngram"].rate() > 0.9
    # rows sampled otherwise (greedy here) start from their own kind's: a greedy row keeps far more
    greedy = gpt.SequenceDecoder(BYTES, [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=50, temperature=0))
    assert decs[1].params.temperature > 0
    assert spec.drafter(greedy).acceptance["ngram"].rate() == pytest.approx(0.5)


def test_bad_options_and_predictions_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="speculative mode"):
        SpeculativeConfig("sometimes")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("auto", num_tokens=0)
    with pytest.raises(gpt.RequestError, match="beam search") as e:
        SamplingParams(num_beams=2, prediction="x")
    assert e.value.param == "prediction"
    with pytest.raises(gpt.RequestError) as e:
        SamplingParams(prediction=[1, -1])
    assert e.value.param == "prediction"


def test_auto_decides_with_its_quick_bound_as_it_does_width_by_width():
    """`_could_pay` ends early where no width could pay; it must answer as checking each does."""
    rng = random.Random(3)
    for trial in range(200):
        costs = StepCosts()
        B = rng.choice([1, 3, 8, 32])
        for w in [1, *rng.sample([2, 3, 5, 9, 17], rng.randint(0, 3))]:
            for _ in range(2):
                costs.record(B, w, 0.01 * (1 + rng.uniform(0.05, 1.2) * (w - 1)))
        spec = Speculator(SpeculativeConfig("auto", num_tokens=16), costs)
        decs = [
            gpt.SequenceDecoder(BYTES, [1, 2, 3], SamplingParams(max_new_tokens=rng.randint(2, 40)))
            for _ in range(B)
        ]
        drafters = [spec.drafter(d) if rng.random() < 0.8 else None for d in decs]
        for dr in drafters:
            if dr is not None:
                dr.acceptance["ngram"] = Acceptance(rng.random(), 1.0)
        widest = min(17, costs.widest_to_try(B))
        margin, relative = spec._margin(B), costs.relatives(B, range(2, widest + 1))
        rows = [
            (dr.acceptance["ngram"].rate(), d.budget - len(d.output_ids) - 1)
            for d, dr in zip(decs, drafters)
            if dr is not None
        ]
        each_width = any(
            sum(1 for dr in drafters if dr is None)
            + sum(expected_tokens(r, max(0, min(room, w - 1))) for r, room in rows)
            > margin * B * relative[w]
            for w in relative
        )
        assert spec._could_pay(decs, drafters)[0] == each_width, trial


def test_a_batch_size_that_speculates_does_not_hasten_another_ones_retries():
    spec = Speculator(SpeculativeConfig("auto", num_tokens=4, ngram_min=1), StepCosts())

    def rows(n: int):
        params = SamplingParams(max_new_tokens=500, temperature=0)
        decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3] * 9, params) for _ in range(n)]
        for d in decs:
            d.sampler.output_ids.append(1)
        return decs, [spec.drafter(d) for d in decs]

    for width, four, one in [(1, 0.010, 0.010), (2, 0.020, 0.0105), (3, 0.030, 0.011), (5, 0.050, 0.012)]:
        for _ in range(2):
            spec.costs.record(4, width, four)  # four rows: bound by arithmetic, never worth it
            spec.costs.record(1, width, one)  # one row: nearly free
    four_rows, one_row = rows(4), rows(1)
    tried = []
    for step in range(1, 200):
        if any(spec.plan(*four_rows)):
            tried.append(step)
        assert any(spec.plan(*one_row))  # one stream speculates at every step meanwhile
    assert tried == [64, 64 + 128]  # four rows' retries still back off


def test_a_sequence_alone_drafts_up_to_the_longest_draft_and_rows_of_a_batch_up_to_16():
    prediction = list(range(40, 100))
    spec = Speculator(SpeculativeConfig("ngram"))  # the defaults: 32 alone
    assert spec.config.longest(1) == 32 and spec.config.longest(2) == 16
    params = SamplingParams(max_new_tokens=80, prediction=prediction)

    def drafts(rows):
        decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3], params) for _ in range(rows)]
        return [len(d) for d in spec.plan(decs, [spec.drafter(d) for d in decs])]

    assert drafts(1) == [32]
    assert drafts(3) == [16, 16, 16]
    small = Speculator(SpeculativeConfig("ngram", num_tokens=8))
    decs = [gpt.SequenceDecoder(BYTES, [1, 2, 3], params) for _ in range(2)]
    assert [len(d) for d in small.plan(decs, [small.drafter(d) for d in decs])] == [8, 8]


def test_auto_leaves_sampled_rows_to_plain_decoding_unless_they_have_a_prediction():
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=1)
    prompt = [1, 2, 3] * 9
    auto = Speculator(SpeculativeConfig("auto"))
    assert auto.drafter(gpt.SequenceDecoder(BYTES, prompt, sampled)) is None
    assert auto.drafter(gpt.SequenceDecoder(BYTES, prompt, dataclasses.replace(sampled, temperature=0)))
    predicted = dataclasses.replace(sampled, prediction=[1, 2, 3])
    assert auto.drafter(gpt.SequenceDecoder(BYTES, prompt, predicted)).sources() == ["ngram", "prediction"]
    assert Speculator(SpeculativeConfig("ngram")).drafter(gpt.SequenceDecoder(BYTES, prompt, sampled))
