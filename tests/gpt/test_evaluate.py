"""Scoring held-out text: every token scored once, with as much context as the model allows."""

import math

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt.evaluate import score_pairs, score_texts, windows


@pytest.mark.parametrize(
    "n,block,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (50, 8, 8), (17, 4, 1)]
)
def test_windows_score_each_token_once_with_at_most_a_block_of_context(n, block, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for k, (inp, tgt, n_new) in enumerate(windows(ids, 0, block, stride)):
        assert len(inp) == len(tgt) <= block
        assert tgt[:-1] == inp[1:]  # targets are the inputs shifted by one
        assert n_new <= (stride if k else block)
        if k:
            assert len(inp) == block  # past the first window, the context is always full
        scored += tgt[len(tgt) - n_new :]
    assert scored == ids


def full_forward_nll(model, tok, text: str) -> float:
    ids = [tok.eot_token] + tok.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))
    return F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()


def test_a_document_inside_the_context_scores_as_one_full_forward(tiny_gpt):
    tok = gpt.get_tokenizer("byte")
    texts = ["def f(x):\n    return x\n", "short", "é" * 20]
    s = score_texts(tiny_gpt, tok, texts, batch_size=2)
    assert s.nll == pytest.approx(sum(full_forward_nll(tiny_gpt, tok, t) for t in texts), rel=1e-5)
    assert s.tokens == s.bytes == sum(len(t.encode()) for t in texts)  # bytes: per token = per byte
    assert s.nats_per_byte == pytest.approx(s.loss)
    assert s.bits_per_byte == pytest.approx(s.loss / math.log(2))
    assert s.perplexity == pytest.approx(math.exp(s.loss))


def test_long_documents_give_the_same_score_whatever_the_batch(tiny_gpt):
    tok = gpt.get_tokenizer("byte")
    texts = ["x = 1\n" * 40, "class A:\n    pass\n" * 12]  # longer than the tiny model's 64-token context
    one = score_texts(tiny_gpt, tok, texts, batch_size=1)
    many = score_texts(tiny_gpt, tok, texts, batch_size=16)
    assert one.nll == pytest.approx(many.nll, rel=1e-5)
    assert one.tokens == sum(len(t) for t in texts)


def test_disjoint_windows_equal_the_sum_of_chunk_losses(tiny_gpt):
    tok = gpt.get_tokenizer("byte")
    text = "abcdefgh" * 24  # 192 bytes = three full 64-token windows
    block = tiny_gpt.config.block_size
    ids = [tok.eot_token] + tok.encode(text)
    want = 0.0
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, block):
            x, y = ids[lo : lo + block], ids[lo + 1 : lo + block + 1]
            want += F.cross_entropy(tiny_gpt(torch.tensor([x]))[0], torch.tensor(y), reduction="sum").item()
    assert score_texts(tiny_gpt, tok, [text], stride=block).nll == pytest.approx(want, rel=1e-5)


def test_more_context_never_hurts_a_model_that_memorised_the_text():
    # A model trained on one repeated string predicts it better with longer windows' context.
    tok = gpt.get_tokenizer("byte")
    model = gpt.build_model(gpt.preset("gpt-tiny", block_size=32))
    text = "the quick brown fox jumps over the lazy dog. " * 8
    ids = torch.tensor([[tok.eot_token] + tok.encode(text)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        i = torch.randint(0, ids.shape[1] - 33, (8,))
        x = torch.stack([ids[0, j : j + 32] for j in i])
        y = torch.stack([ids[0, j + 1 : j + 33] for j in i])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert score_texts(model, tok, [text], stride=4).nll < score_texts(model, tok, [text], stride=32).nll


def test_pairs_score_the_target_and_its_end_of_text_given_the_source(tiny_s2s):
    tok = gpt.get_tokenizer("byte")
    pairs = [("12 March 2020", "2020-03-12"), ("1 May 1999", "1999-05-01")]
    s = score_pairs(tiny_s2s, tok, pairs, batch_size=1)
    want = 0.0
    with torch.no_grad():
        for src, tgt in pairs:
            t = tok.encode(tgt)
            logits = tiny_s2s(torch.tensor([tok.encode(src)]), torch.tensor([[tiny_s2s.start_token, *t]]))
            want += F.cross_entropy(logits[0], torch.tensor([*t, tok.eot_token]), reduction="sum").item()
    assert s.nll == pytest.approx(want, rel=1e-5)
    assert s.tokens == sum(len(t) + 1 for _, t in pairs)
    assert s.bytes == sum(len(t) for _, t in pairs)
    assert score_pairs(tiny_s2s, tok, pairs, batch_size=2).nll == pytest.approx(want, rel=1e-5)


def test_the_wrong_kind_of_model_or_data_is_refused(tiny_gpt, tiny_s2s):
    tok = gpt.get_tokenizer("byte")
    with pytest.raises(ValueError, match="encoder-decoder"):
        score_texts(tiny_s2s, tok, ["x"])
    with pytest.raises(ValueError, match="GPT"):
        score_pairs(tiny_gpt, tok, [("a", "b")])
    with pytest.raises(ValueError, match="stride"):
        score_texts(tiny_gpt, tok, ["x"], stride=1000)
    with pytest.raises(ValueError, match="pair 1"):
        score_pairs(tiny_s2s, tok, [("", "b")])
