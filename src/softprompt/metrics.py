"""Task metrics from scikit-learn and scipy, by the names task specs use."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from sklearn.metrics import confusion_matrix as sklearn_confusion

from .errors import SoftpromptError

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, r: accuracy_score(r, p),
    "f1": lambda p, r: f1_score(r, p, pos_label=1, average="binary", zero_division=0),
    "macro_f1": lambda p, r: f1_score(r, p, average="macro", zero_division=0),
    "mcc": lambda p, r: matthews_corrcoef(r, p),
    "pearson": lambda p, r: pearsonr(p, r)[0] if np.std(p) > 0 else 0.0,
    "spearman": lambda p, r: spearmanr(p, r)[0] if np.std(p) > 0 else 0.0,
}


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Each named metric of predictions against references (a constant prediction scores 0 correlation)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise SoftpromptError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    if len(predictions) != len(references) or not len(references):
        raise SoftpromptError("metrics need as many predictions as references, and at least one")
    p, r = np.asarray(predictions), np.asarray(references)
    return {name: float(METRICS[name](p, r)) for name in names}


def confusion_matrix(predictions: Sequence[Any], references: Sequence[Any], num_labels: int) -> list[list[int]]:
    """Counts by [true label][predicted label]."""
    return sklearn_confusion(references, predictions, labels=list(range(num_labels))).tolist()
