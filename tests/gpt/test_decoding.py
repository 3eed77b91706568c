"""The per-sequence decoding state, its pieces, and the one owner of context limits."""

import pytest
import torch
from forced_model import ForcedModel

import gpt
from gpt import ContextLimits, Piece, RequestError, SamplingParams, SequenceDecoder
from gpt.beam import beam_search
from gpt.generate import complete

BYTES = gpt.get_tokenizer("byte")
GPT2 = gpt.get_tokenizer("gpt2")


def _decoder(text_budget=10, **kw):
    return SequenceDecoder(BYTES, [1, 2], SamplingParams(max_new_tokens=text_budget, **kw))


def _feed(d, text):
    return [d.accept(b, -0.5) for b in text.encode()]


def test_end_of_text_finishes_with_stop_and_releases_held_back_text():
    d = _decoder(stop=["xyz"])
    pieces = _feed(d, "abx")  # "x" may start "xyz": held back
    assert "".join(p.text for p in pieces) == "ab"
    last = d.accept(BYTES.eot_token, -0.1)
    assert (last.text, last.finish_reason, d.finished) == ("x", "stop", True)


def test_ignore_eos_treats_end_of_text_as_a_token():
    d = _decoder(ignore_eos=True)
    assert d.accept(BYTES.eot_token, -0.1).finish_reason is None


def test_a_stop_string_across_tokens_is_cut_and_never_shown():
    d = _decoder(stop=["cd"])
    pieces = _feed(d, "abcd")
    assert "".join(p.text for p in pieces) == "ab" and pieces[-1].finish_reason == "stop"


def test_the_budget_ends_with_length_unless_a_stop_completes_in_the_tail():
    d = _decoder(text_budget=3)
    pieces = _feed(d, "abc")
    assert [p.finish_reason for p in pieces] == [None, None, "length"] and d.completion().text == "abc"
    with pytest.raises(RuntimeError):
        d.accept(65, -1.0)


def test_end_from_outside_flushes_only_when_asked():
    d = _decoder(stop=["xyz"])
    _feed(d, "ax")
    assert d.end("timeout", flush=True).text == "x"
    d2 = _decoder(stop=["xyz"])
    _feed(d2, "ax")
    assert d2.end("cancelled").text == "" and d2.finish_reason == "cancelled"


def test_merged_pieces_are_the_whole_completion():
    d = _decoder(stop=["q"], logprobs=1)
    pieces = [d.accept(b, -float(i), {b: -float(i)}) for i, b in enumerate(b"hello q")]
    whole = pieces[0]
    for p in pieces[1:]:
        whole = whole.merge(p)
    assert whole.text == "hello " and whole.token_ids == list(b"hello q")
    assert whole.logprobs == [-float(i) for i in range(7)] and len(whole.top_logprobs) == 7
    assert whole.finish_reason == "stop" and whole.completion_tokens == 7 and whole.prompt_tokens == 2
    assert whole.logprob == pytest.approx(-21.0)


def test_a_fork_decodes_independently_of_its_parent():
    d = _decoder(stop=["bc"])
    _feed(d, "ab")
    twin = d.fork()
    assert twin.accept(ord("c"), 0.0).finish_reason == "stop"
    assert d.accept(ord("x"), 0.0).finish_reason is None
    assert (twin.completion().text, d.completion().text) == ("a", "abx")
    assert d.output_ids == list(b"abx") and twin.output_ids == list(b"abc")


def test_beam_search_and_sampling_cut_stop_strings_the_same_way():
    # " hello" is one GPT-2 token: "ll" completes first (earliest end), though " hello" starts first
    (tok,) = GPT2.encode(" hello")
    inner = gpt.GPT(gpt.preset("gpt-tiny", vocab_size=GPT2.vocab_size, tokenizer="gpt2")).eval()
    params = dict(max_new_tokens=4, temperature=0, stop=[" hello", "ll"])
    sampled = complete(ForcedModel(inner, [tok]), GPT2, [[11]], SamplingParams(**params))[0]
    beams = beam_search(ForcedModel(inner, [tok]), GPT2, [11], SamplingParams(num_beams=2, **params))
    assert sampled.text == beams[0].text == " he"
    assert sampled.finish_reason == beams[0].finish_reason == "stop"


def test_both_model_kinds_start_the_same_way_and_the_decoder_start_token_is_in_the_config():
    config = gpt.preset("seq2seq-tiny", decoder_start_token=5)
    model = gpt.EncoderDecoder(config).eval()
    assert gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")).start_token == BYTES.eot_token
    cache = model.new_cache(1, max_len=8)
    src = [[3, 4, 5, 6]]
    with torch.no_grad():
        started = model.start(src, cache, rows=slice(0, 1))
        full = model(torch.tensor(src), torch.tensor([[5]]))[0, -1]
    assert torch.allclose(started[0], full, atol=1e-5)
    assert config.is_seq2seq and not gpt.preset("gpt-tiny").is_seq2seq


def test_new_cache_refuses_rows_longer_than_the_block():
    with pytest.raises(ValueError, match="block_size"):
        gpt.GPT(gpt.preset("gpt-tiny")).new_cache(1, max_len=65)


# --- ContextLimits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_limits():
    return ContextLimits.of(gpt.GPT(gpt.preset("gpt-tiny")), BYTES, max_len=32, max_prompt_tokens=20)


@pytest.mark.parametrize(
    "ids,message",
    [
        ([], "the prompt is empty"),
        ([1, 257], "token id 257 is out of range"),
        ([1, -1], "token id -1 is out of range"),
        ([1] * 21, "this server accepts at most 20"),
    ],
)
def test_bad_prompts_are_refused_naming_the_parameter(gpt_limits, ids, message):
    with pytest.raises(RequestError, match=message) as e:
        gpt_limits.check_prompt(ids, param="messages")
    assert e.value.param == "messages"


def test_a_prompt_filling_the_context_leaves_no_room():
    limits = ContextLimits.of(gpt.GPT(gpt.preset("gpt-tiny")), BYTES, max_len=32)
    assert limits.check_prompt([1] * 31) == [1] * 31
    with pytest.raises(RequestError, match="no room") as e:
        limits.check_prompt([1] * 32)
    assert e.value.code == "context_length_exceeded"


def test_budget_defaults_shrink_explicit_ones_fit_or_fail_or_clamp(gpt_limits):
    assert gpt_limits.budget(10, None) == 22 and gpt_limits.budget(10, None, default=8) == 8
    assert gpt_limits.budget(30, None, default=8) == 2
    assert gpt_limits.budget(10, 22) == 22 and gpt_limits.budget(10, 50, clamp=True) == 22
    with pytest.raises(RequestError, match="the prompt has 10 tokens and max_tokens is 23") as e:
        gpt_limits.budget(10, 23, param="max_tokens")
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")


def test_an_encoder_decoders_source_and_output_have_separate_room():
    limits = ContextLimits.of(gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")), BYTES)
    assert limits.is_seq2seq and limits.check_prompt([1] * 64) == [1] * 64
    assert limits.budget(64, None) == 63
    with pytest.raises(RequestError, match="generates at most 63"):
        limits.budget(3, 64)
    with pytest.raises(RequestError, match="source context is 64"):
        limits.check_prompt([1] * 65)


def test_prompt_ids_must_fit_both_the_model_and_the_tokenizer():
    padded = gpt.GPT(gpt.preset("gpt-tiny", vocab_size=300))
    assert ContextLimits.of(padded, BYTES).vocab_size == 257 and ContextLimits.of(padded).vocab_size == 300


def test_library_generation_clamps_the_budget_to_the_context():
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    out = complete(
        model, BYTES, [[1] * 60], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert isinstance(out, Piece)


def test_a_stop_token_id_ends_like_end_of_text_and_is_not_shown():
    d = _decoder(stop_token_ids=[ord(";")])
    pieces = _feed(d, "ab;")
    assert "".join(p.text for p in pieces) == "ab"
    assert (pieces[-1].finish_reason, d.output_ids[-1]) == ("stop", ord(";"))


def test_min_tokens_holds_back_end_of_text_and_stop_tokens_but_not_other_tokens():
    V = BYTES.vocab_size
    logits = torch.full((3, V), -10.0)
    logits[:, BYTES.eot_token] = 10.0  # the model wants to stop at once...
    logits[:, ord(";")] = 9.0  # ...or to emit the stop token
    logits[:, ord("a")] = 1.0
    decoders = [
        SequenceDecoder(BYTES, [1], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[ord(";")])),
        SequenceDecoder(BYTES, [1], SamplingParams(temperature=0, min_tokens=0)),
        SequenceDecoder(
            BYTES, [1], SamplingParams(temperature=0.7, seed=1, min_tokens=2, stop_token_ids=[ord(";")])
        ),
    ]
    first = gpt.decode_tokens(logits, decoders)
    assert [p.token_ids[0] for p in first] == [ord("a"), BYTES.eot_token, ord("a")]
    assert first[1].finish_reason == "stop"
    # the reported logprob is the model's own, not the masked distribution's
    assert first[0].logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[ord("a")].item())
    second = gpt.decode_tokens(logits[[0, 2]], [decoders[0], decoders[2]])
    assert [p.token_ids[0] for p in second] == [ord("a"), ord("a")]
    third = gpt.decode_tokens(logits[[0]], [decoders[0]])  # two tokens out: ending is allowed again
    assert third[0].token_ids == [BYTES.eot_token] and third[0].finish_reason == "stop"


def test_ids_past_the_tokenizer_in_a_padded_output_layer_are_never_chosen():
    V = BYTES.vocab_size
    logits = torch.zeros(2, V + 64)
    logits[:, V + 10] = 100.0  # the padded ids are by far the likeliest
    decoders = [
        SequenceDecoder(BYTES, [1], SamplingParams(temperature=0, logprobs=3)),
        SequenceDecoder(BYTES, [1], SamplingParams(temperature=1.0, seed=0, logprobs=3)),
    ]
    pieces = gpt.decode_tokens(logits, decoders)
    for p in pieces:
        assert p.token_ids[0] < V
        assert all(t < V for t in p.top_logprobs[0])


def test_beam_search_never_chooses_an_id_past_the_tokenizer():
    torch.manual_seed(0)
    inner = gpt.GPT(gpt.preset("gpt-tiny", vocab_size=BYTES.vocab_size + 64))
    padded = ForcedModel(inner, [BYTES.vocab_size + 10])  # the model insists on a padded id
    outs = beam_search(
        padded, BYTES, [1, 2, 3], SamplingParams(max_new_tokens=5, num_beams=3, ignore_eos=True)
    )
    assert all(t < BYTES.vocab_size for o in outs for t in o.token_ids)
