"""gpt-generate: streams text, documents its options, and fails with one line and exit code 2."""

import io
import subprocess
import sys

import pytest
import torch

import gpt
from gpt.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), path)
    return path


def test_generates_the_same_text_as_the_library(ckpt, capsys):
    assert main(["--model", str(ckpt), "-t", "0", "-n", "12", "--ignore-eos", "Hello"]) == 0
    model, tok = gpt.load(ckpt)
    expected = gpt.generate(model, tok, "Hello", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert capsys.readouterr().out == expected + "\n"


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
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(ckpt, args, needle, capsys, monkeypatch):
    # in this process: the entry point itself is run as a command by the --help test above
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exc:
        main([a.format(ckpt=ckpt) for a in args])
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
