"""The loss-curve PNG saved next to an adapter. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..fileio import atomic_path


def save_loss_curve(history: Iterable[dict], path: str | os.PathLike) -> Path | None:
    """Plot train loss (and eval loss, when logged) against the step; write ``path`` atomically.

    history: the trainer's metrics records (``{"step", "loss"}`` and ``{"step", "eval_loss"}``).
    Returns the path, or None when there is nothing to plot.
    """
    records = list(history)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    from matplotlib.figure import Figure  # the object API: no global pyplot state shared with the caller

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
