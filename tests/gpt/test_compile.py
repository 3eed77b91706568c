"""gpt.compile_decode: the compiled decode step gives what the eager one gives, with one graph
for every prompt and output length (and, where batched steps compile, for every batch size)."""

import dataclasses
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import gpt
from gpt.compile import is_compiled, warm_up

BYTES = gpt.get_tokenizer("byte")
PROMPTS = ["Once upon a time", "x", "A longer prompt, to move the lengths around a little more"]

pytestmark = [
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="torch.compile (inductor) needs a C++ compiler on CPU",
    ),
    pytest.mark.slow,  # each new graph compiles for seconds
]


def _twin(model):
    twin = gpt.build_model(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_compiled_int8_decode_matches_eager_with_one_graph_for_every_length(preset):
    model = gpt.build_model(gpt.preset(preset)).eval()
    fast = gpt.compile_decode(gpt.quantize(_twin(model), "int8"))
    eager = gpt.quantize(model, "int8")
    assert is_compiled(fast) and not is_compiled(eager)
    graphs = counters["stats"]["unique_graphs"]
    warm_up(fast)
    made = 1  # a speculative draft's verification is a batched step: on the same graph, or eager
    assert counters["stats"]["unique_graphs"] == graphs + made
    params = gpt.SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        want = gpt.complete(eager, BYTES, [prompt], [params], speculative="off")[0]
        got = gpt.complete(fast, BYTES, [prompt], [params], speculative="off")[0]
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs + made  # no recompiling for other lengths


@pytest.mark.parametrize("int8", [True, False])
def test_speculative_verification_runs_on_the_steps_graph_and_changes_no_bit(monkeypatch, int8):
    """A draft's verification is a decode step whose rows are its tokens: it runs on the graph of
    one-token steps (int8 steps compile for every batch size where they run on our kernel, no
    VNNI; float32 ones for one sequence), for drafts of any length, and gives the tokens and the
    very logprobs of decoding without it."""
    monkeypatch.setattr(gpt.quantization, "_QLINEAR", [False])
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    fast = gpt.compile_decode(gpt.quantize(_twin(model), "int8") if int8 else _twin(model))
    eager = gpt.quantize(model, "int8") if int8 else model
    warm_up(fast)
    graphs = counters["stats"]["unique_graphs"]
    ((key, compiled),) = fast._compiled_stack.unguarded.items()
    rows = []

    def counted(stack, wte, idx, *args, **kwargs):
        rows.append(idx.shape[0])
        return compiled(stack, wte, idx, *args, **kwargs)

    fast._compiled_stack.unguarded[key] = counted
    for prompt, temperature in zip(PROMPTS, (0.0, 0.8, 0.0)):
        params = gpt.SamplingParams(max_new_tokens=24, temperature=temperature, seed=3, ignore_eos=True)
        want = gpt.complete(fast, BYTES, [prompt], params, speculative="off")[0]
        assert want.token_ids == gpt.complete(eager, BYTES, [prompt], params, speculative="off")[0].token_ids
        half = BYTES.decode(want.token_ids[:12]) + "zz"  # right for a while, then wrong
        for prediction in (want.text, half):
            spec = dataclasses.replace(params, prediction=prediction)
            got = gpt.complete(fast, BYTES, [prompt], spec, speculative="ngram")[0]
            assert got.token_ids == want.token_ids
            assert got.logprobs == want.logprobs
            assert got.accepted_prediction_tokens > 0
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(set(r for r in rows if r > 1)) > 1  # drafts of several lengths ran on the one graph


def test_gpt_generate_compile_flag(tmp_path, capsys):
    from gpt.cli import main

    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    gpt.save(model, str(tmp_path / "m"), tokenizer="byte")
    args = ["--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"]
    assert main([*args, "hello"]) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--quantize", "int8", "--compile", "hello"]) == 0
    quantized = gpt.quantize(_twin(model), "int8")
    want = gpt.complete(
        quantized, BYTES, ["hello"], [gpt.SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)]
    )[0].text
    assert capsys.readouterr().out.startswith(want) and eager


needs_native = pytest.mark.skipif(not gpt.kernels.attention_available(), reason="needs our attention kernel")


def _greedy(model, prompt, n=8, rows=1):
    """Greedy ids of one prompt decoded in row `rows - 1` of a `rows`-row cache."""
    cache, row = model.new_cache(rows), slice(rows - 1, rows)
    with torch.inference_mode():
        logits = model.start([BYTES.encode(prompt)], cache, rows=row)
        out = []
        for _ in range(n):
            out.append(int(logits.argmax(-1)))
            logits = model.step(torch.tensor([[out[-1]]]), cache, rows=row)
    return out


@needs_native
def test_unguarded_graphs_are_kept_per_model_and_per_cache_shape():
    """Steps that run without dynamo's guards must never be handed another model's graph (two
    configs in one process) or one traced for another cache shape."""
    models = [
        gpt.GPT(gpt.preset("gpt-tiny", n_layer=n, n_embd=e, n_head=2)).eval() for n, e in [(2, 32), (3, 48)]
    ]
    fast = [gpt.compile_decode(gpt.quantize(_twin(m), "int8")) for m in models]
    eager = [gpt.quantize(m, "int8") for m in models]
    for rows in (1, 3):
        for f, e in zip(fast, eager):
            assert _greedy(f, "Once upon", rows=rows) == _greedy(e, "Once upon", rows=rows)
    for f in fast:
        assert len(f._compiled_stack.unguarded) == 2  # one graph for each cache shape


@needs_native
def test_steps_that_need_guards_keep_them():
    model = gpt.compile_decode(gpt.quantize(gpt.build_model(gpt.preset("seq2seq-tiny")).eval(), "int8"))
    warm_up(model)
    assert not model._compiled_stack.unguarded
    model = gpt.compile_decode(gpt.quantize(gpt.GPT(gpt.preset("gpt-tiny")).eval(), "int8"))
    model.train()  # dropout: the eval graph does not fit
    with torch.no_grad():
        cache = model.new_cache(1)
        model.start([[1, 2]], cache)
        model.step(torch.zeros(1, 1, dtype=torch.long), cache)
    assert not model._compiled_stack.unguarded


@needs_native
def test_moving_the_model_drops_its_unguarded_graphs():
    model = gpt.compile_decode(gpt.quantize(gpt.GPT(gpt.preset("gpt-tiny")).eval(), "int8"))
    warm_up(model)
    assert model._compiled_stack.unguarded
    model.to("cpu")
    assert not model._compiled_stack.unguarded


def test_a_torch_without_guard_filters_keeps_the_guards(monkeypatch):
    monkeypatch.setattr(gpt.compile, "_SKIP_GUARDS", None)
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    fast = gpt.compile_decode(gpt.quantize(_twin(model), "int8"))
    assert _greedy(fast, "Once upon") == _greedy(gpt.quantize(model, "int8"), "Once upon")
    assert not fast._compiled_stack.unguarded


def _greedy_rows(model, prompts, cache, rows, n=6):
    """Greedy ids and their log-probabilities of `prompts` decoded together in `rows` of `cache`."""
    out, logps = [[] for _ in prompts], [[] for _ in prompts]
    with torch.inference_mode():
        logits = model.start([BYTES.encode(p) for p in prompts], cache, rows=rows)
        for _ in range(n):
            lp = torch.log_softmax(logits.float(), -1)
            ids = lp.argmax(-1)
            for i, t in enumerate(ids.tolist()):
                out[i].append(t)
                logps[i].append(float(lp[i, t]))
            logits = model.step(ids[:, None], cache, rows=rows)
    return out, logps


@needs_native
def test_batched_int8_steps_compile_once_for_every_batch_size_where_they_run_our_kernel(monkeypatch):
    """Without oneDNN's int8 linear (a CPU without VNNI), batches run on our kernel eagerly, and
    their steps compile: one graph, traced with the batch size symbolic, for rows of any number
    (one included), any lengths, contiguous or not."""
    monkeypatch.setattr(gpt.quantization, "_QLINEAR", [False])
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    fast = gpt.compile_decode(gpt.quantize(_twin(model), "int8"))
    eager = gpt.quantize(model, "int8")
    caches = fast.new_cache(5), eager.new_cache(5)
    warm_up(fast, caches[0])
    assert len(fast._compiled_stack.unguarded) == 1  # every batch, one row included
    for rows, prompts in [
        (slice(0, 2), PROMPTS[:2]),
        (slice(1, 4), PROMPTS),
        (torch.tensor([4, 0, 2]), PROMPTS[::-1]),
        (slice(0, 5), PROMPTS + PROMPTS[:2]),
    ]:
        (got, got_lp), (want, want_lp) = (
            _greedy_rows(m, prompts, c, rows) for m, c in zip((fast, eager), caches)
        )
        assert got == want
        for g, w in zip(got_lp, want_lp):
            assert g == pytest.approx(w, abs=1e-3)
    assert len(fast._compiled_stack.unguarded) == 1


@needs_native
def test_batched_steps_stay_eager_where_eager_runs_onednn():
    """A float32 model's batches run on oneDNN's prepacked weights, which a graph does not
    reach: only its single-row steps compile."""
    model = gpt.GPT(gpt.preset("gpt-tiny")).eval()
    fast = gpt.compile_decode(_twin(model))
    caches = fast.new_cache(3), model.new_cache(3)
    warm_up(fast, caches[0])
    assert len(fast._compiled_stack.unguarded) == 1
    graphs = counters["stats"]["unique_graphs"]
    got, want = (_greedy_rows(m, PROMPTS, c, slice(0, 3)) for m, c in zip((fast, model), caches))
    assert got[0] == want[0]
    assert counters["stats"]["unique_graphs"] == graphs and len(fast._compiled_stack.unguarded) == 1
