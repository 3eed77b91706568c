"""--tensorboard DIR: what metrics.jsonl records, as TensorBoard scalars and text, through
torch.utils.tensorboard (which needs the `tensorboard` package: pip install '.[tensorboard]')."""

from __future__ import annotations

import math

from .config import ConfigError

# metrics.jsonl fields that are not a curve
NOT_SCALARS = {"kind", "step"}


def open_writer(log_dir: str | None):
    """A SummaryWriter for `log_dir`, or None without one; a ConfigError if TensorBoard is missing."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or the project's [tensorboard] extra)"
        ) from None
    return SummaryWriter(log_dir=log_dir)


def write_record(writer, rec: dict) -> None:
    """One metrics.jsonl record: its numbers as scalars named kind/field (train/loss,
    eval/val_loss, ...), a sample record's continuations as text."""
    step, kind = rec.get("step", 0), rec.get("kind", "log")
    if kind == "sample":
        text = "\n\n".join(f"**{_md(s['prompt'])}** {_md(s['text'])}" for s in rec.get("samples", []))
        writer.add_text("samples", text, step)
        return
    for key, value in rec.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            writer.add_scalar(f"{kind}/{key}", value, step)


def _md(s: str) -> str:
    # TensorBoard renders text as Markdown: keep the model's newlines and indentation visible
    return "`" + s.replace("`", "'").replace("\n", "⏎") + "`"
