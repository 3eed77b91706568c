"""Training survives a SIGKILL while a checkpoint is written or a step runs (the token cache:
test_train_data.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gpt
from gpt.files import recover_interrupted_writes, remove_directory
from training import trainer
from training import state as ckpt
from training.cli import main

from train_helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_driver.py")


def _reject(constant):
    raise ValueError(f"{constant} is not JSON")


def strict_metrics(out) -> list[dict]:
    """metrics.jsonl read as strict JSON: json.loads alone accepts NaN and Infinity."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_reject) for line in lines]


def _argv(out, corpus, **kw):
    argv = ["--out", str(out), "--data", str(corpus)]
    for k, v in dict(TINY, **kw).items():
        argv += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return argv


# --- SIGKILL mid-write and mid-step ----------------------------------------------------------

def _kill_when_paused(tmp_path, corpus, fault, **settings) -> Path:
    """Start gpt-train (through fault_driver), wait until it pauses at `fault`, SIGKILL it."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    env = dict(os.environ, FAULT=fault, MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, str(DRIVER), *_argv(out, corpus, **settings)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
