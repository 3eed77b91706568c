"""gpt-train --init-from with a shorter --block-size: the training sequence length, not the model's
context. Batches (training and validation) are that long, the model and its saved config keep
their positions, --resume keeps the length, and one longer than the context is a one-line error."""

import json

import pytest
from train_helpers import TINY

import gpt
from training import data as corpus
from training.cli import main
from training.state import latest_checkpoint, load_state
from training.trainer import train

SHORT = dict(max_iters=2, warmup=0, eval_interval=2, eval_iters=1, sample_tokens=0)


@pytest.fixture
def base(run, tmp_path):
    """A gpt-tiny model with a 16-token context (TINY's --block-size)."""
    run(max_iters=1, warmup=0, eval_interval=1, eval_iters=1, sample_tokens=0, out=str(tmp_path / "base"))
    return str(tmp_path / "base" / "best")


@pytest.fixture
def batch_shapes(monkeypatch):
    """The shape of every batch a BlockSampler draws (training and validation)."""
    shapes = []
    next_batch = corpus.BlockSampler.next_batch

    def spy(self):
        x, y = next_batch(self)
        shapes.append((tuple(x.shape), tuple(y.shape)))
        return x, y

    monkeypatch.setattr(corpus.BlockSampler, "next_batch", spy)
    return shapes


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_shorter_block_size_sets_the_training_length_and_keeps_the_model(
    run, tmp_path, base, batch_shapes, lora
):
    out = tmp_path / "ft"
    s = run(init_from=base, preset=None, block_size=8, lora_rank=lora, out=str(out), **SHORT)
    assert s["step"] == 2
    assert batch_shapes and set(batch_shapes) == {((4, 8), (4, 8))}  # batch_size 4, 8 tokens
    model, _ = gpt.load(out / "best")
    assert model.config.block_size == 16  # the saved model keeps its context and positions
    src, _ = gpt.load(base)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in src.state_dict().items()
    }
    assert load_state(latest_checkpoint(out))["config"]["block_size"] == 8  # the run's setting

    batch_shapes.clear()
    s = run(resume=True, max_iters=4, out=str(out))  # the saved settings: still 8 tokens
    assert s["step"] == 4
    assert batch_shapes and set(batch_shapes) == {((4, 8), (4, 8))}
    assert gpt.load(out / "best")[0].config.block_size == 16


def test_block_size_of_the_context_is_allowed_and_longer_is_one_line_exit_2(
    tmp_path, base, corpus, batch_shapes, capsys
):
    same = dict(TINY, data=[str(corpus)], init_from=base, preset=None, out=str(tmp_path / "same"))
    s = train(dict(same, **SHORT))
    assert s["step"] == 2 and set(batch_shapes) == {((4, 16), (4, 16))}
    for extra in ([], ["--lora-rank", "4"]):
        argv = [
            "--init-from",
            base,
            "--block-size",
            "17",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "x"),
        ]
        with pytest.raises(SystemExit) as e:
            main(argv + extra + ["--quiet", "--threads", "1"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gpt-train: error: --block-size 17: "), err
        assert "16-token context" in err and "at most 16" in err
        assert not (tmp_path / "x").exists()


def test_seq2seq_pairs_are_limited_by_the_training_length(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"source": f"ab{i % 10}", "target": f"x{i % 10}"} for i in range(40)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = dict(
        model="seq2seq", data=[str(pairs)], eval_pairs=2, num_beams=1, batch_size=4, threads=1, quiet=True
    )
    train(dict(common, preset="seq2seq-tiny", out=str(tmp_path / "base"), max_iters=1, eval_interval=1))
    base = str(tmp_path / "base" / "best")
    s = train(dict(common, init_from=base, block_size=4, out=str(tmp_path / "ft"), **SHORT))
    assert s["step"] == 2
    assert gpt.load(tmp_path / "ft" / "best")[0].config.block_size == 64
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"source": "abcdef", "target": "x"}) + "\n" + pairs.read_text(), encoding="utf-8"
    )
    with pytest.raises(Exception, match="longer than the block size 4"):
        train(dict(common, data=[str(long)], init_from=base, block_size=4, out=str(tmp_path / "f2"), **SHORT))
    s = train(dict(common, data=[str(long)], init_from=base, block_size=6, out=str(tmp_path / "f3"), **SHORT))
    assert s["step"] == 2
