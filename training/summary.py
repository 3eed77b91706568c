"""The lines that close a run: where its best checkpoint, metrics, plot and TensorBoard logs
are, and how to serve the model or continue the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpt.files import CONFIG_FILE

from . import state as ckpt
from .progress import METRICS, PLOT


def _best_step(out: Path) -> int | None:
    try:
        meta = json.loads((out / ckpt.BEST / CONFIG_FILE).read_text(encoding="utf-8"))["metadata"]
        return int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def closing_lines(out: Path, best_val: float, tensorboard: str | None, interrupted: bool) -> list[str]:
    best = out / ckpt.BEST
    has_best = math.isfinite(best_val) and (best / CONFIG_FILE).is_file()
    lines = ["summary:"]
    if has_best:
        step = _best_step(out)
        at = f" at step {step}" if step is not None else ""
        lines.append(f"  best checkpoint  {best} (validation loss {best_val:.4f}{at})")
    else:
        lines.append("  best checkpoint  none yet: no evaluation finished with a finite loss")
    lines.append(f"  metrics          {out / METRICS}")
    if (out / PLOT).is_file():
        lines.append(f"  loss plot        {out / PLOT}")
    if tensorboard:
        lines.append(f"  TensorBoard      {tensorboard} (tensorboard --logdir {tensorboard})")
    if has_best:
        lines.append(f"  serve it         gpt-serve --model {best}")
    if interrupted:
        lines.append(f"  continue         gpt-train --resume --out {out}")
    return lines
