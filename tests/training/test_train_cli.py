import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import make_corpus, read_metrics, train_argv

import gpt
from training.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt-train: error: "), err
    return err


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in [
        "--model",
        "--preset",
        "--n-layer",
        "--n-head",
        "--n-embd",
        "--block-size",
        "--dropout",
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--min-lr",
        "--warmup",
        "--max-iters",
        "--weight-decay",
        "--grad-clip",
        "--eval-interval",
        "--eval-iters",
        "--dtype",
        "--compile",
        "--seed",
        "--device",
        "--data",
        "--tokenizer",
        "--bpe-vocab",
        "--out",
        "--resume",
        "--init-from",
        "standard library",
        "OUT/best/",
    ]:
        assert opt in text, opt


def test_cli_trains_and_returns_zero(tmp_path, corpus, capsys):
    assert main(train_argv(tmp_path / "run", corpus, max_iters=4)) == 0
    gpt.load(tmp_path / "run" / "best")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--n-embd", "30", "--n-head", "4"], "divisible"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--min-lr", "0.5"], "--min-lr"),
        (["--dropout", "1.5"], "--dropout"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--max-iters", "ten"], "invalid int value"),
        (["--tokenizer", "klingon"], "unknown tokenizer"),
        (["--tokenizer", "bpe", "--bpe-vocab", "100"], "--bpe-vocab must be in [257, 65536]"),
        (["--dtype", "float8"], "invalid choice"),
        (["--preset", "seq2seq-tiny"], "is a seq2seq model"),
        (["--init-from", "/nonexistent/ckpt"], "--init-from"),
        (["--device", "bogus"], "--device bogus"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, corpus, capsys, extra, message):
    err = _fails(capsys, train_argv(tmp_path / "run", corpus) + extra)
    assert message in err
    assert not (tmp_path / "run").exists()  # a failed check leaves no --out behind


def test_bad_corpora_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "emptydir").mkdir()
    cases = [
        (tmp_path / "missing.txt", "no such file"),
        (tmp_path / "empty.txt", "empty"),
        (tmp_path / "bin.dat", "not UTF-8 text"),
        (tmp_path / "short.txt", "too short"),
        (tmp_path / "emptydir", "no text files"),
        (tmp_path / "*.nomatch", "matches no files"),
    ]
    for i, (data, message) in enumerate(cases):
        err = _fails(capsys, train_argv(tmp_path / f"run{i}", data))
        assert message in err, (data, err)
        assert not (tmp_path / f"run{i}").exists(), data
    # an --out that existed keeps what it held, and gains nothing (no token cache, no tokenizer)
    kept = tmp_path / "kept" / "run"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    for extra in ([], ["--tokenizer", "bpe"]):
        _fails(capsys, train_argv(kept, tmp_path / "short.txt") + extra)
        assert sorted(p.name for p in kept.rglob("*")) == ["notes.txt"]
    _fails(capsys, train_argv(tmp_path / "new" / "deep" / "run", tmp_path / "empty.txt"))
    assert not (tmp_path / "new").exists()  # nor the parents it made


def test_unwritable_out_is_a_one_line_error(tmp_path, corpus, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in _fails(capsys, train_argv(blocker / "run", corpus))
    assert f"--out {blocker}: is a file, not a directory" in _fails(capsys, train_argv(blocker, corpus))
    assert blocker.read_text() == "x"


def test_existing_run_is_never_overwritten(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(train_argv(out, corpus, max_iters=5)) == 0
    before = _tree_digest(out)
    # a fresh start into a used directory, and a resume asking for another model: refused
    assert "already holds a training run" in _fails(capsys, train_argv(out, corpus, max_iters=5))
    err = _fails(capsys, ["--out", str(out), "--resume", "--n-embd", "64", "--max-iters", "9"])
    assert "n_embd=32" in err and "n_embd=64" in err
    assert _tree_digest(out) == before
    assert "already reached step 5" in _fails(capsys, ["--out", str(out), "--resume"])
    assert _tree_digest(out) == before
    assert "no checkpoint to resume" in _fails(capsys, ["--out", str(tmp_path / "none"), "--resume"])


def test_subprocess_bad_argument_prints_one_line_and_exits_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "training", "--lr", "-1", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["gpt-train: error: --lr must be > 0, got -1.0"]


def test_sigterm_saves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "training"] + train_argv(
        out, corpus, max_iters=100000, eval_interval=100000
    )
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0):
            assert proc.poll() is None and time.time() < deadline, (
                proc.stderr.read() if proc.poll() else "timeout"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    stopped = max(r["step"] for r in read_metrics(out))
    assert (out / "latest").read_text().strip() == f"ckpt-{stopped:07d}"
    gpt.load(out / f"ckpt-{stopped:07d}")
    assert main(["--out", str(out), "--resume", "--max-iters", str(stopped + 3), "--eval-interval", "2"]) == 0
    assert max(r["step"] for r in read_metrics(out)) == stopped + 3
    gpt.load(out / "best")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, env):
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "training",
    ] + args
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_weights_and_resume_exactly(tmp_path):
    import shutil

    corpus = make_corpus(tmp_path / "c.txt")
    out, dump = tmp_path / "run", tmp_path / "dump"
    env = dict(os.environ, GPT_TRAIN_DEBUG_WEIGHTS_DIR=str(dump), OMP_NUM_THREADS="1")
    _torchrun(
        train_argv(out, corpus, max_iters=30, eval_interval=15, grad_accum=2, dropout=0.1, log_interval=5),
        env,
    )
    digests = [(dump / f"rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    from training.state import weights_digest

    assert weights_digest(gpt.load(out / "ckpt-0000030")[0]) == digests[0]  # rank 0 saved what both hold
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [15, 30]  # logged once, by rank 0

    # rewind a copy to its step-15 checkpoint and resume: both ranks' RNG and sampler states
    # come back, so steps 16-30 repeat exactly
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "ckpt-0000030")
    (again / "latest").write_text("ckpt-0000015\n")
    _torchrun(
        ["--out", str(again), "--resume"], dict(env, GPT_TRAIN_DEBUG_WEIGHTS_DIR=str(tmp_path / "dump2"))
    )

    def losses(d):
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(d)]

    assert losses(again) == losses(out)
    assert (tmp_path / "dump2" / "rank0.sha256").read_text() == digests[0]
