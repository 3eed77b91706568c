import json
import os
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import TINY as TINY_ARGS
from train_helpers import read_metrics

import gpt
from training import state as ckpt
from training import trainer
from training.config import ConfigError
from training.state import weights_digest


def _train_losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}


def test_run_writes_loadable_best_latest_metrics_and_plot(run, tmp_path):
    s = run(max_iters=40, eval_interval=10, keep_last=2)
    out = tmp_path / "run"
    model, tok = gpt.load(out / "best")  # what gpt-generate and the server are given
    assert tok.name == "byte" and model.config.block_size == 16
    assert gpt.generate(model, tok, "the ", max_new_tokens=5, temperature=0.0)
    assert (out / "latest").read_text().strip() == "ckpt-0000040"
    assert [p.name for p in ckpt.step_checkpoints(out)] == ["ckpt-0000030", "ckpt-0000040"]  # keep_last
    gpt.load(out / "ckpt-0000040")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    assert all(
        abs(e["val_ppl"] - torch.tensor(e["val_loss"]).exp().item()) < 1e-3 * e["val_ppl"] for e in evals
    )
    # the structured corpus is learnt: validation loss falls well below uniform (ln 257 = 5.55)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 5.6
    assert evals[-1]["val_loss"] < 3.5
    best_meta = gpt.load_checkpoint(out / "best")[2]
    assert best_meta["val_loss"] == min(e["val_loss"] for e in evals) == s["best_val_loss"]
    assert s["step"] == 40 and s["plot"] == str(out / "loss.png")


def test_token_cache_is_reused_by_a_second_run(run, tmp_path, monkeypatch):
    run(max_iters=2, out=str(tmp_path / "a"))
    from training import data

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    # the cache lives next to the output: a new run in the same directory reuses it
    cache = tmp_path / "a" / "tokens"
    monkeypatch.setattr(data, "_tokenize", fail)
    tokens = data.prepare(
        data.find_files([str(tmp_path / "corpus.txt")]),
        gpt.get_tokenizer("byte"),
        cache,
        val_fraction=0.1,
        block_size=16,
    )
    assert len(tokens.train) + len(tokens.val) == (tmp_path / "corpus.txt").stat().st_size


def test_resume_after_sigterm_reproduces_every_later_loss_exactly(run, tmp_path, monkeypatch):
    settings = dict(dropout=0.2, max_iters=16, eval_interval=4, grad_accum=2)
    full = run(out=str(tmp_path / "full"), **settings)
    expected = _train_losses(tmp_path / "full")

    # stop mid-interval (step 7 is not an evaluation step) with a real SIGTERM
    real_get_lr = trainer.get_lr

    def get_lr(step, cfg):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, cfg)

    monkeypatch.setattr(trainer, "get_lr", get_lr)
    part = run(out=str(tmp_path / "part"), **settings)
    assert part["interrupted"] == signal.SIGTERM and part["step"] == 7
    assert (tmp_path / "part" / "latest").read_text().strip() == "ckpt-0000007"
    monkeypatch.setattr(trainer, "get_lr", real_get_lr)

    resumed = run(resume=True, out=str(tmp_path / "part"))
    assert resumed["start_step"] == 7 and resumed["step"] == 16
    got = _train_losses(tmp_path / "part")
    assert sorted(got) == list(range(1, 17))  # the metrics log continues without gaps or repeats
    assert all(got[k] == expected[k] for k in range(8, 17)), (got, expected)  # bit-identical
    last = lambda d: gpt.load(Path(d) / "ckpt-0000016")[0]  # noqa: E731
    assert weights_digest(last(tmp_path / "full")) == weights_digest(last(tmp_path / "part"))
    assert full["best_val_loss"] == resumed["best_val_loss"]


def test_resume_can_extend_max_iters(run, tmp_path):
    run(max_iters=5)
    s = run(resume=True, max_iters=8)
    assert s["start_step"] == 5 and s["step"] == 8
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"] == [5, 8]


def test_seq2seq_date_task_reports_greedy_and_beam_exact_match(tmp_path):
    s = trainer.train(
        dict(
            model="seq2seq",
            preset="seq2seq-tiny",
            max_iters=4,
            eval_interval=2,
            eval_iters=2,
            eval_pairs=6,
            num_beams=2,
            batch_size=8,
            threads=1,
            quiet=True,
            out=str(tmp_path / "s2s"),
        )
    )
    assert 0.0 <= s["exact_match_greedy"] <= 1.0 and 0.0 <= s["exact_match_beam"] <= 1.0
    acc = [r for r in read_metrics(tmp_path / "s2s") if r["kind"] == "accuracy"]
    assert acc == [
        {
            "kind": "accuracy",
            "step": 4,
            "pairs": 6,
            "exact_match_greedy": s["exact_match_greedy"],
            "exact_match_beam": s["exact_match_beam"],
            "num_beams": 2,
        }
    ]
    evals = [r for r in read_metrics(tmp_path / "s2s") if r["kind"] == "eval"]
    assert all("exact_match_greedy" in e for e in evals)
    model, tok = gpt.load(tmp_path / "s2s" / "best")
    assert model.config.arch == "seq2seq"
    assert isinstance(gpt.generate(model, tok, "March 3, 2021", max_new_tokens=10, temperature=0.0), str)


def test_exact_match_counts_correct_outputs(tmp_path):
    """The accuracy measure itself: a model that copies learns to copy, and is scored 100%."""
    from training.pairs import exact_match

    pairs = [("abc", "abc"), ("hello", "hello"), ("xyz", "xyz")]
    data = tmp_path / "copy.jsonl"
    import json
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))) for _ in range(300)]
    data.write_text("".join(json.dumps({"source": w, "target": w}) + "\n" for w in words))
    trainer.train(
        dict(
            model="seq2seq",
            preset="seq2seq-tiny",
            n_embd=64,
            data=[str(data)],
            max_iters=300,
            eval_interval=300,
            eval_iters=2,
            batch_size=32,
            lr=3e-3,
            warmup=20,
            threads=1,
            quiet=True,
            eval_pairs=10,
            out=str(tmp_path / "copy"),
        )
    )
    model, tok = gpt.load(tmp_path / "copy" / "best")
    copy_pairs = [(w, w) for w in words[-30:]]
    assert exact_match(model, tok, copy_pairs) >= 0.9
    assert exact_match(model, tok, copy_pairs, num_beams=3) >= 0.9
    assert exact_match(model, tok, [(s, "never " + t) for s, t in pairs]) == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains(run, dtype):
    s = run(dtype=dtype, max_iters=6)
    assert s["step"] == 6 and s["best_val_loss"] < 6


def test_init_from_checkpoint_and_hf_directory_starts_from_those_weights(run, tmp_path):
    run(max_iters=3)
    ours, _ = gpt.load(tmp_path / "run" / "best")
    hf_model = gpt.GPT(gpt.preset("gpt-tiny", vocab_size=50257, tokenizer="gpt2", block_size=16))
    gpt.export_hf_gpt2(hf_model, tmp_path / "hf")
    for i, (path, src) in enumerate([(tmp_path / "run" / "best", ours), (tmp_path / "hf", hf_model)]):
        out = tmp_path / f"ft{i}"
        # a learning rate of ~0 leaves the weights where they started
        s = run(
            init_from=str(path), preset=None, block_size=None, lr=1e-20, min_lr=0, max_iters=1, out=str(out)
        )
        tuned, tok = gpt.load(out / "best")
        assert tok.name == ("byte" if i == 0 else "gpt2") and s["step"] == 1
        for (k, a), b in zip(src.state_dict().items(), tuned.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), k


def test_init_from_an_encoder_decoder_checkpoint_fine_tunes_it(tmp_path):
    base = dict(
        model="seq2seq",
        preset="seq2seq-tiny",
        eval_iters=1,
        eval_pairs=4,
        num_beams=2,
        batch_size=4,
        threads=1,
        quiet=True,
        sample_tokens=0,
    )
    trainer.train(dict(base, max_iters=2, eval_interval=2, out=str(tmp_path / "a")))
    src, _ = gpt.load(tmp_path / "a" / "best")
    s = trainer.train(
        dict(
            base,
            init_from=str(tmp_path / "a" / "best"),
            lr=1e-20,
            min_lr=0,
            max_iters=1,
            eval_interval=1,
            out=str(tmp_path / "b"),
        )
    )
    tuned, _ = gpt.load(tmp_path / "b" / "best")
    assert s["step"] == 1 and tuned.config.arch == "seq2seq"
    for (k, a), b in zip(src.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    # the kind must match what is loaded, said before anything is written
    with pytest.raises(ConfigError, match="--model seq2seq"):
        trainer.train(dict(TINY_ARGS, init_from=str(tmp_path / "a" / "best"), out=str(tmp_path / "c")))


def test_val_data_files_are_the_validation_set_and_all_of_data_trains(run, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("zzzz qqqq xxxx\n" * 200, encoding="utf-8")  # unlike the corpus: a high loss
    same = run(max_iters=20, out=str(tmp_path / "split"))
    other = run(max_iters=20, val_data=[str(val)], out=str(tmp_path / "sep"))
    assert other["best_val_loss"] > same["best_val_loss"] + 1.0
    meta = json.loads(next((tmp_path / "sep" / "tokens").glob("*/meta.json")).read_text())
    corpus_bytes = (tmp_path / "corpus.txt").stat().st_size
    assert meta["train_tokens"] == corpus_bytes and meta["val_tokens"] == val.stat().st_size
    with pytest.raises(ConfigError, match="--val-data"):
        run(val_data=[str(tmp_path / "missing-*.txt")], out=str(tmp_path / "none"))


def test_samples_at_each_evaluation_go_to_the_log_metrics_and_tensorboard(run, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    run(
        max_iters=10,
        eval_interval=5,
        sample_prompts=["the cat", "alpha"],
        sample_tokens=12,
        quiet=False,
        tensorboard=str(tb),
    )
    samples = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [5, 10]
    assert [s["prompt"] for s in samples[-1]["samples"]] == ["the cat", "alpha"]
    assert all(len(s["text"]) > 0 for r in samples for s in r["samples"])
    assert "sample: the cat →" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [5, 10]
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [5, 10] and b"the cat" in texts[-1].tensor_proto.string_val[0]


def test_the_default_sample_prompt_of_a_gpt_is_a_new_line_and_sample_tokens_0_turns_samples_off(
    run, tmp_path
):
    run(max_iters=5, eval_interval=5, out=str(tmp_path / "a"))
    (rec,) = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "sample"]
    assert rec["samples"][0]["prompt"] == "\n"
    run(max_iters=5, eval_interval=5, sample_tokens=0, out=str(tmp_path / "b"))
    assert not [r for r in read_metrics(tmp_path / "b") if r["kind"] == "sample"]


def test_seq2seq_val_data_pairs_are_the_held_out_set(tmp_path):
    rows = [
        json.dumps({"source": w, "target": w[::-1]}) + "\n" for w in ("abc", "hello", "xyz", "gpt", "cat")
    ]
    (tmp_path / "train.jsonl").write_text("".join(rows * 4))
    (tmp_path / "val.jsonl").write_text("".join(rows[:3]))
    s = trainer.train(
        dict(
            model="seq2seq",
            preset="seq2seq-tiny",
            data=[str(tmp_path / "train.jsonl")],
            val_data=[str(tmp_path / "val.jsonl")],
            max_iters=2,
            eval_interval=2,
            eval_iters=1,
            batch_size=4,
            threads=1,
            quiet=True,
            out=str(tmp_path / "run"),
        )
    )
    (acc,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "accuracy"]
    assert acc["pairs"] == 3 and s["step"] == 2
    (sample,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "sample"]
    assert sample["samples"][0]["prompt"] == "abc"  # the default: the first held-out source
