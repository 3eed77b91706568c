"""gpt-eval: one command scores a checkpoint on held-out files; bad input is a one-line error."""

import json

import pytest

import gpt
from gpt.evaluate import score_texts
from training.eval_cli import main


@pytest.fixture
def checkpoint(tmp_path, tiny_gpt):
    return gpt.save(tiny_gpt, tmp_path / "ckpt", tokenizer="byte")


def test_scores_files_as_documents_and_prints_json(checkpoint, tmp_path, tiny_gpt, capsys):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f(x):\n    return x * 2\n" * 5)
    b.write_text("import os\nprint(os.sep)\n")
    assert main(["--model", str(checkpoint), "--data", str(a), str(b), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = score_texts(tiny_gpt, gpt.get_tokenizer("byte"), [a.read_text(), b.read_text()])
    assert got["documents"] == 2 and got["files"] == 2
    assert got["bytes"] == want.bytes and got["nats_per_byte"] == pytest.approx(want.nats_per_byte, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-5)


def test_table_names_the_figures(checkpoint, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n")
    assert main(["--model", str(checkpoint), "--data", str(f)]) == 0
    out = capsys.readouterr().out
    for word in ("loss", "perplexity", "bits", "12 bytes"):
        assert word in out
    assert ": 1 document, " in out  # not "1 documents"


def test_seq2seq_scores_pair_files(tmp_path, tiny_s2s, capsys):
    ckpt = gpt.save(tiny_s2s, tmp_path / "s2s", tokenizer="byte")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("3 May 2001\t2001-05-03\n1 June 1990\t1990-06-01\n")
    assert main(["--model", str(ckpt), "--data", str(pairs), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["documents"] == 2 and got["bytes"] == 20 and got["tokens"] == 22


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/nonexistent"], "no such file"),
        (["--data", "EMPTY"], "nothing to score"),
        (["--data", "TEXT", "--stride", "1000"], "stride"),
        (["--data", "TEXT", "--stride", "0"], "--stride"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("some text")
    args = [
        a.replace("EMPTY", str(tmp_path / "empty.txt")).replace("TEXT", str(tmp_path / "text.txt"))
        for a in args
    ]
    with pytest.raises(SystemExit) as e:
        main(["--model", str(checkpoint), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "nope"), "--data", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt-eval: error: --model {tmp_path / 'nope'}: ") and err.count("\n") == 1
