"""PNG figures a person would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: hospitals' servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_curves", "plot_heatmap", "sample_grid"]


def _to_display(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W[, 3]) in [0, 1] for imshow."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return x[:, 0] if x.shape[1] == 1 else np.transpose(x, (0, 2, 3, 1))


def sample_grid(
    path: str | Path,
    *,
    columns: Mapping[str, np.ndarray],
    title: str = "",
    max_rows: int = 6,
) -> Path:
    """Save a grid: one row per sample, one column per named array.

    Args:
        columns: name -> array (N, C, H, W); images in [-1, 1], masks (one channel) in {0, 1}
            (shown as black/white). Typical columns: mask, synthetic image, real image, prediction.
    """
    names = list(columns)
    rows = min(max_rows, min(len(v) for v in columns.values()))
    fig, axes = plt.subplots(rows, len(names), figsize=(1.8 * len(names), 1.8 * rows), squeeze=False)
    for j, name in enumerate(names):
        arr = np.asarray(columns[name], dtype=np.float32)
        is_mask = arr.shape[1] == 1 and arr.min() >= 0.0 and set(np.unique(arr)) <= {0.0, 1.0}
        shown = arr[:, 0] if is_mask else _to_display(arr)
        for i in range(rows):
            ax = axes[i][j]
            ax.imshow(shown[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """Line plot of named (x, y) series, e.g. test Dice per round per site."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, iterations: no 1.5
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(
    path: str | Path,
    values: np.ndarray,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Annotated heat map (e.g. models x sites test Dice); NaN cells are left blank."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(col_labels), 1.0 + 0.5 * len(row_labels)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                color = "black" if values[i, j] > (vmin + vmax) / 2 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
