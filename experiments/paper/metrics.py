"""Evaluation measures of the paper: task metrics and the attention-vs-importance correlation.

All results are plain Python floats / ints (JSON-safe). A quantity that is undefined on the data given
(ROC-AUC with a single class present, a mean over zero instances) is None, never NaN.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch

KINDS = ("bc", "qa", "nli")


def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counted one half:
    AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P N), ranks averaged over ties.
    None when only one class is present."""
    labels = _as_numpy(labels, "labels")
    scores = _as_numpy(scores, "scores")
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of the same length, got {labels.shape} and {scores.shape}")
    positives = labels == 1
    n_pos = int(positives.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _positive_class_scores(scores: np.ndarray, logits: bool | None) -> tuple[np.ndarray, bool]:
    """(score of class 1, whether it is a logit) from [N] or [N, 2] scores."""
    if scores.ndim == 2:
        if scores.shape[1] != 2:
            raise ValueError(f"binary classification scores must be [N] or [N, 2], got {tuple(scores.shape)}")
        if logits is None:
            logits = not (np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4))
        # for two classes, softmax(z)[1] = sigmoid(z1 - z0): the difference is a logit of class 1
        return (scores[:, 1] - scores[:, 0], True) if logits else (scores[:, 1], False)
    if logits is None:
        logits = bool(np.any(scores < 0) or np.any(scores > 1))
    return scores, logits


def classification_metrics(labels, probs_or_logits, kind: str, *, logits: bool | None = None) -> dict:
    """Task metrics of the paper.

    bc: ``probs_or_logits`` is [N] (probability or logit of class 1) or [N, 2]; returns accuracy, f1 (of
    class 1), roc_auc (None if one class only), n. A probability above 0.5 (a logit above 0) predicts 1.
    ``logits`` says which the scores are; None infers it: [N] values outside [0, 1] are logits, [N, 2]
    rows that are non-negative and sum to 1 are probabilities (pass it explicitly when logits may all
    lie in [0, 1]).
    qa / nli: ``probs_or_logits`` is [N, C]; returns accuracy and n (argmax; CNN's candidate masking must
    already be applied to the scores)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    labels = _as_numpy(labels, "labels").astype(np.int64)
    scores = _as_numpy(probs_or_logits, "probs_or_logits")
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    if scores.shape[0] != len(labels):
        raise ValueError(f"probs_or_logits has {scores.shape[0]} rows for {len(labels)} labels")
    if kind == "bc":
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("binary classification labels must be 0 or 1")
        positive, is_logit = _positive_class_scores(scores, logits)
        predictions = (positive > (0.0 if is_logit else 0.5)).astype(np.int64)
        true_pos = int(np.sum((predictions == 1) & (labels == 1)))
        false_pos = int(np.sum((predictions == 1) & (labels == 0)))
        false_neg = int(np.sum((predictions == 0) & (labels == 1)))
        # F1 = 2TP / (2TP + FP + FN); 0 when there is no positive at all (scikit-learn's zero_division=0)
        denominator = 2 * true_pos + false_pos + false_neg
        return {"accuracy": float(np.mean(predictions == labels)),
                "f1": float(2 * true_pos / denominator) if denominator else 0.0,
                "roc_auc": roc_auc(labels, positive),
                "n": int(len(labels))}
    if scores.ndim != 2:
        raise ValueError(f"{kind} scores must be [N, C], got shape {tuple(scores.shape)}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}")
    return {"accuracy": float(np.mean(scores.argmax(axis=1) == labels)), "n": int(len(labels))}


def _rows(values, mask, name: str) -> list[np.ndarray]:
    """Per-instance 1-D arrays: from a list of vectors, or from a padded [N, T] array and its mask."""
    if mask is None:
        if isinstance(values, torch.Tensor) or (isinstance(values, np.ndarray) and values.ndim == 2):
            raise ValueError(f"{name} is a padded [N, T] array: pass mask (True at valid tokens) so padding is left out")
        return [_as_numpy(v, name).reshape(-1) for v in values]
    array = _as_numpy(values, name)
    valid = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if array.shape != valid.shape or array.ndim != 2:
        raise ValueError(f"{name} {array.shape} and mask {valid.shape} must both be [N, T]")
    return [row[keep] for row, keep in zip(array, valid)]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def attention_gradient_correlation(attentions, importances, mask=None) -> dict:
    """Per test instance, the correlation over its valid tokens between attention weights and word
    importances (Pearson r, the paper's measure, and Kendall tau-b, Jain & Wallace's); their mean and
    standard deviation (population, ddof=0) over instances.

    ``attentions`` / ``importances``: sequences of per-instance 1-D vectors (valid tokens only), or padded
    [N, T] arrays / tensors together with ``mask`` [N, T] (True at valid tokens). An instance whose
    correlation is undefined (fewer than 2 tokens, or a constant vector) is left out and counted in
    ``n_dropped``. Returns pearson_mean, pearson_std, kendall_mean, kendall_std, n (instances used),
    n_dropped; means and stds are None when no instance is usable."""
    attention_rows = _rows(attentions, mask, "attentions")
    importance_rows = _rows(importances, mask, "importances")
    if len(attention_rows) != len(importance_rows):
        raise ValueError(f"{len(attention_rows)} attention vectors but {len(importance_rows)} importance vectors")
    pearsons, kendalls = [], []
    dropped = 0
    for number, (attention, importance) in enumerate(zip(attention_rows, importance_rows)):
        if attention.shape != importance.shape:
            raise ValueError(f"instance {number}: attention has {attention.size} tokens, importance {importance.size}")
        if attention.size < 2 or np.ptp(attention) == 0 or np.ptp(importance) == 0:
            dropped += 1
            continue
        pearson = scipy.stats.pearsonr(attention, importance)[0]
        kendall = scipy.stats.kendalltau(attention, importance)[0]
        if not (math.isfinite(pearson) and math.isfinite(kendall)):
            dropped += 1
            continue
        pearsons.append(float(pearson))
        kendalls.append(float(kendall))
    pearson_mean, pearson_std = _mean_std(pearsons)
    kendall_mean, kendall_std = _mean_std(kendalls)
    return {"pearson_mean": pearson_mean, "pearson_std": pearson_std, "kendall_mean": kendall_mean,
            "kendall_std": kendall_std, "n": len(pearsons), "n_dropped": dropped}


def mean_total_variation(before: Sequence, after: Sequence, mask=None) -> float | None:
    """Mean over instances of the total-variation distance 0.5 * sum_t |a_t - b_t| between two attention
    distributions of each instance (the robustness measure); None for zero instances."""
    rows_before = _rows(before, mask, "before")
    rows_after = _rows(after, mask, "after")
    if len(rows_before) != len(rows_after):
        raise ValueError(f"{len(rows_before)} vs {len(rows_after)} instances")
    distances = [0.5 * float(np.abs(b - a).sum()) for b, a in zip(rows_before, rows_after)]
    return float(np.mean(distances)) if distances else None
