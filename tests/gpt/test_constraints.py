"""Structured output (gpt.constraints) on random-weight tiny models: whatever a model prefers,
every output that ends with "stop" matches its constraint (a JSON schema, a regex, a choice, a
Lark or GBNF grammar), every one cut short is a prefix the constraint still accepts, with each
tokenizer kind and both model kinds; constrained rows leave their batch's other rows alone, and
logprobs stay the model's own."""

import json
import re

import jsonschema
import pytest
import torch
from forced_model import ForcedModel

import gpt
from gpt.constraints import CACHE, MAX_CONSTRAINT_CHARS, CompiledConstraint, Constraint
from gpt.decoding import SequenceDecoder, decode_tokens
from gpt.sampling import SamplingParams

BYTE = gpt.get_tokenizer("byte")
BPE_TEXT = [
    '{"name": "alice", "age": 30, "tags": ["a", "b"], "ok": true, "n": null}',
    "the quick brown fox jumps over the lazy dog; hello world 0123456789",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte": BYTE, "gpt2": gpt.get_tokenizer("gpt2"), "bpe": gpt.train_bpe(BPE_TEXT, 300)}


_MODELS: dict = {}


def tiny(kind: str, tok) -> torch.nn.Module:
    """A random-weight gpt-tiny or seq2seq-tiny over `tok`'s vocabulary (one per pair)."""
    key = (kind, tok.fingerprint)
    if key not in _MODELS:
        torch.manual_seed(1)
        name = "gpt-tiny" if kind == "gpt" else "seq2seq-tiny"
        _MODELS[key] = gpt.build_model(gpt.preset(name, block_size=160, vocab_size=tok.vocab_size)).eval()
    return _MODELS[key]


def replay(c: Constraint, tok, ids: list[int]):
    """A fresh state of `c` advanced by `ids`; fails unless it takes every one (an end-of-text
    only last, where the constraint accepts). Returns the state."""
    state = c.start(tok)
    for i, t in enumerate(ids):
        if t == tok.eot_token:
            assert i == len(ids) - 1 and state.matcher.is_accepting(), tok.decode(ids)
            return state
        state.advance(t)
        assert state.failed is None, (tok.decode(ids[: i + 1]), state.failed)
    return state


def check(c: Constraint, tok, out, valid) -> None:
    """A finished output satisfies `valid(text)` and ends where the constraint may end; one cut
    by the budget is a prefix the constraint accepts."""
    assert out.finish_reason in ("stop", "length"), out
    state = replay(c, tok, out.token_ids)
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == tok.eot_token or state.complete
        assert valid(out.text), out.text


def obj(required: list[str], **properties) -> dict:
    """An object schema with these properties and no others."""
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def num(kind: str, lo: float, hi: float) -> dict:
    return {"type": kind, "minimum": lo, "maximum": hi}


def string(**kw) -> dict:
    return {"type": "string", **kw}


# varied schemas: nesting, bounded arrays, enums, bounded numbers, patterns, anyOf, optional fields
SCHEMAS = [
    obj(
        ["name", "age", "tags"],
        name=string(maxLength=8),
        age=num("integer", 0, 120),
        tags={"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    ),
    obj(
        ["point", "label"],
        point=obj(["x", "y"], x=num("number", -1, 1), y=num("integer", 0, 10)),
        label=string(pattern="^[a-z]{1,4}[0-9]$"),
        note=string(maxLength=3),
    ),
    {
        "type": "array",
        "items": {
            "anyOf": [num("integer", -5, 5), {"type": "boolean"}, {"type": "null"}, {"enum": ["x", "yy"]}]
        },
        "minItems": 2,
        "maxItems": 4,
    },
    obj(
        ["kind"],
        kind={"const": "leaf"},
        v={"anyOf": [string(maxLength=2), {"type": "array", "items": num("integer", 0, 9), "maxItems": 2}]},
    ),
]


def sampler_settings(tok) -> list[dict]:
    """Greedy, and sampled under every filter and adjustment (seeded)."""
    quote, one = tok.encode('"')[0], tok.encode("1")[0]
    return [
        dict(temperature=0),
        dict(temperature=1.0, seed=1),
        dict(temperature=1.3, top_k=50, seed=2, repetition_penalty=1.3),
        dict(temperature=0.9, top_p=0.8, min_p=0.05, seed=3, presence_penalty=1.0, frequency_penalty=0.5),
        dict(temperature=1.0, seed=4, logit_bias={one: 5.0, quote: -5.0}),
    ]


def _json_valid(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema) is None  # or raises


@pytest.mark.parametrize("kind", ["gpt", "seq2seq"])
@pytest.mark.parametrize("tok_name", ["byte", "gpt2", "bpe"])
def test_every_finished_json_output_validates_against_its_schema(tokenizers, tok_name, kind):
    tok = tokenizers[tok_name]
    model = tiny(kind, tok)
    rows = [
        (schema, SamplingParams(max_new_tokens=120, constraint=Constraint.json_schema(schema), **s))
        for schema in SCHEMAS
        for s in sampler_settings(tok)
    ]
    outs = gpt.complete(model, tok, ["Q:"] * len(rows), [p for _, p in rows])
    for (schema, p), out in zip(rows, outs):
        check(p.constraint, tok, out, _json_valid(schema))
    # most finish (numbers can run on digit after digit): the test cannot pass on prefixes alone
    assert sum(o.finish_reason == "stop" for o in outs) >= len(outs) * 3 // 4


@pytest.mark.parametrize("tok_name", ["byte", "gpt2", "bpe"])
def test_regex_and_choice_outputs_match_in_full(tokenizers, tok_name):
    tok = tokenizers[tok_name]
    model = tiny("gpt", tok)
    regexes = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org) [0-9]{3}-[0-9]{4} (yes|no)(-maybe)? -?[1-9][0-9]?".split()
    options = ["red", "blue", "blue sky", "dark blue", "green"]  # a choice that prefixes another
    cases = [(Constraint.regex(r), lambda t, r=r: re.fullmatch(r, t) is not None) for r in regexes]
    cases.append((Constraint.choice(options), lambda t: t in options))
    rows = [
        (c, valid, SamplingParams(max_new_tokens=30, constraint=c, **s))
        for c, valid in cases
        for s in (dict(temperature=0), dict(seed=1), dict(seed=2, top_k=20), dict(seed=3, temperature=1.5))
    ]
    outs = gpt.complete(model, tok, ["A:"] * len(rows), [p for *_, p in rows])
    for (c, valid, _), out in zip(rows, outs):
        check(c, tok, out, valid)
    assert sum(o.finish_reason == "stop" for o in outs) >= len(outs) * 3 // 4
    chosen = {o.text for (c, *_), o in zip(rows, outs) if c.kind == "choice"}
    assert len(chosen) > 1  # sampling reaches different options


def _balanced(text: str) -> bool:
    """x | (e+e), as the recursive grammar below says: innermost pairs fold into an x."""
    while "(x+x)" in text:
        text = text.replace("(x+x)", "x")
    return text == "x"


GRAMMARS = {
    "lark": (
        'start: greeting " " NAME "!"\ngreeting: "hi" | "hello"\nNAME: /[a-z]{1,6}/\n',
        lambda t: re.fullmatch(r"(hi|hello) [a-z]{1,6}!", t) is not None,
    ),
    "lark-recursive": ('start: e\ne: "x" | "(" e "+" e ")"\n', _balanced),
    "gbnf": (
        'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [0-9] | "true" | "false"\n',
        lambda t: re.fullmatch(r"\[(?:[0-9]|true|false)(?:,(?:[0-9]|true|false)){0,2}\]", t) is not None,
    ),
}


@pytest.mark.parametrize("kind", ["gpt", "seq2seq"])
@pytest.mark.parametrize("grammar", GRAMMARS)
def test_lark_and_gbnf_grammars_constrain_output(grammar, kind):
    text, valid = GRAMMARS[grammar]
    c = Constraint.grammar(text)
    params = [SamplingParams(max_new_tokens=40, constraint=c, temperature=0)]
    params += [SamplingParams(max_new_tokens=40, constraint=c, seed=s) for s in range(1, 5)]
    outs = gpt.complete(tiny(kind, BYTE), BYTE, ["G:"] * len(params), params)
    for out in outs:
        check(c, BYTE, out, valid)
    assert any(o.finish_reason == "stop" for o in outs)


SCHEMA = SCHEMAS[0]


@pytest.mark.parametrize("kind", ["gpt", "seq2seq"])
def test_each_row_of_a_mixed_batch_decodes_as_it_would_alone(kind):
    # unconstrained rows beside constrained ones, greedy and seeded: nobody's output depends
    # on who shares the batch (nor on when the constrained rows finish and leave it)
    model = tiny(kind, BYTE)
    json_c, digits = Constraint.json_schema(SCHEMA), Constraint.regex("[0-9]{4,9}")
    prompts = ["Hello", "ab", "a longer prompt", "xyz", "q"]
    params = [
        SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=60, seed=1, constraint=json_c),
        SamplingParams(max_new_tokens=24, seed=7, top_k=20, ignore_eos=True),
        SamplingParams(max_new_tokens=24, temperature=0, constraint=digits),
        SamplingParams(max_new_tokens=24, seed=3, top_p=0.9, ignore_eos=True),
    ]
    together = gpt.complete(model, BYTE, prompts, params)
    plain = [0, 2, 4]
    without = gpt.complete(model, BYTE, [prompts[i] for i in plain], [params[i] for i in plain])
    assert [together[i].token_ids for i in plain] == [o.token_ids for o in without]
    for prompt, p, out in zip(prompts, params, together):
        assert gpt.complete(model, BYTE, [prompt], p)[0].token_ids == out.token_ids
    assert together[1].finish_reason == together[3].finish_reason == "stop"


def test_one_constraint_object_serves_several_sequences_independently():
    # n > 1: one Constraint in several rows' params; each row holds a state of its own
    model, c = tiny("gpt", BYTE), Constraint.json_schema(SCHEMA)
    params = [SamplingParams(max_new_tokens=80, seed=s, constraint=c) for s in range(4)]
    outs = gpt.complete(model, BYTE, ["Same"] * 4, params)
    assert len({o.text for o in outs}) > 1
    for p, out in zip(params, outs):
        check(c, BYTE, out, _json_valid(SCHEMA))
        assert out.finish_reason == "stop"
        assert gpt.complete(model, BYTE, ["Same"], p)[0].token_ids == out.token_ids


def test_a_stop_string_cuts_a_constrained_output_and_a_small_budget_ends_with_length():
    model, c = tiny("gpt", BYTE), Constraint.json_schema(SCHEMA)

    def run(**kw):
        return gpt.complete(model, BYTE, ["P"], SamplingParams(temperature=0, constraint=c, **kw))[0]

    full = run(max_new_tokens=80)
    assert full.finish_reason == "stop"
    stop = full.text[len(full.text) // 2 :][:2]
    cut = run(max_new_tokens=80, stop=stop)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    replay(c, BYTE, cut.token_ids)  # the tokens it took (the stop string's too) fit the schema
    short = run(max_new_tokens=6)
    assert short.finish_reason == "length" and len(short.token_ids) == 6
    assert full.text.startswith(short.text)
    check(c, BYTE, short, None)


def test_reported_logprobs_are_the_models_own_not_the_constrained_distributions():
    model, c = tiny("gpt", BYTE), Constraint.regex("[0-9]{3}")
    ids = BYTE.encode("Hi")
    logits = model.start([ids], model.new_cache(1, max_len=len(ids) + 1))[0, : BYTE.vocab_size]
    raw = torch.log_softmax(logits.float(), -1)
    params = SamplingParams(max_new_tokens=3, temperature=0, logprobs=3, constraint=c)
    out = gpt.complete(model, BYTE, [ids], params)
    first = out[0].token_ids[0]
    assert chr(first).isdigit() and raw.argmax() != first  # the model prefers something else
    assert out[0].logprobs[0] == pytest.approx(raw[first].item(), abs=1e-5)
    top_v, top_i = raw.topk(3)
    assert out[0].top_logprobs[0] == pytest.approx(dict(zip(top_i.tolist(), top_v.tolist())), abs=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0),
        dict(seed=1),
        dict(seed=2, temperature=3.0, top_p=0.5),
        dict(seed=3, top_k=2, min_p=0.5),
        dict(seed=4, repetition_penalty=2.0, frequency_penalty=-2.0, logit_bias={ord("x"): 100}),
    ],
)
def test_a_constrained_row_never_picks_a_disallowed_token_however_likely(settings):
    # hand-made logits: "x" far ahead of everything, then "y"; the constraint allows digits only
    logits = torch.zeros(2, BYTE.vocab_size)
    logits[:, ord("x")], logits[:, ord("y")] = 1000.0, 500.0
    c = Constraint.regex("[0-9]{5}")
    params = SamplingParams(max_new_tokens=8, constraint=c, logprobs=1, **settings)
    constrained = SequenceDecoder(BYTE, [1], params)
    free = SequenceDecoder(BYTE, [1], SamplingParams(max_new_tokens=8, **settings))
    for _ in range(5):
        a, b = decode_tokens(logits, [constrained, free])
        assert chr(a.token_ids[0]).isdigit() and b.token_ids == [ord("x")]
        assert a.top_logprobs[0] == {ord("x"): pytest.approx(0.0)}  # the model's favourite, reported
    assert a.finish_reason == "stop" and constrained.completion().text.isdigit()


@pytest.mark.parametrize(
    "make,param,needle",
    [
        (lambda: Constraint.json_schema({"type": "frob"}, "response_format"), "response_format", "frob"),
        (lambda: Constraint.regex("a(b", "regex"), "regex", "unclosed group"),
        (lambda: Constraint.grammar("start: greeting\n", "grammar"), "grammar", "greeting"),
        (lambda: Constraint.grammar("root ::= greeting\n", "grammar"), "grammar", "greeting"),
        (lambda: Constraint.json_schema(num("integer", 5, 1)), "constraint", "minimum"),
    ],
)
def test_an_invalid_constraint_names_its_param_and_quotes_the_reason_when_compiled(make, param, needle):
    c = make()  # building is cheap text work; compiling is where the library reads it
    with pytest.raises(gpt.RequestError) as e:
        c.compile(BYTE)
    assert e.value.param == param and e.value.code == "invalid_constraint"
    assert str(e.value).startswith(f"{param}: ") and needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(gpt.RequestError):  # generating with it: the same error, no output
        gpt.complete(tiny("gpt", BYTE), BYTE, ["x"], SamplingParams(max_new_tokens=2, constraint=c))


def test_malformed_and_oversized_constraints_are_refused_when_built():
    for make, needle in [
        (lambda: Constraint.json_schema('{"type": ', "response_format"), "not valid JSON"),
        (lambda: Constraint.json_schema(["a list"], "response_format"), "object"),
        (lambda: Constraint.regex("a" * (MAX_CONSTRAINT_CHARS + 1), "response_format"), "limit"),
        (lambda: Constraint.choice([], "response_format"), "non-empty"),
        (lambda: Constraint.grammar("  ", "response_format"), "non-empty"),
    ]:
        with pytest.raises(gpt.RequestError) as e:
            make()
        assert e.value.param == "response_format" and e.value.code == "invalid_constraint"
        assert needle in str(e.value)


@pytest.mark.parametrize(
    "kw,param", [(dict(num_beams=2), "guided_regex"), (dict(ignore_eos=True), "ignore_eos")]
)
def test_a_constraint_with_beam_search_or_ignore_eos_is_an_invalid_combination(kw, param):
    with pytest.raises(gpt.RequestError) as e:
        SamplingParams(constraint=Constraint.regex("[0-9]+", "guided_regex"), **kw)
    assert e.value.code == "invalid_combination" and e.value.param == param


def test_output_tokens_stay_within_allowed_token_ids():
    model = tiny("gpt", BYTE)
    allowed = set(BYTE.encode("ab c")) | {BYTE.eot_token}
    params = [
        SamplingParams(max_new_tokens=16, allowed_token_ids=sorted(allowed), **s)
        for s in (dict(temperature=0), dict(seed=1), dict(seed=2, top_k=3), dict(seed=3, temperature=2.0))
    ]
    # with a constraint too: only what both allow
    c = Constraint.regex("[a-z]{1,12}")
    params.append(SamplingParams(max_new_tokens=16, seed=4, allowed_token_ids=sorted(allowed), constraint=c))
    outs = gpt.complete(model, BYTE, ["Hi"] * len(params), params)
    for out in outs:
        assert out.token_ids and set(out.token_ids) <= allowed, out.text
    assert set(outs[-1].text) <= set("abc")


def test_a_constraint_left_without_a_token_to_choose_ends_with_error_and_shows_nothing_outside_it():
    # allowed_token_ids (or bad_words) that exclude everything the constraint allows
    model, c = tiny("gpt", BYTE), Constraint.regex("[0-9]+")
    for kw in (dict(allowed_token_ids=[ord("a")]), dict(bad_words=list("0123456789"), seed=1)):
        out = gpt.complete(model, BYTE, ["Hi"], SamplingParams(max_new_tokens=5, constraint=c, **kw))[0]
        assert out.finish_reason == "error" and out.text == "" and out.token_ids == []


def test_bad_words_never_appear_even_when_the_model_wants_nothing_else():
    # byte tokenizer: the model is forced to spell "cat cat cat ..." one byte at a time
    forced = BYTE.encode("cat " * 6)
    params = dict(max_new_tokens=len(forced), temperature=0)

    def run(**kw):  # a fresh ForcedModel each time: it counts its steps
        return gpt.complete(ForcedModel(tiny("gpt", BYTE), forced), BYTE, ["x"], SamplingParams(**kw))[0]

    assert "cat" in run(**params).text
    got = run(bad_words=["cat"], **params)
    assert "cat" not in got.text and "ca" in got.text


def test_bad_words_hold_against_a_huge_logit_bias_with_gpt2_tokens(tokenizers):
    tok = tokenizers["gpt2"]
    model = tiny("gpt", tok)
    (cat,) = tok.encode(" cat")
    params = dict(max_new_tokens=8, temperature=0, logit_bias={cat: 100.0}, ignore_eos=True)
    assert gpt.complete(model, tok, ["A"], SamplingParams(**params))[0].token_ids == [cat] * 8
    out = gpt.complete(model, tok, ["A"], SamplingParams(bad_words=["cat"], **params))[0]
    banned = set(tok.encode(" cat")) | set(tok.encode("cat"))
    assert not banned & set(out.token_ids) and "cat" not in out.text


def test_compiling_an_equal_constraint_again_hits_the_cache(monkeypatch):
    built = []
    build = CompiledConstraint.build
    monkeypatch.setattr(CompiledConstraint, "build", lambda *a, **k: built.append(a) or build(*a, **k))
    schema = {"type": "object", "properties": {"cache_test_a": {"type": "integer"}, "b": {"type": "string"}}}
    first = Constraint.json_schema(schema)
    # equal: the same schema with its keys in another order, from its JSON text
    second = Constraint.json_schema(json.dumps(dict(reversed(schema.items()))))
    assert first == second and first is not second
    assert (first, BYTE) not in CACHE
    compiled = first.compile(BYTE)
    assert (second, BYTE) in CACHE
    assert second.compile(BYTE) is compiled and len(built) == 1
    # each sequence still starts from its own copy of the matcher
    a, b = first.start(BYTE), second.start(BYTE)
    a.advance(ord("{"))
    assert b.matcher is not a.matcher and replay(second, BYTE, [ord("{")]).failed is None
