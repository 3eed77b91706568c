"""The loss curve: training and validation loss against step, as a PNG."""

from __future__ import annotations

from pathlib import Path


def plot_losses(
    path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str = ""
) -> Path:
    """Write the PNG atomically (a viewer refreshing it never sees half a file)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import io

    import matplotlib.pyplot as plt

    from gpt.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
