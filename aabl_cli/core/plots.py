"""Plots written beside the outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np


def plot_scores(path: Path | IO[bytes], scores: np.ndarray, *, threshold: float, isolated: np.ndarray,
                poisoned: np.ndarray | None = None) -> None:
    """Histogram of the scores on a log axis, the split threshold, and the groups coloured.

    Kept and isolated samples are stacked in two colours; when the ground truth is known
    the poisoned samples are drawn as an outline on top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(scores, dtype=np.float64)
    floor = max(float(scores[scores > 0].min()) if (scores > 0).any() else 1e-6, 1e-8)
    shown = np.clip(scores, floor, None)
    bins = np.geomspace(shown.min(), max(shown.max(), shown.min() * 1.01), 60)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist([shown[~isolated], shown[isolated]], bins=bins, stacked=True, color=["#4c72b0", "#dd8452"],
            label=[f"kept ({(~isolated).sum()})", f"isolated ({isolated.sum()})"])
    if poisoned is not None and poisoned.any():
        ax.hist(shown[poisoned.astype(bool)], bins=bins, histtype="step", color="#c44e52", linewidth=1.5,
                label=f"ground-truth poison ({int(poisoned.sum())})")
    ax.axvline(max(threshold, floor), color="black", linestyle="--", linewidth=1,
               label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("score: SCE of the iFGSM example (lower = more robust = more suspicious)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_trigger_preview(path: Path, examples: list[tuple[str, np.ndarray, np.ndarray]], *, title: str) -> None:
    """A PNG grid, one column per (kind, clean, triggered) example of uint8 (H, W, 3) images: the clean
    image, the triggered one, and their absolute difference stretched so its largest value is white
    (the stretch factor is printed under it; an invisible trigger needs a large one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, len(examples))
    fig, axes = plt.subplots(3, cols, figsize=(1.7 * cols + 0.8, 5.6), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j, (kind, clean, triggered) in enumerate(examples):
        diff = np.abs(triggered.astype(np.int16) - clean.astype(np.int16))
        peak = int(diff.max())
        gain = 255 / peak if peak else 1.0
        axes[0, j].imshow(clean, interpolation="nearest")
        axes[0, j].set_title(kind, fontsize=8)
        axes[1, j].imshow(triggered, interpolation="nearest")
        axes[2, j].imshow(np.clip(diff * gain, 0, 255).astype(np.uint8), interpolation="nearest")
        axes[2, j].set_xlabel(f"x{gain:.0f} (max {peak}/255)", fontsize=7)
    for row, label in enumerate(("clean", "triggered", "|difference|")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"aabl poison --backdoor {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_class_shares(path: Path | IO[bytes], per_class: list[dict[str, Any]], *, suspected: str | None = None,
                      max_classes: int = 40) -> int:
    """Horizontal bars per class: its share of the data, of the isolated set and (where the split recorded
    it) of the verdict core. A backdoor's target stands out as isolated share far above data share.

    With more than `max_classes` classes only those with the largest isolated shares are drawn; returns how
    many classes were left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = list(per_class)
    left_out = max(0, len(rows) - max_classes)
    if left_out:  # keep the classes a reader needs to see, in their own order
        top = sorted(range(len(rows)), key=lambda i: -rows[i]["share_of_isolated"])[:max_classes]
        rows = [rows[i] for i in sorted(top)]
    series = [("share of the data", "share_of_data", "#b0b0b0"), ("share of the isolated set", "share_of_isolated",
                                                                  "#dd8452")]
    if rows and all("share_of_core" in r for r in rows):
        series.append(("share of the core (most robust)", "share_of_core", "#c44e52"))
    n, k = len(rows), len(series)
    height = 0.8 / k
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.18 * k * max(n, 2)), dpi=120)
    y = np.arange(n)
    for j, (label, key, colour) in enumerate(series):
        ax.barh(y + (j - (k - 1) / 2) * height, [r[key] for r in rows], height=height, color=colour, label=label)
    ax.set_yticks(y)
    ax.set_yticklabels([r["class"][:24] for r in rows], fontsize=8)
    for tick, row in zip(ax.get_yticklabels(), rows):
        if row["class"] == suspected:
            tick.set_fontweight("bold")
            tick.set_color("#c44e52")
    ax.invert_yaxis()  # first class on top, as in the table
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share" + (f" ({left_out} classes with the smallest isolated shares not shown)" if left_out else ""))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return left_out


def plot_history(path: Path | IO[bytes], rows: list[dict[str, float]]) -> None:
    """Training curves, one row of `history.csv` per epoch: the loss on the left, the accuracies on the
    right (training, and validation clean / under PGD where recorded); dotted lines mark learning-rate drops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    epochs = [r["epoch"] for r in rows]
    marker = "o" if len(rows) <= 30 else None  # a one-epoch run is a point, not an invisible line
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    loss_ax.plot(epochs, [r.get("train_loss", np.nan) for r in rows], marker=marker, color="#4c72b0")
    loss_ax.set_title("training loss", fontsize=10)
    for key, label, colour in (("train_acc", "training", "#4c72b0"),
                               ("val_acc", "validation, clean", "#55a868"),
                               ("val_ra", "validation, under PGD", "#c44e52")):
        values = [r.get(key, np.nan) for r in rows]
        if np.isfinite(values).any():
            acc_ax.plot(epochs, values, marker=marker, color=colour, label=label)
    acc_ax.set_title("accuracy", fontsize=10)
    acc_ax.set_ylim(0, 1)
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    acc_ax.legend(fontsize=8, loc="lower right")
    drops = [rows[i]["epoch"] for i in range(1, len(rows)) if rows[i].get("lr", 0) < rows[i - 1].get("lr", 0)]
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for epoch in drops:
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
