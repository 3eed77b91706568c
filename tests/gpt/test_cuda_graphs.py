"""gpt.cuda_graph_decode: the recorded decode step computes what the eager step computes.

The step a graph records (rows 0..Bb-1, keys 0..Kb-1, riders writing to the spare slot, masked
keys) is ordinary PyTorch, so it is checked on the CPU, against the eager step, on every
machine. Recording and replaying need a GPU: those tests run where CUDA is available."""

import dataclasses
import gc

import pytest
import torch

import gpt
from gpt.cuda_graphs import MIN_KEYS, DecodeGraphs, _bucket, _buckets, _Graph, record_decode_graphs

BYTES = gpt.get_tokenizer("byte")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(pos_encoding="learned", device="cpu", dtype=torch.float32):
    config = dataclasses.replace(gpt.preset("gpt-tiny"), pos_encoding=pos_encoding)
    return gpt.GPT(config).eval().to(device=device, dtype=dtype)


def _eager_and_graphed_on_cuda():
    """Two models with the same weights on the GPU, the second replaying CUDA graphs."""
    model = _model(device="cuda")
    graphed = gpt.cuda_graph_decode(_model(device="cuda"))
    graphed.load_state_dict(model.state_dict())
    return model, graphed


def _prefilled(model, prompts, max_len=40):
    cache = model.new_cache(len(prompts), max_len=max_len)
    model.start(prompts, cache)
    return cache


def test_buckets_are_powers_of_two_capped_at_the_cache():
    assert [_bucket(n, 1, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert _bucket(1, MIN_KEYS, 1024) == MIN_KEYS and _bucket(65, MIN_KEYS, 100) == 100
    assert _buckets(1, 6) == [1, 2, 4, 6] and _buckets(MIN_KEYS, 32) == [32]


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@torch.inference_mode()
def test_recorded_step_matches_eager_step_and_leaves_riders_rows_alone(pos_encoding):
    model = _model(pos_encoding)
    prompts = [[5, 6, 7], [8] * 9, [1, 2], [3] * 20]
    eager_cache, graph_cache = _prefilled(model, prompts), _prefilled(model, prompts)
    rows = torch.tensor([2, 0])  # rows 1 and 3 ride along; the caller's order is not the cache's
    tokens = torch.tensor([[11], [12]])
    want = model.step(tokens, eager_cache, rows=rows)

    got_rows, positions = graph_cache.advance_one(2, rows)
    assert got_rows.tolist() == [2, 0] and positions.tolist() == [2, 3]
    g = _Graph(
        rows=4,
        keys=_bucket(int(positions.max()) + 1, 16, graph_cache.max_len),
        spare=graph_cache.max_len,
        device=torch.device("cpu"),
    )
    g.load(tokens, got_rows, positions)
    got = g._body(model, *model.decode_parts(), graph_cache)[:2]

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(graph_cache.lengths, eager_cache.lengths)
    for a, b in zip(
        eager_cache.layers, graph_cache.layers
    ):  # every real position; only the spare slot differs
        torch.testing.assert_close(a.k[:, :, :-1], b.k[:, :, :-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(a.v[:, :, :-1], b.v[:, :, :-1], rtol=0, atol=1e-6)


def test_advance_one_checks_the_cache_length_before_moving_anything():
    model = _model()
    cache = _prefilled(model, [[1] * 5, [2] * 3], max_len=5)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.advance_one(2, None)
    assert cache.lengths.tolist() == [5, 3]


@torch.inference_mode()
def test_on_a_cpu_the_step_stays_eager():
    model = gpt.cuda_graph_decode(_model())
    params = gpt.SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    got = gpt.complete(model, BYTES, ["abc", "de"], [params, params], speculative="off")
    model._decode_graphs = None
    assert got == gpt.complete(model, BYTES, ["abc", "de"], [params, params], speculative="off")
    assert not DecodeGraphs().accepts(torch.zeros(1, 1, dtype=torch.long), model.new_cache(1), None, True)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@torch.inference_mode()
def test_graph_bookkeeping_matches_eager_generation_as_the_batch_shrinks(stand_in_cuda_graphs, pos_encoding):
    eager = _model(pos_encoding)
    graphed = gpt.cuda_graph_decode(_model(pos_encoding))
    graphed.load_state_dict(eager.state_dict())
    prompts = ["Once upon a time", "x", "A longer prompt, to move the lengths around", "yz"]
    # rows finish at different steps: the batch shrinks to non-contiguous rows that others ride along with
    params = [
        gpt.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
        for n in (20, 3, 9, 5)
    ]
    want = gpt.complete(eager, BYTES, prompts, params)
    got = gpt.complete(graphed, BYTES, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert graphed._decode_graphs.failed is None


@torch.inference_mode()
def test_a_step_that_cannot_be_recorded_falls_back_to_eager_once_with_a_warning(
    stand_in_cuda_graphs, monkeypatch
):
    model = gpt.cuda_graph_decode(_model())
    cache = _prefilled(model, [[1, 2, 3]])

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_Graph, "record", broken)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        logits = model.step(torch.tensor([[4]]), cache)
    assert cache.lengths.tolist() == [4] and logits.shape == (1, model.config.vocab_size)
    assert "stream is capturing" in model._decode_graphs.failed


@torch.inference_mode()
def test_check_compares_a_replayed_step_with_the_eager_one(stand_in_cuda_graphs, monkeypatch):
    model = gpt.cuda_graph_decode(_model())
    cache = model.new_cache(2, max_len=16)
    graphs = model._decode_graphs
    assert graphs.check(model, cache) is None and cache.lengths.tolist() == [0, 0]
    real_body = _Graph._body
    monkeypatch.setattr(_Graph, "_body", lambda self, *a: real_body(self, *a) * 1.5)  # a wrong step
    graphs.clear()
    assert "differs from the eager step" in graphs.check(model, cache)
    assert cache.lengths.tolist() == [0, 0]


@torch.inference_mode()
def test_record_decode_graphs_leaves_the_model_eager_when_the_check_fails(stand_in_cuda_graphs, monkeypatch):
    model = _model()
    cache = model.new_cache(2, max_len=16)
    assert (
        record_decode_graphs(model, cache) == (0, None) and model._decode_graphs is not None
    )  # CPU: none needed
    real_body = _Graph._body
    monkeypatch.setattr(_Graph, "_body", lambda self, *a: real_body(self, *a) + 1.0)
    n, problem = record_decode_graphs(model, cache)
    assert n == 0 and "differs" in problem and model._decode_graphs is None
    assert cache.lengths.tolist() == [0, 0]


# --- on a GPU ----------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replayed_generation_matches_eager_generation(dtype):
    torch.manual_seed(0)
    eager = _model(device="cuda", dtype=dtype)
    graphed = gpt.cuda_graph_decode(_model(device="cuda", dtype=dtype))
    graphed.load_state_dict(eager.state_dict())
    # rows of different lengths that finish at different steps: the batch shrinks and rides along
    prompts = ["Once upon a time", "x", "A longer prompt, to move the lengths around"]
    params = [gpt.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (30, 5, 12)]
    with torch.inference_mode():
        want = gpt.complete(eager, BYTES, prompts, params)
        got = gpt.complete(graphed, BYTES, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=tol)


@cuda
@torch.inference_mode()
def test_replay_matches_the_eager_step_logits_at_every_length():
    model, graphed = _eager_and_graphed_on_cuda()
    prompts = [[5, 6, 7], [8] * 9]
    a, b = _prefilled(model, prompts, max_len=64), _prefilled(graphed, prompts, max_len=64)
    tok = torch.tensor([[1], [2]], device="cuda")
    for _ in range(40):  # crosses key buckets
        want, got = model.step(tok, a), graphed.step(tok, b)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tok = want.argmax(-1, keepdim=True)
    assert graphed._decode_graphs.count(b) >= 1


@cuda
@torch.inference_mode()
def test_record_all_covers_every_bucket_and_moving_the_model_drops_them():
    model = gpt.cuda_graph_decode(_model(device="cuda"))
    cache = model.new_cache(6, max_len=48)
    n = model._decode_graphs.record_all(model, cache)
    assert n == len(_buckets(1, 6)) * len(_buckets(MIN_KEYS, 48)) == 4
    assert cache.lengths.tolist() == [0] * 6  # recording appends nothing
    model.half()
    assert model._decode_graphs.count(cache) == 0


@cuda
@torch.inference_mode()
def test_a_new_cache_records_after_the_last_one_and_its_graphs_are_gone():
    model, graphed = _eager_and_graphed_on_cuda()
    tok = torch.tensor([[1]], device="cuda")
    for _ in range(2):  # the second cache must not record into the first one's retired memory pool
        a, b = _prefilled(model, [[5, 6, 7]], max_len=64), _prefilled(graphed, [[5, 6, 7]], max_len=64)
        torch.testing.assert_close(graphed.step(tok, b), model.step(tok, a), rtol=1e-4, atol=1e-4)
        assert graphed._decode_graphs.failed is None and graphed._decode_graphs.count(b) == 1
        del a, b
        gc.collect()


@cuda
@torch.inference_mode()
def test_cached_steps_on_a_gpu_keep_off_cudnn_attention():
    # cuDNN's attention builds a plan per new key length: ~65 ms a step on an H100 (torch 2.11)
    model = _model(device="cuda", dtype=torch.float16)
    cache = model.new_cache(3, max_len=64)
    model.start([[1, 2, 3], [4] * 7, [5] * 11], cache)  # staggered rows: the step needs a mask
    tok = torch.tensor([[1], [2], [3]], device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model.step(tok, cache)
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    assert kernels and not any("cudnn" in k.lower() for k in kernels)
