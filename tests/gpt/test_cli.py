"""gpt-generate: streams text, documents its options, and fails with one line and exit code 2."""

import io
import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

import gpt
import gpt.cli
from gpt.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), path)
    return path


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A tiny GPT with another tokenizer (GPT-2's) than the tiny one's."""
    path = tmp_path_factory.mktemp("ckpt") / "other"
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny", vocab_size=50257, tokenizer="gpt2")), path)
    return path


SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Constraint files for the structured-output flags, good and bad."""
    d = tmp_path_factory.mktemp("constraints")
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    (d / "bad.json").write_text('{"type": ')
    (d / "frob.json").write_text('{"type": "frob"}')
    (d / "digits.gbnf").write_text('root ::= [0-9] [0-9] "-" [a-z]\n')
    (d / "bad.lark").write_text("start: greeting\n")
    return d


def test_generates_the_same_text_as_the_library(ckpt, capsys):
    assert main(["--model", str(ckpt), "-t", "0", "-n", "12", "--ignore-eos", "Hello"]) == 0
    model, tok = gpt.load(ckpt)
    expected = gpt.generate(model, tok, "Hello", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert capsys.readouterr().out == expected + "\n"


def test_a_prediction_file_and_every_speculative_mode_give_the_same_text(ckpt, files, tmp_path, capsys):
    args = ["--model", str(ckpt), "-t", "0.8", "--seed", "4", "-n", "24", "--ignore-eos", "Hello"]
    assert main([*args, "--speculative", "off"]) == 0
    want = capsys.readouterr().out
    (tmp_path / "p.txt").write_text(want[:-1])
    for mode in ("auto", "ngram"):
        assert main([*args, "--speculative", mode, "--prediction", str(tmp_path / "p.txt")]) == 0
        assert capsys.readouterr().out == want
    for mode in ("auto", "draft"):  # the model drafting for itself: its greedy guesses, verified by sampling
        assert main([*args, "--speculative", mode, "--draft-model", str(ckpt)]) == 0
        assert capsys.readouterr().out == want


def test_reads_the_prompt_from_stdin(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert main(["--model", str(ckpt), "-t", "0", "-n", "5", "--ignore-eos"]) == 0
    assert len(capsys.readouterr().out) > 1


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "gpt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in (
        "--model",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--seed",
        "--stop",
        "--num-beams",
        "--repetition-penalty",
        "--presence-penalty",
        "--frequency-penalty",
        "--length-penalty",
        "--ignore-eos",
        "--device",
        "--dtype",
        "--json-schema",
        "--regex",
        "--choice",
        "--grammar",
        "--speculative",
        "--prediction",
    ):
        assert opt in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/model", "hi"], "/nonexistent/model"),
        (["--model", "{ckpt}", "--top-p", "1.5", "hi"], "top_p"),
        (["--model", "{ckpt}", "--temperature", "-1", "hi"], "temperature"),
        (["--model", "{ckpt}", "-n", "0", "hi"], "max-new-tokens"),
        (["--model", "{ckpt}", "--bogus", "hi"], "--bogus"),
        pytest.param(
            ["--model", "{ckpt}", "--device", "cuda", "hi"],
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
        (["hi"], "--model"),
        (["--model", "{ckpt}", "--json-schema", "/nonexistent/s.json", "hi"], "/nonexistent/s.json"),
        (["--model", "{ckpt}", "--json-schema", "{files}/bad.json", "hi"], "bad.json: is not valid JSON"),
        (["--model", "{ckpt}", "--json-schema", "{files}/frob.json", "hi"], "frob.json: Invalid type: frob"),
        (["--model", "{ckpt}", "--grammar", "{files}", "hi"], "cannot read"),
        (["--model", "{ckpt}", "--grammar", "{files}/bad.lark", "hi"], "unknown name"),
        (["--model", "{ckpt}", "--regex", "a(b", "hi"], "--regex: "),
        (["--model", "{ckpt}", "--choice", "", "hi"], "--choice: "),
        (["--model", "{ckpt}", "--regex", "[0-9]+", "--num-beams", "2", "hi"], "beam search"),
        (["--model", "{ckpt}", "--regex", "[0-9]+", "--choice", "1", "hi"], "not allowed with"),
        (["--model", "{ckpt}", "--prediction", "/nonexistent/p.txt", "hi"], "/nonexistent/p.txt"),
        (
            ["--model", "{ckpt}", "--prediction", "{files}/schema.json", "--num-beams", "2", "hi"],
            "beam search",
        ),
        (["--model", "{ckpt}", "--speculative", "maybe", "hi"], "--speculative"),
        (["--model", "{ckpt}", "--speculative", "draft", "hi"], "--speculative draft needs a --draft-model"),
        (["--model", "{ckpt}", "--draft-model", "/nonexistent/d", "hi"], "--draft-model /nonexistent/d: "),
        (["--model", "{ckpt}", "--draft-model", "{other}", "hi"], "must share the model's tokenizer"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(ckpt, other, files, args, needle, capsys, monkeypatch):
    # in this process: the entry point itself is run as a command by the --help test above
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exc:
        main([a.format(ckpt=ckpt, other=other, files=files) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_a_directory_that_is_not_a_model_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path), "hi"])
    assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flags,valid",
    [
        (
            ["--json-schema", "{files}/schema.json"],
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
        ),
        (["--regex", "[a-z]{2,4}@[0-9]{2}"], lambda t: re.fullmatch("[a-z]{2,4}@[0-9]{2}", t)),
        (["--choice", "yes", "--choice", "no", "--choice", "no way"], lambda t: t in ("yes", "no", "no way")),
        (["--grammar", "{files}/digits.gbnf"], lambda t: re.fullmatch("[0-9][0-9]-[a-z]", t)),
    ],
)
def test_structured_output_flags_constrain_the_text_as_the_library_does(ckpt, files, flags, valid, capsys):
    flags = [f.replace("{files}", str(files)) for f in flags]
    assert main(["--model", str(ckpt), "-t", "0", "-n", "40", *flags, "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and valid(out[:-1]), out
    model, tok = gpt.load(ckpt)
    parser = gpt.cli.build_parser()  # the same Constraint the flags built, for the library
    constraint = gpt.cli._constraint(parser.parse_args(["--model", "m", *flags]), parser)
    assert out[:-1] == gpt.generate(
        model, tok, "Hello", max_new_tokens=40, temperature=0, constraint=constraint
    )


def test_top_k_minus_one_means_off_as_the_server_reads_it(ckpt, capsys):
    assert main(["--model", str(ckpt), "-t", "0", "-n", "6", "--ignore-eos", "--top-k", "-1", "Hi"]) == 0
    off = capsys.readouterr().out
    assert main(["--model", str(ckpt), "-t", "0", "-n", "6", "--ignore-eos", "--top-k", "0", "Hi"]) == 0
    assert capsys.readouterr().out == off


def test_a_budget_beyond_the_context_is_said_not_silently_cut(ckpt, capsys):
    assert main(["--model", str(ckpt), "-t", "0", "-n", "500", "--ignore-eos", "Hello"]) == 0
    err = capsys.readouterr().err
    assert "context holds 64 tokens" in err and "at most 59 of the 500" in err


def test_a_run_directory_serves_its_best_checkpoint(tmp_path, capsys):
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), tmp_path / "run" / "best")
    assert main(["--model", str(tmp_path / "run"), "-t", "0", "-n", "4", "--ignore-eos", "Hi"]) == 0
    assert capsys.readouterr().out.strip()


def test_stop_strings_on_the_command_line_read_escapes(ckpt, capsys, monkeypatch):
    module = sys.modules["gpt.generate"]  # the module (gpt.generate is the function)
    seen = {}
    real = module.generate

    def spy(*a, **k):
        seen["stop"] = k["stop"]
        return real(*a, **k)

    monkeypatch.setattr(module, "generate", spy)
    assert main(["--model", str(ckpt), "-n", "2", "--stop", "\\n\\n", "--stop", "a\\tb", "Hi"]) == 0
    assert seen["stop"] == ["\n\n", "a\tb"]
