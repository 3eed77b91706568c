"""End-to-end generation with both models: batching, streaming, stops, beams."""

import pytest
import torch
from forced_model import ForcedModel

import gpt
from gpt.beam import beam_search
from gpt.generate import complete, generate
from gpt.sampling import SamplingParams

TOK = gpt.get_tokenizer("byte")


@pytest.fixture(params=["gpt", "seq2seq"])
def model(request):
    torch.manual_seed(1)
    cfg = gpt.preset("gpt-tiny" if request.param == "gpt" else "seq2seq-tiny")
    return gpt.build_model(cfg).eval()


def _greedy(model, prompt, n=16):
    return complete(model, TOK, [prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]


def test_prompts_of_different_lengths_batched_together_match_each_alone(model):
    prompts = ["Hi", "a longer prompt here", "mid size"]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    together = complete(model, TOK, prompts, params)
    for p, c in zip(prompts, together):
        assert c.token_ids == _greedy(model, p, 12).token_ids


def test_seeded_sampling_in_a_batch_matches_the_same_request_alone(model):
    params = [SamplingParams(max_new_tokens=10, seed=s, top_k=20, ignore_eos=True) for s in (1, 2, 3)]
    together = complete(model, TOK, ["aa", "bbbbbbb", "c"], params)
    alone = complete(model, TOK, ["bbbbbbb"], params[1])[0]
    assert together[1].token_ids == alone.token_ids


def test_streamed_text_joins_to_the_non_streamed_text(model):
    kw = dict(max_new_tokens=30, temperature=0.9, seed=5)
    assert "".join(generate(model, TOK, "Once", stream=True, **kw)) == generate(model, TOK, "Once", **kw)


def test_streaming_never_splits_a_multibyte_character():
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    # the byte-level model is forced to emit "€" (three byte tokens) and then "A"
    assert list(_stream_forced(model, [0xE2, 0x82, 0xAC, 0x41])) == ["€", "A"]


def _stream_forced(model, forced):
    """Stream from a model whose next token is dictated by `forced`, one per step."""
    from gpt.generate import generate_batch

    params = SamplingParams(max_new_tokens=len(forced), temperature=0, ignore_eos=True)
    return (
        piece.text
        for _, piece in generate_batch(ForcedModel(model, forced), TOK, [[1]], [params])
        if piece.text
    )


def test_stop_string_spanning_tokens_ends_the_text_before_it(model):
    full = _greedy(model, "The", 20)
    text = TOK.decode(full.token_ids)
    stop = text[5:8]  # three byte-tokens: the stop spans token boundaries
    out = complete(
        model, TOK, ["The"], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    )[0]
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop"
    streamed = "".join(
        generate(model, TOK, "The", stream=True, max_new_tokens=20, temperature=0, ignore_eos=True, stop=stop)
    )
    assert streamed == out.text  # no partial stop string leaks into the stream


def test_max_new_tokens_ends_with_finish_reason_length(model):
    out = _greedy(model, "abc", 7)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_end_of_text_ends_with_finish_reason_stop(model):
    out = complete(
        model,
        TOK,
        ["abc"],
        SamplingParams(max_new_tokens=20, temperature=0, logit_bias={TOK.eot_token: 100.0}),
    )[0]
    assert out.token_ids == [TOK.eot_token] and out.text == "" and out.finish_reason == "stop"


def test_generation_stops_at_the_context_limit():
    model = gpt.GPT(gpt.preset("gpt-tiny", block_size=16)).eval()
    out = complete(
        model, TOK, ["0123456789"], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        generate(model, TOK, "x" * 16, max_new_tokens=5)


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, TOK, "", max_new_tokens=5)


def test_beam_search_with_one_beam_equals_greedy(model):
    greedy = _greedy(model, "Beam", 16)
    one = beam_search(
        model, TOK, TOK.encode("Beam"), SamplingParams(max_new_tokens=16, num_beams=1, ignore_eos=True)
    )[0]
    assert one.token_ids == greedy.token_ids


def test_four_beams_end_with_a_log_probability_at_least_greedys(model):
    for prompt in ("Beam", "search", "xyz"):
        greedy = _greedy(model, prompt, 16)
        best = beam_search(
            model, TOK, TOK.encode(prompt), SamplingParams(max_new_tokens=16, num_beams=4, ignore_eos=True)
        )[0]
        assert len(best.token_ids) == 16
        assert best.logprob >= greedy.logprob - 1e-4


def test_beam_search_returns_num_beams_hypotheses_best_first(model):
    outs = beam_search(
        model,
        TOK,
        TOK.encode("abc"),
        SamplingParams(max_new_tokens=8, num_beams=3, length_penalty=0.0, ignore_eos=True),
    )
    assert len(outs) == 3
    assert [o.logprob for o in outs] == sorted((o.logprob for o in outs), reverse=True)


def test_generate_with_num_beams_uses_beam_search(model):
    text = generate(model, TOK, "abc", max_new_tokens=8, num_beams=3, ignore_eos=True)
    best = beam_search(
        model, TOK, TOK.encode("abc"), SamplingParams(max_new_tokens=8, num_beams=3, ignore_eos=True)
    )[0]
    assert text == best.text


def test_logprobs_are_reported_per_token(model):
    out = complete(
        model, TOK, ["abc"], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    )[0]
    assert len(out.logprobs) == 5 and len(out.top_logprobs) == 5
    for lp, tops, tok in zip(out.logprobs, out.top_logprobs, out.token_ids):
        assert max(tops.values()) == pytest.approx(lp)  # greedy picks the most likely
        assert tok in tops
