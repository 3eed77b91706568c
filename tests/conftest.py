import pytest
import torch

import gpt

# Tests run tiny models: one thread avoids OpenMP start-up costs and contention on small machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_gpt():
    return gpt.GPT(gpt.preset("gpt-tiny")).eval()


@pytest.fixture
def tiny_s2s():
    return gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")).eval()


@pytest.fixture
def stand_in_cuda_graphs(monkeypatch):
    """gpt.cuda_graphs on the CPU: a 'recorded' step re-runs its step function eagerly on every
    replay, into the same output buffer, and steps are accepted on any device. Everything but
    the CUDA capture itself (buckets, riders, input buffers, bookkeeping) is then exercised by
    tests that run everywhere."""
    from types import SimpleNamespace

    from gpt.cuda_graphs import DecodeGraphs, _Graph

    def record(self, model, stack, wte, head, cache, pool):
        self.index[0].fill_(self.spare)
        self.index[1:].zero_()
        body = lambda: self._body(model, stack, wte, head, cache)  # noqa: E731
        self.out = body()
        self.graph = SimpleNamespace(replay=lambda: self.out.copy_(body()))

    def accepts(self, idx, cache, n_tokens, last_only):
        return (
            self.failed is None
            and idx.shape[1] == 1
            and n_tokens is None
            and last_only
            and cache.max_src_len == 0
            and not torch.is_grad_enabled()
        )

    monkeypatch.setattr(_Graph, "record", record)
    monkeypatch.setattr(DecodeGraphs, "accepts", accepts)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
