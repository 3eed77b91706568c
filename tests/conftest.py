import pytest
import torch

import gpt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_gpt():
    return gpt.GPT(gpt.preset("gpt-tiny")).eval()


@pytest.fixture
def tiny_s2s():
    return gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")).eval()
