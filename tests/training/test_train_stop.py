"""What a newcomer sees: Ctrl-C answered at once, evaluation included (the first saves and
stops, a second quits without saving); evaluation sized to the run and shown; a warning for a
warm-up longer than the run; and the closing summary."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_helpers import make_corpus, read_metrics, train_argv

import gpt
from training.cli import main
from training.config import TrainConfig
from training.stop import StopFlag

ROOT = Path(__file__).resolve().parents[2]


def test_sigint_during_evaluation_stops_within_a_second_and_saves(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt")
    out = tmp_path / "run"
    # an evaluation far too long to finish: only the signal can end it
    args = train_argv(out, corpus, max_iters=4, eval_interval=2, eval_iters=10**8, quiet=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), s) for s in proc.stdout))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("evaluating on" in s for _, s in lines):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)  # well into the evaluation
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopping at the next safe point" in err and "Traceback" not in err
    stopped = [t for t, s in lines if s.startswith("stopped by signal at step 2")]
    # The evaluation asked for 10**8 batches, so stopping at all means it checks between batches;
    # the bound is loose so that a loaded machine cannot fail it (it took ~0.2 s when measured).
    assert stopped and stopped[0] - sent < 10, lines
    # the evaluation was cut short: no eval record, but the step's checkpoint is there
    assert not [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert (out / "latest").read_text().strip() == "ckpt-0000002"
    gpt.load(out / "ckpt-0000002")
    assert any(f"gpt-train --resume --out {out}" in s for _, s in lines)


def test_a_second_signal_quits_without_saving(capfd):
    original = signal.getsignal(signal.SIGINT)
    try:
        with StopFlag("notice") as stop:
            stop._previous[signal.SIGINT] = signal.default_int_handler  # Python's, as in gpt-train
            os.kill(os.getpid(), signal.SIGINT)
            assert stop() and stop.signum == signal.SIGINT  # the first: noted, the loop saves and stops
            assert capfd.readouterr().err == "\nnotice; press Ctrl-C again to quit without saving\n"
            with pytest.raises(KeyboardInterrupt):  # the second: out at once; the CLI exits 130
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, original)


def test_evaluation_scales_down_with_a_short_run():
    assert TrainConfig().eval_batches() == 100
    assert TrainConfig(max_iters=2).eval_batches() == 2  # no more than the training batches
    assert TrainConfig(max_iters=2, grad_accum=4).eval_batches() == 8
    assert TrainConfig(max_iters=5000, eval_interval=20).eval_batches() == 20
    assert TrainConfig(max_iters=2, eval_iters=50).eval_batches() == 50  # asked for: as asked


def test_warmup_warning_evaluation_line_and_closing_summary(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(train_argv(out, corpus, max_iters=3, warmup=20, eval_iters=None, quiet=False)) == 0
    std = capsys.readouterr()
    warnings = [line for line in std.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--warmup 20 is not shorter than --max-iters 3" in warnings[0]
    assert "step 3: evaluating on 3 validation batches" in std.out
    summary = std.out[std.out.index("summary:") :]
    best = next(r for r in read_metrics(out) if r["kind"] == "eval")["val_loss"]
    assert f"best checkpoint  {out / 'best'} (validation loss {best:.4f} at step 3)" in summary
    assert str(out / "metrics.jsonl") in summary and str(out / "loss.png") in summary
    assert f"gpt-serve --model {out / 'best'}" in summary
    assert main(train_argv(tmp_path / "quiet", corpus, max_iters=3, warmup=1)) == 0
    assert "warning" not in capsys.readouterr().err
