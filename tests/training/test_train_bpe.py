"""gpt-train --tokenizer bpe: the tokenizer is learned from the training data and travels with
every checkpoint, so resuming, loading and serving need nothing else."""

import json

from train_helpers import read_metrics

import gpt
from gpt.bpe import TOKENIZER_FILE, BPETokenizer

BPE = dict(tokenizer="bpe", bpe_vocab=300)


def test_bpe_run_learns_its_tokenizer_and_saves_it_with_every_checkpoint(run, tmp_path):
    run(**BPE)
    out = tmp_path / "run"
    saved = (out / TOKENIZER_FILE).read_text()
    for ckpt in [out / "best", *sorted(out.glob("ckpt-*"))]:
        assert (ckpt / TOKENIZER_FILE).read_text() == saved
    model, tok = gpt.load(out / "best")
    # a corpus of nine words runs out of merges before 300 ids; the model is sized to what was learned
    assert isinstance(tok, BPETokenizer) and 257 < tok.vocab_size <= 300
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.tokenizer == "bpe"
    assert tok.encode("alpha beta") and len(tok.encode("alpha beta gamma")) < len("alpha beta gamma")
    text = gpt.generate(model, tok, "the cat", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str)


def test_the_tokenizer_learns_only_from_the_training_split(run, tmp_path):
    corpus = tmp_path / "two_halves.txt"
    # the last 10% (validation) is made of a word that appears nowhere else
    corpus.write_text("alpha beta gamma delta.\n" * 900 + "zyzzyvazyzzyva\n" * 100)
    run(data=[str(corpus)], **BPE)
    tok = BPETokenizer.from_file(tmp_path / "run" / TOKENIZER_FILE)
    assert len(tok.encode("zyzzyvazyzzyva")) > 4  # never merged: not seen in training
    assert len(tok.encode(" gamma")) == 1


def test_resume_keeps_the_tokenizer_even_when_the_data_changed(run, tmp_path):
    run(max_iters=6, **BPE)
    before = (tmp_path / "run" / "latest").read_text().strip()
    tok_before = (tmp_path / "run" / before / TOKENIZER_FILE).read_text()
    other = tmp_path / "other.txt"
    other.write_text("entirely different words appear here now.\n" * 300)
    run(resume=True, max_iters=10, data=[str(other)])
    _, tok = gpt.load(tmp_path / "run" / "best")
    assert tok.to_json() == tok_before
    assert [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval"][-1]["step"] == 10


def test_seq2seq_runs_learn_a_bpe_too_and_start_their_decoder_at_its_end_of_text(tmp_path):
    from training.trainer import train

    train(
        dict(
            model="seq2seq",
            preset="seq2seq-tiny",
            max_iters=3,
            eval_interval=3,
            eval_iters=1,
            eval_pairs=4,
            num_beams=2,
            batch_size=4,
            threads=1,
            quiet=True,
            out=str(tmp_path / "s2s"),
            **BPE,
        )
    )
    model, tok = gpt.load(tmp_path / "s2s" / "best")
    assert isinstance(tok, BPETokenizer)
    assert model.start_token == tok.eot_token == model.config.decoder_start_token
    assert json.loads((tmp_path / "s2s" / "best" / "config.json").read_text())["tokenizer"] == "bpe"
    assert gpt.complete(model, tok, ["3 May 2001"], gpt.SamplingParams(max_new_tokens=4, temperature=0.0))
