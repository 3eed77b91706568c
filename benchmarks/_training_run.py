"""What the training benchmarks share: run the real trainer on a recipe and time it."""

from __future__ import annotations

import sys
import time


def run_recipe(cfg: dict, script: str) -> tuple[dict, float] | None:
    """(gpt-train's run summary, wall seconds), or None after printing why there are no figures
    (the run was refused, e.g. --out already holds one, or it was interrupted)."""
    from training.trainer import train

    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except ValueError as e:  # ConfigError / CheckpointError
        print(f"{script}: error: {e}", file=sys.stderr)
        return None
    wall = time.perf_counter() - t0
    if summary["interrupted"]:
        print(f"{script}: interrupted at step {summary['step']}; no figures", file=sys.stderr)
        return None
    return summary, wall
