"""gpt-train with one fault injected, for tests that kill or poison a real run at a chosen point.

    python fault_driver.py GPT-TRAIN-ARGUMENTS...        (or under torchrun)

FAULT (environment) says where:
    pause-save:NAME:K     the K-th write of checkpoint directory NAME (ckpt-0000008, best) stops
                          with its files written to the temporary directory, not yet renamed in
    pause-replace:NAME:K  the K-th replacement of NAME stops between its two renames: the old
                          directory is set aside and the new one not yet in place
    pause-step:N          step N stops after its first forward pass
    nan-loss:RANK:STEP    that rank's first loss at that step is NaN (its gradients stay finite)
A pause writes the file named by MARKER, then sleeps until the test kills the process, so the
kill lands at exactly that point and the test needs no timing guesses."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import gpt.checkpoint
from training import trainer
from training.cli import main

KIND, *ARGS = os.environ["FAULT"].split(":")
seen = {"count": 0, "step": 0}


def pause() -> None:
    Path(os.environ["MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)
    raise SystemExit("fault_driver: never killed")


def nth_time() -> bool:
    seen["count"] += 1
    return seen["count"] == int(ARGS[1])


def pause_in_save() -> None:
    real = gpt.checkpoint.atomic_directory

    @contextmanager
    def atomic_directory(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name == ARGS[0] and nth_time():
                pause()

    gpt.checkpoint.atomic_directory = atomic_directory


def pause_in_replace() -> None:
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == ARGS[0] and Path(src).name.startswith(f".{ARGS[0]}.tmp-") and nth_time():
            pause()
        return real(src, dst)

    os.replace = replace  # gpt.files calls os.replace through the module


def in_steps() -> None:
    real_lr, real_loss = trainer.get_lr, trainer.compute_loss

    def get_lr(step, cfg):
        seen["step"], seen["count"] = step + 1, 0  # the step about to run, and its micro-batches
        return real_lr(step, cfg)

    def compute_loss(model, batch, kind):
        loss = real_loss(model, batch, kind)
        if not model.training:  # evaluation
            return loss
        seen["count"] += 1
        first = seen["count"] == 1
        if KIND == "pause-step" and seen["step"] == int(ARGS[0]) and first:
            pause()
        if (
            KIND == "nan-loss"
            and int(os.environ.get("RANK", 0)) == int(ARGS[0])
            and seen["step"] == int(ARGS[1])
            and first
        ):
            return loss + loss.detach() * float("nan")  # the gradient does not flow through detach()
        return loss

    trainer.get_lr, trainer.compute_loss = get_lr, compute_loss


{
    "pause-save": pause_in_save,
    "pause-replace": pause_in_replace,
    "pause-step": in_steps,
    "nan-loss": in_steps,
}[KIND]()
sys.exit(main(sys.argv[1:]))
