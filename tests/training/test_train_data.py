import datetime as dt
import json
import random

import numpy as np
import pytest
import torch
from train_helpers import make_corpus

import gpt
from training import data, pairs
from training.config import ConfigError, TrainConfig, get_lr
from training.dates import date_pair
from training.setup import make_optimizer


def test_tokens_are_cached_as_uint16_with_the_last_tenth_as_validation(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.txt").write_text("second document " * 20)
    tok = gpt.get_tokenizer("gpt2")
    files = data.find_files([str(tmp_path)])
    t = data.prepare(files, tok, tmp_path / "cache", val_fraction=0.1, block_size=8, progress=False)
    ids = tok.encode("hello world " * 50) + [tok.eot_token] + tok.encode("second document " * 20)
    assert t.train.dtype == np.uint16
    n_val = int(len(ids) * 0.1)
    assert list(t.train) == ids[:-n_val] and list(t.val) == ids[-n_val:]
    assert (t.directory / "train.bin").stat().st_size == 2 * (len(ids) - n_val)


@pytest.mark.parametrize("damage", ["truncate train.bin", "delete val.bin", "delete meta.json"])
def test_a_damaged_token_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, damage):
    files = [make_corpus(tmp_path / "c.txt", n_words=800)]
    tok, cache = gpt.get_tokenizer("byte"), tmp_path / "tokens"
    first = data.prepare(files, tok, cache, val_fraction=0.1, block_size=16, progress=False)
    d = first.directory
    train, val = np.array(first.train), np.array(first.val)
    if damage == "truncate train.bin":  # e.g. the disk filled up, or a copy was cut short
        with open(d / "train.bin", "r+b") as f:
            f.truncate(len(train))  # half its bytes (uint16 tokens)
    else:
        (d / damage.split()[1]).unlink()
    (d / ".train.bin.tmp-0a1b2c3d").write_bytes(b"\0" * 10)  # and a killed tokenization's leftover
    data.recover(cache)
    assert not list(d.glob(".*"))

    real, calls = data._tokenize, []
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(1) or real(*a))
    again = data.prepare(files, tok, cache, val_fraction=0.1, block_size=16, progress=False)
    assert calls == [1]  # tokenized again, not trusted
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    data.prepare(files, tok, cache, val_fraction=0.1, block_size=16, progress=False)
    assert calls == [1]  # and the rebuilt cache is whole: reused from then on


def test_directories_skip_binary_and_hidden_files_but_named_binaries_fail(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\0\0\xff")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    assert data.find_files([str(tmp_path)]) == [tmp_path / "a.txt"]
    with pytest.raises(ConfigError, match="not UTF-8"):
        data.find_files([str(tmp_path / "img.bin")])


def test_default_corpus_is_a_sorted_capped_stdlib_subset():
    files = data.stdlib_files()
    assert files == sorted(files) and len(files) > 50
    assert sum(f.stat().st_size for f in files) <= data.STDLIB_BYTES
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    # the held-out tests and the data-like directories stay out of it
    assert not any({"test", "tests", "encodings", "pydoc_data"} & set(f.parts) for f in files)


def test_block_sampler_targets_are_inputs_shifted_and_state_restores():
    arr = np.arange(1000, dtype=np.uint16)
    s = data.BlockSampler(arr, block_size=8, batch_size=4, seed=0)
    x, y = s.next_batch()
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    saved = s.state_dict()
    after = [s.next_batch()[0] for _ in range(3)]
    s2 = data.BlockSampler(arr, 8, 4, seed=123)
    s2.load_state_dict(saved)
    assert all(torch.equal(a, s2.next_batch()[0]) for a in after)


def test_lr_schedule_warms_up_linearly_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=100, max_iters=2000)
    lrs = [get_lr(s, cfg) for s in range(2001)]
    assert lrs[0] < lrs[50] < lrs[99] <= 1e-3
    assert lrs[100] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lrs[2000] == pytest.approx(1e-4)


def test_weight_decay_applies_only_to_matrices():
    model = gpt.GPT(gpt.preset("gpt-tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_pairs_read_from_jsonl_and_tsv_with_line_numbered_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"source": "a", "target": "b"})
        + "\n\n"
        + json.dumps({"source": "c\td", "target": "e"})
        + "\n"
    )
    assert pairs.read_pairs(tmp_path / "p.jsonl") == [("a", "b"), ("c\td", "e")]
    (tmp_path / "p.tsv").write_text("one\t1\ntwo\t2\n")
    assert pairs.read_pairs(tmp_path / "p.tsv") == [("one", "1"), ("two", "2")]
    (tmp_path / "bad.tsv").write_text("one\t1\nno tab here\n")
    with pytest.raises(ConfigError, match=r"bad.tsv:2: expected two tab-separated"):
        pairs.read_pairs(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected an object"):
        pairs.read_pairs(tmp_path / "bad.jsonl")


def test_collate_pads_sources_masks_them_and_ignores_target_padding():
    src, mask, tin, tout = pairs.collate([([5, 6, 7], [1]), ([8], [2, 3])], bos=9, eos=10)
    assert src.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert tin.tolist() == [[9, 1, 0], [9, 2, 3]]
    assert tout.tolist() == [[1, 10, pairs.IGNORE], [2, 3, 10]]


def test_padding_does_not_change_the_seq2seq_loss():
    from training.trainer import compute_loss

    model = gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")).eval()
    a, b = ([5, 6, 7], [1, 2]), ([8], [3, 4, 5, 6])
    alone = compute_loss(model, pairs.collate([a], 256, 256), "seq2seq")
    both = pairs.collate([a, b], 256, 256)
    logits = model(both[0], both[2], both[1])
    row0 = torch.nn.functional.cross_entropy(logits[0], both[3][0], ignore_index=pairs.IGNORE)
    assert torch.allclose(alone, row0, atol=1e-5)


def test_date_pairs_name_the_same_date_in_many_forms():
    rng = random.Random(0)
    samples = [date_pair(rng) for _ in range(2000)]
    assert len({s for s, _ in samples}) > 1900  # many distinct surface forms
    for src, tgt in samples:
        d = dt.date.fromisoformat(tgt)
        assert 1950 <= d.year <= 2049
        assert str(d.year) in src or f"{d.year % 100:02d}" in src
    assert any("/" in s for s, _ in samples) and any(" of " in s for s, _ in samples)
    assert any(s.isupper() for s, _ in samples) and any(s == t for s, t in samples)


def test_generated_training_pairs_never_repeat_held_out_sources_and_restore_exactly():
    held = pairs.held_out(date_pair, 300, seed=1)
    assert len({s for s, _ in held}) == 300
    tok = gpt.get_tokenizer("byte")
    exclude = {s for s, _ in held}
    # a generator that emits a held-out source half the time: those must be skipped
    make = lambda rng: held[rng.randrange(300)] if rng.random() < 0.5 else date_pair(rng)  # noqa: E731
    s = pairs.GeneratedPairSampler(make, tok, 64, 16, seed=0, exclude=exclude, bos=256, eos=256)
    for _ in range(10):
        src = s.next_batch()[0]
        assert not exclude & {tok.decode([t for t in row.tolist() if t]) for row in src}
    saved = json.loads(json.dumps(s.state_dict()))  # must survive a JSON round trip
    want = s.next_batch()
    s2 = pairs.GeneratedPairSampler(make, tok, 64, 16, seed=99, exclude=exclude, bos=256, eos=256)
    s2.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(want, s2.next_batch()))
