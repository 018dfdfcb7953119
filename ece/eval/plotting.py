"""Offline PNG plots: matplotlib on its file-only backend, written atomically; and the training curve of
a trained editor (stage train_editor). Kept apart from report.py so that drawing a plot does not make
a stage depend on the evaluation's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ece.data.io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported only when a plot is drawn (a slow import,
    and no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Write a figure atomically (folders made) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


def plot_training_curve(curve: list[dict[str, Any]], title: str, path: Path, loss: str = "loss") -> None:
    """Train and held-out loss against training steps (an empty curve: the axes and the title only, for
    a method that trains nothing, so the stage's declared plot always exists)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [c["step"] for c in curve]
    for key, label, color in (("train_loss", "train", "#8c9eb5"), ("heldout_loss", "held-out", "#d9534f")):
        ax.plot(steps, [c[key] for c in curve], marker="o", label=label, color=color)
    ax.set(title=title, xlabel="training steps (edits)", ylabel=loss)
    if curve:
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)
