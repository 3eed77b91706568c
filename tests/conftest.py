import os

import pytest
import torch

import gpt
from gpt import fast_defaults

# Tests run tiny models: one thread avoids OpenMP start-up costs and contention on small machines.
# Servers and commands the tests start as subprocesses take one thread too: two test workers each
# running a two-thread subprocess on two cores leave OpenMP's threads spinning for each other.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests decode tiny models for a few tokens, and compare servers with the library: by default
# they run as the library does, uncompiled on the model's own cache dtype, not with what
# gpt.fast_defaults would choose for this machine (compiling would cost each server start tens
# of seconds, and a float16 cache rounds logits that the comparisons hold exact). Servers run as
# subprocesses read the variables; in-process ones (module-scoped fixtures included) are told the
# machine has neither a compiler nor our float16 kernel. Tests of the choice itself are marked
# `real_fast_defaults`; tests of compiling or of a float16 cache ask for them by name.
os.environ.setdefault("GPT_SERVE_COMPILE", "0")
os.environ.setdefault("GPT_SERVE_KV_CACHE_DTYPE", "float32")
_real = {name: getattr(fast_defaults, name) for name in ("cpp_compiler_present", "half_cache_fits")}
fast_defaults.cpp_compiler_present = lambda: False
fast_defaults.half_cache_fits = lambda model: False


@pytest.fixture(autouse=True)
def _real_fast_defaults(request, monkeypatch):
    if "real_fast_defaults" in request.keywords:
        for name, function in _real.items():
            monkeypatch.setattr(fast_defaults, name, function)


def pytest_collection_modifyitems(items):
    """Files that hold a test marked `slow` come first: the two workers (pytest-xdist, a file at
    a time) then end together, instead of one of them running a slow file alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file keeps its order


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
