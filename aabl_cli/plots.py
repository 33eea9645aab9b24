"""Plots written beside the outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_scores(path: Path, scores: np.ndarray, *, threshold: float, isolated: np.ndarray,
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
    fig.savefig(path)
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
    fig.suptitle(f"aabl poison --attack {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
