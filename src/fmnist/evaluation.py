"""Test-set reports: per-class accuracy, the confusion matrix, and pictures of what went wrong."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from . import CLASSES  # noqa: E402
from .fileio import atomic_path  # noqa: E402


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n: int = len(CLASSES)) -> torch.Tensor:
    """[actual, predicted] counts, int64 [n, n]."""
    return torch.bincount(labels.cpu() * n + preds.cpu(), minlength=n * n).reshape(n, n)


def per_class_accuracy(cm: torch.Tensor) -> dict[str, float]:
    totals = cm.sum(1).clamp(min=1)
    return {c: cm[i, i].item() / totals[i].item() for i, c in enumerate(CLASSES)}


def write_confusion_csv(path: str | Path, preds: torch.Tensor, labels: torch.Tensor) -> None:
    """One row per test image, ``actual,predicted`` class names: DVC's confusion template reads this."""
    names = pd.Series(CLASSES)
    df = pd.DataFrame({"actual": names[labels.cpu().numpy()].values, "predicted": names[preds.cpu().numpy()].values})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_confusion_png(path: str | Path, cm: torch.Tensor, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xlabel="predicted", ylabel="actual", title=title)
    ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    ax.set_yticklabels(CLASSES)
    threshold = cm.max().item() / 2
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            v = cm[i, j].item()
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > threshold else "black")
    _save(fig, path)


def save_misclassified_png(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, limit: int = 36
) -> int:
    """A grid of the first ``limit`` misclassified images (uint8 [N, 28, 28]), titled actual -> predicted."""
    wrong = (preds.cpu() != labels.cpu()).nonzero().flatten()[:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i].cpu().numpy(), cmap="gray_r")
        ax.set_title(f"{CLASSES[labels[i]]}\n→ {CLASSES[preds[i]]}", fontsize=7)
    _save(fig, path)
    return len(wrong)
