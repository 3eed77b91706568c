"""The lines that close a run: where its best checkpoint, metrics, plot and TensorBoard logs
are, the run's peak memory, and how to serve the model or continue the run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from gpt.files import CONFIG_FILE

from . import state as ckpt
from .progress import METRICS, PLOT


def _best_step(out: Path) -> int | None:
    try:
        meta = json.loads((out / ckpt.BEST / CONFIG_FILE).read_text(encoding="utf-8"))["metadata"]
        return int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def peak_memory(device: torch.device) -> dict | None:
    """The run's peak memory so far, {"bytes": n, "what": what it measures}: on CUDA the most
    memory the device's tensors held at once (torch.cuda.max_memory_allocated); elsewhere the
    process's peak resident set size, which counts Python, the libraries and the data too.
    None where neither can be read (no `resource` module: Windows)."""
    if device.type == "cuda":
        what = f"torch.cuda.max_memory_allocated on {device}: the most its tensors held at once"
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "what": what}
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    n = rss if sys.platform == "darwin" else rss * 1024
    return {"bytes": int(n), "what": "peak resident memory of the process"}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def closing_lines(
    out: Path,
    best_val: float,
    tensorboard: str | None,
    interrupted: bool,
    peak: dict | None = None,
    chat_template: str | None = None,
) -> list[str]:
    """`chat_template`: the template a chat fine-tune rendered its data with, which the server
    must render its prompts with too."""
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
    if peak is not None:
        lines.append(f"  peak memory      {_size(peak['bytes'])} ({peak['what']})")
    if has_best:
        template = f" --chat-template {chat_template}" if chat_template else ""
        lines.append(f"  serve it         gpt-serve --model {best}{template}")
    if interrupted:
        lines.append(f"  continue         gpt-train --resume --out {out}")
    return lines
