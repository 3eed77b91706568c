"""Training survives what goes wrong mid-run: NaN and infinite losses or gradients, and a
SIGKILL while a checkpoint is written or a step runs (the token cache: test_train_data.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import train_argv

import gpt
from gpt.files import recover_interrupted_writes, remove_directory
from training import state as ckpt
from training import trainer
from training.cli import main

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_driver.py")
NAN = float("nan")


def _reject(constant):
    raise ValueError(f"{constant} is not JSON")


def strict_metrics(out) -> list[dict]:
    """metrics.jsonl read as strict JSON: json.loads alone accepts NaN and Infinity."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_reject) for line in lines]


def _poison_training_steps(monkeypatch, steps, how="loss"):
    """Training step k (counted from 1, one micro-batch a step) gets a NaN loss, or a finite
    loss whose gradients are all NaN (how="gradient norm")."""
    real = trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(model, batch, kind):
        loss = real(model, batch, kind)
        if not model.training:
            return loss
        calls["n"] += 1
        if calls["n"] not in steps:
            return loss
        if how == "loss":
            return loss * NAN
        loss.register_hook(lambda g: g * NAN)
        return loss

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)


def _adam_steps(checkpoint: Path) -> set[int]:
    return {int(s["step"]) for _, s in ckpt.load_state(checkpoint)["optimizer"]["state"]}


def _all_finite(path: Path) -> bool:
    model, _ = gpt.load(path)
    return all(torch.isfinite(p).all() for p in model.parameters())


# --- non-finite losses and gradients -------------------------------------------------------


@pytest.mark.parametrize("how, grad_clip", [("loss", 1.0), ("gradient norm", 0.0)])
def test_non_finite_steps_are_skipped_counted_and_never_applied(run, tmp_path, monkeypatch, how, grad_clip):
    _poison_training_steps(monkeypatch, {3, 7}, how)
    s = run(max_iters=10, eval_interval=5, grad_clip=grad_clip)
    out = tmp_path / "run"
    assert s["step"] == 10
    records = strict_metrics(out)
    skips = [r for r in records if r["kind"] == "skip"]
    assert skips == [
        {"kind": "skip", "step": 3, "reason": f"non-finite {how}", "in_a_row": 1, "skipped_steps": 1},
        {"kind": "skip", "step": 7, "reason": f"non-finite {how}", "in_a_row": 1, "skipped_steps": 2},
    ]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert [train[k]["skipped_steps"] for k in (2, 3, 6, 7, 10)] == [0, 1, 1, 2, 2]
    # a window whose steps were all skipped has no loss (null, not NaN); the others are finite
    assert train[3]["loss"] is None and train[7]["loss"] is None
    assert all(isinstance(train[k]["loss"], float) for k in train if k not in (3, 7))
    # AdamW took 8 steps in 10: the two bad ones never reached the weights
    assert _adam_steps(out / "ckpt-0000010") == {8}
    assert ckpt.load_state(out / "ckpt-0000010")["skipped_steps"] == 2
    assert _all_finite(out / "best") and _all_finite(out / "ckpt-0000010")


def test_bad_steps_in_a_row_stop_with_one_line_error_and_keep_good_checkpoints(
    tmp_path, corpus, monkeypatch, capsys
):
    out = tmp_path / "run"
    _poison_training_steps(monkeypatch, set(range(7, 100)))
    assert main(train_argv(out, corpus, max_iters=20, eval_interval=5, max_bad_steps=3)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "gpt-train: error: 3 steps in a row, up to step 9, had a non-finite loss"
    ), err
    assert f"the last good checkpoint is {out / 'ckpt-0000005'}" in err and "--resume" in err
    assert [p.name for p in ckpt.step_checkpoints(out)] == ["ckpt-0000005"]
    assert (out / "latest").read_text().strip() == "ckpt-0000005"
    assert gpt.load_checkpoint(out / "best")[2]["step"] == 5
    assert _all_finite(out / "best") and _all_finite(out / "ckpt-0000005")
    skips = [(r["step"], r["in_a_row"]) for r in strict_metrics(out) if r["kind"] == "skip"]
    assert skips == [(7, 1), (8, 2), (9, 3)]

    monkeypatch.undo()  # the trouble passes: the run resumes from its last good checkpoint
    assert main(["--out", str(out), "--resume", "--max-iters", "8"]) == 0
    assert (out / "latest").read_text().strip() == "ckpt-0000008"


def test_a_non_finite_validation_loss_is_not_best_and_is_written_as_null(run, tmp_path, monkeypatch):
    real = trainer.compute_loss
    evals = {"n": 0}

    def compute_loss(model, batch, kind):
        loss = real(model, batch, kind)
        if not model.training:
            evals["n"] += 1
            if evals["n"] > 2:  # eval_iters 2: the second evaluation is NaN
                return loss * NAN
        return loss

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    run(max_iters=10, eval_interval=5)
    out = tmp_path / "run"
    ev = [r for r in strict_metrics(out) if r["kind"] == "eval"]
    assert [(e["step"], e["val_loss"] is None, e["val_ppl"] is None) for e in ev] == [
        (5, False, False),
        (10, True, True),
    ]
    assert gpt.load_checkpoint(out / "best")[2]["step"] == 5
    header = json.loads((out / "ckpt-0000010" / "config.json").read_text(), parse_constant=_reject)
    assert header["metadata"]["val_loss"] is None
    assert ckpt.load_state(out / "ckpt-0000010")["best_val_loss"] == ev[0]["val_loss"]


def test_train_state_stores_no_best_loss_yet_as_null_not_infinity(run, tmp_path, monkeypatch):
    real_get_lr = trainer.get_lr

    def get_lr(step, cfg):  # SIGTERM before the first evaluation: no best loss yet
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, cfg)

    monkeypatch.setattr(trainer, "get_lr", get_lr)
    assert run(max_iters=10, eval_interval=5)["step"] == 2
    saved = tmp_path / "run" / "ckpt-0000002"
    assert json.loads((saved / ckpt.STATE_JSON).read_text(), parse_constant=_reject)["best_val_loss"] is None
    assert ckpt.load_state(saved)["best_val_loss"] == float("inf")


@pytest.mark.slow
def test_torchrun_ranks_skip_together_when_only_one_sees_a_nan_loss(tmp_path, corpus):
    """Rank 1's loss is NaN at step 3 in its first micro-batch, yet every gradient stays finite:
    only the agreed flag stops rank 0 from stepping alone and the two copies parting ways."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, dump = tmp_path / "run", tmp_path / "dump"
    env = dict(os.environ, FAULT="nan-loss:1:3", GPT_TRAIN_DEBUG_WEIGHTS_DIR=str(dump), OMP_NUM_THREADS="1")
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(DRIVER),
        *train_argv(out, corpus, max_iters=5, eval_interval=5, grad_accum=2),
    ]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (dump / "rank0.sha256").read_text() == (dump / "rank1.sha256").read_text()
    skips = [r for r in strict_metrics(out) if r["kind"] == "skip"]
    assert skips == [
        {
            "kind": "skip",
            "step": 3,
            "reason": "non-finite loss on another rank",
            "in_a_row": 1,
            "skipped_steps": 1,
        }
    ]
    assert _adam_steps(out / "ckpt-0000005") == {4}


# --- SIGKILL mid-write and mid-step ----------------------------------------------------------


def _kill_when_paused(tmp_path, corpus, fault, **settings) -> Path:
    """Start gpt-train (through fault_driver), wait until it pauses at `fault`, SIGKILL it."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    env = dict(os.environ, FAULT=fault, MARKER=str(marker))
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), *train_argv(out, corpus, **settings)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, f"finished without pausing at {fault}: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, f"never paused at {fault}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return out


def _resume_and_check(out, max_iters):
    assert main(["--out", str(out), "--resume"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
    assert (out / "latest").read_text().strip() == ckpt.ckpt_name(max_iters)
    gpt.load(out / "best")
    train_steps = [r["step"] for r in strict_metrics(out) if r["kind"] == "train"]
    assert train_steps == list(range(1, max_iters + 1))  # redone steps are logged once


def test_sigkill_while_a_checkpoint_is_written_then_resume_finishes(tmp_path, corpus):
    out = _kill_when_paused(tmp_path, corpus, "pause-save:ckpt-0000008:1", max_iters=12, eval_interval=4)
    assert (out / "latest").read_text().strip() == "ckpt-0000004"
    assert [p.name for p in ckpt.step_checkpoints(out)] == ["ckpt-0000004"]
    assert list(out.glob(".ckpt-0000008.tmp-*"))  # the unfinished write, never published
    _resume_and_check(out, 12)


def test_sigkill_between_the_renames_of_best_then_resume_restores_it_first(tmp_path, corpus, monkeypatch):
    # the second write of best/ replaces the first: killed with the old one set aside and the
    # new one not yet renamed in, the only moment best/ is missing
    out = _kill_when_paused(tmp_path, corpus, "pause-replace:best:2", max_iters=12, eval_interval=4)
    assert not (out / "best").exists() and list(out.glob(".best.old-*")) and list(out.glob(".best.tmp-*"))

    real_get_lr = trainer.get_lr
    seen = []

    def get_lr(step, cfg):
        if not seen:  # before the resumed run's first step
            seen.append(gpt.load_checkpoint(out / "best")[2]["step"])
        return real_get_lr(step, cfg)

    monkeypatch.setattr(trainer, "get_lr", get_lr)
    _resume_and_check(out, 12)
    assert seen == [4]  # the previous best, put back before training went on


def test_sigkill_during_a_step_then_resume_finishes(tmp_path, corpus):
    out = _kill_when_paused(tmp_path, corpus, "pause-step:7", max_iters=10, eval_interval=4, grad_accum=2)
    assert max(r["step"] for r in strict_metrics(out)) == 6  # logged past the checkpoint at 4
    assert (out / "latest").read_text().strip() == "ckpt-0000004"
    _resume_and_check(out, 10)


def test_recover_interrupted_writes_restores_set_aside_copies_and_removes_temporaries(tmp_path):
    model = gpt.build_model(gpt.preset("gpt-tiny"))
    gpt.save(model, tmp_path / ".best.old-1a2b3c4d", metadata={"step": 4})  # best/ itself is gone
    gpt.save(model, tmp_path / "ckpt-0000004")
    gpt.save(model, tmp_path / ".ckpt-0000004.old-0000abcd")  # replaced already: stale
    (tmp_path / ".best.tmp-k3j_x9qz").mkdir()  # a half-written directory
    (tmp_path / ".latest.tmp-abc123_z").write_text("ckpt-00")  # a half-written file
    (tmp_path / ".hidden").write_text("not ours")
    done = recover_interrupted_writes(tmp_path)
    assert len(done) == 4 and any("restored" in d for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "best", "ckpt-0000004"]
    assert gpt.load_checkpoint(tmp_path / "best")[2] == {"step": 4}

    remove_directory(tmp_path / "ckpt-0000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "best"]
