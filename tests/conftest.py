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
