"""Evaluation during training: the validation loss over the same batches each time, shown
with its own progress, stopping between batches as soon as a stop is asked for."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import distributed as ddp
from .config import TrainConfig
from .progress import Reporter


@torch.no_grad()
def validation_loss(
    raw: torch.nn.Module,
    make_val,
    cfg: TrainConfig,
    d: ddp.Dist,
    step: int,
    *,
    loss: Callable,
    autocast,
    to_device: Callable,
    stopping: Callable[[], bool],
    report: Reporter,
) -> float | None:
    """The mean loss over cfg.eval_batches() validation batches (split over the ranks), or None
    when a stop was asked for before they were done: every rank then returns None together."""
    raw.eval()
    try:
        sampler = make_val(cfg.seed + 7919 * (d.rank + 1))
        n = max(1, math.ceil(cfg.eval_batches() / d.world_size))
        total = torch.zeros((), device=next(raw.parameters()).device)
        with report.evaluating(step, n * d.world_size) as advance:
            for _ in range(n):
                if ddp.any_rank(stopping(), d):
                    return None
                with autocast:
                    total += loss(raw, to_device(sampler.next_batch()), cfg.model).float()
                advance(d.world_size)
    finally:
        raw.train()
    return ddp.mean(float(total) / n, d)


def final_accuracy(
    summary: dict, step: int, pairs: int, num_beams: int, accuracy: Callable, report: Reporter
) -> None:
    """seq2seq, at the end of a run: exact match on the held-out pairs, greedy (the last
    evaluation's when it was at this step) and with beam search, into summary and the log."""
    last = summary["evals"][-1] if summary["evals"] else {}
    summary["exact_match_greedy"] = (
        last["exact_match_greedy"]
        if last.get("step") == step and "exact_match_greedy" in last
        else accuracy(1)
    )
    summary["exact_match_beam"] = accuracy(num_beams)
    rec = {
        "kind": "accuracy",
        "step": step,
        "pairs": pairs,
        "exact_match_greedy": summary["exact_match_greedy"],
        "exact_match_beam": summary["exact_match_beam"],
        "num_beams": num_beams,
    }
    report.log(rec)
    report.say(
        f"exact match on {pairs} held-out pairs: greedy {100 * rec['exact_match_greedy']:.1f}%, "
        f"beam search ({num_beams} beams) {100 * rec['exact_match_beam']:.1f}%"
    )
