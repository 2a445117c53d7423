"""Classification metrics and plots, for every stage that evaluates a classifier (transfer,
train_cnn, score): confusion matrix, top-1 accuracy, weighted F1, per-class precision/recall/F1,
training curves (PNG bytes via matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows are true labels, columns predictions."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat[: num_classes * num_classes].reshape(num_classes, num_classes)


def classification_metrics(
    matrix: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics of a confusion matrix (rows: true label, columns: prediction).

    ``top1`` is the accuracy and ``weighted_f1`` Spark's ``weightedFMeasure``; per class,
    precision and recall are ``None`` where they are undefined (nothing predicted or nothing
    true of that class), and count as 0 in the weighted F1, as Spark counts them.
    """
    matrix = np.asarray(matrix, np.int64)
    n = len(matrix)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"class_names must name all {n} labels. Received: {len(names)} names")
    total = int(matrix.sum())
    hits = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    actual = matrix.sum(axis=1).astype(float)
    precision = np.divide(hits, predicted, out=np.full(n, np.nan), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.full(n, np.nan), where=actual > 0)
    p, r = np.nan_to_num(precision), np.nan_to_num(recall)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros(n), where=(p + r) > 0)

    def rounded(value: float) -> float | None:
        return None if np.isnan(value) else round(float(value), 6)

    return {
        "rows": total,
        "top1": float(hits.sum() / total) if total else None,
        "weighted_f1": float((f1 * actual).sum() / total) if total else None,
        "per_class": [
            {"label": i, "name": names[i], "precision": rounded(precision[i]),
             "recall": rounded(recall[i]), "f1": round(float(f1[i]), 6),
             "support": int(actual[i])}
            for i in range(n)
        ],
        "confusion_matrix": matrix.tolist(),
    }


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves_png(history: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Loss and top-1 accuracy per epoch, training vs validation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "top1", "top-1 accuracy")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = history.get(prefix + key)
            if values:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, values, style, ms=3, label=("validation " if prefix else
                                                            "training ") + label)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """The confusion matrix as a heat map with counts in the cells (log colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = np.asarray(matrix)
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(0.55 * n + 2.5, 0.55 * n + 2))
    ax.imshow(matrix + 1, cmap="Blues", norm=LogNorm())
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > top ** 0.5 * 4 else "black")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(title)
    return _png(fig)
