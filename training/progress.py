"""What a run reports: the progress bar, log lines, metrics.jsonl, the loss-curve PNG and,
with --tensorboard, TensorBoard event files."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from gpt.files import atomic_write_bytes

from .plot import plot_losses
from .tensorboard import open_writer, write_record

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def to_json_line(rec: dict) -> str:
    """One metrics.jsonl line. json.dumps writes NaN and Infinity bare, which is not JSON and
    breaks strict readers (jq, JavaScript): a non-finite number is written as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
    return json.dumps(clean, allow_nan=False)


class Reporter:
    """Rank 0 reports; other ranks get a silent one. The bar shows step, loss, tokens/s and ETA
    on a terminal; elsewhere (logs, CI) a plain line is printed every log interval instead."""

    def __init__(
        self,
        out: Path,
        *,
        start_step: int,
        max_iters: int,
        enabled: bool,
        quiet: bool,
        title: str = "",
        tensorboard: str | None = None,
    ):
        self.out, self.enabled, self.quiet, self.title = out, enabled, quiet, title
        self.writer = None
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.bar = None
        if not enabled:
            return
        self._load_history(start_step)
        self.writer = open_writer(tensorboard)
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=max_iters, initial=start_step, unit="it", dynamic_ncols=True, desc="training"
            )

    def _load_history(self, start_step: int) -> None:
        """Keep the metrics up to the step being resumed from; drop what a crashed run logged
        after its last checkpoint, which this run is about to redo."""
        path = self.out / METRICS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict) and rec.get("step", 0) <= start_step:
                kept.append(line)
                self._remember(rec)
        atomic_write_bytes(path, "".join(k + "\n" for k in kept).encode())

    def _remember(self, rec: dict) -> None:
        # the curves leave out windows where every step was skipped, and non-finite evaluations
        if rec.get("kind") == "train" and _finite(rec.get("loss")):
            self.train.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "eval" and _finite(rec.get("val_loss")):
            self.val.append((rec["step"], rec["val_loss"]))

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._remember(rec)
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(to_json_line(rec) + "\n")
        if self.writer is not None:
            write_record(self.writer, rec)

    def step(self, step: int, rec: dict | None) -> None:
        """Advance the bar; `rec` is the train record on logging steps."""
        if not self.enabled:
            return
        if self.bar is not None:
            if rec is not None:
                self.bar.set_postfix(loss=_loss(rec), tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
            self.bar.update(1)
        elif rec is not None and not self.quiet:
            print(
                f"step {step}: loss {_loss(rec)}, lr {rec['lr']:.2e}, {rec['ms_per_iter']:.1f} ms/iter, "
                f"{rec['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )

    @contextmanager
    def evaluating(self, step: int, batches: int):
        """Evaluation's own progress: a second bar under the training bar on a terminal, one line
        elsewhere. Yields a function to call with the batches done."""
        bar = None
        if self.enabled and not self.quiet:
            if self.bar is not None:
                from tqdm import tqdm

                bar = tqdm(
                    total=batches,
                    unit="batch",
                    dynamic_ncols=True,
                    leave=False,
                    desc=f"evaluating at step {step}",
                )
            else:
                print(f"step {step}: evaluating on {batches} validation batches", flush=True)
        try:
            yield bar.update if bar is not None else lambda n=1: None
        finally:
            if bar is not None:
                bar.close()

    def say(self, msg: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def plot(self) -> Path | None:
        if not self.enabled or not (self.train or self.val):
            return None
        return plot_losses(self.out / PLOT, self.train, self.val, self.title)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _loss(rec: dict) -> str:
    return f"{rec['loss']:.4f}" if rec["loss"] is not None else "n/a (every step skipped)"
