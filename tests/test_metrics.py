"""Metrics (experiments/paper/metrics.py) on hand-computed examples, and the heat map files
(experiments/paper/heatmaps.py)."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

from paper.heatmaps import write_heatmaps  # noqa: E402
from paper.metrics import (attention_gradient_correlation, classification_metrics, mean_total_variation,  # noqa: E402
                           roc_auc)


# ----------------------------------------------------------------------------------------------- ROC-AUC

def test_auc_hand_computed():
    # positive/negative pairs: (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4): 3 of 4 ordered right
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 = 0.5) 0.5 + 1 + 1 + 1 = 3.5 of 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0]) == pytest.approx(1.0)
    assert roc_auc([1, 1, 0, 0], [0.0, 0.1, 0.8, 0.9]) == pytest.approx(0.0)


def test_auc_against_pairwise_count():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 2, size=200)
    scores = np.round(generator.random(200), 1)  # rounded: many ties
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairs = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(pairs / (len(positives) * len(negatives)))


def test_auc_single_class_is_none():
    assert roc_auc([1, 1, 1], [0.2, 0.5, 0.9]) is None


# ----------------------------------------------------------------------------------------------- task metrics

def test_binary_metrics_hand_computed():
    labels = [1, 1, 0, 0, 1]
    probs = [0.9, 0.2, 0.7, 0.1, 0.6]
    # predictions 1 0 1 0 1: TP 2, FP 1, FN 1 -> F1 = 2*2 / (2*2 + 1 + 1) = 2/3; accuracy 3/5
    # AUC: positives 0.9, 0.2, 0.6 vs negatives 0.7, 0.1: 0.9>both, 0.2>0.1 only, 0.6>0.1 only = 4 of 6
    expected = {"accuracy": 0.6, "f1": pytest.approx(2 / 3), "roc_auc": pytest.approx(4 / 6), "n": 5}
    assert classification_metrics(labels, probs, "bc") == expected
    logits = torch.logit(torch.tensor(probs, dtype=torch.float64))
    assert classification_metrics(torch.tensor(labels), logits, "bc") == expected  # logits recognised (values < 0)
    two_column = np.stack([1 - np.array(probs), probs], axis=1)
    assert classification_metrics(labels, two_column, "bc") == expected
    assert classification_metrics(labels, torch.stack([torch.zeros(5, dtype=torch.float64), logits], 1), "bc") == expected


def test_binary_metrics_explicit_logits_in_unit_interval():
    # logits 0.2 and 0.9 are both > 0: class 1, though as probabilities 0.2 would be class 0
    assert classification_metrics([1, 1], [0.2, 0.9], "bc", logits=True)["accuracy"] == 1.0
    assert classification_metrics([1, 1], [0.2, 0.9], "bc")["accuracy"] == 0.5


def test_binary_metrics_no_positive_prediction():
    result = classification_metrics([0, 0, 1], [0.1, 0.2, 0.3], "bc")
    assert result["f1"] == 0.0 and result["accuracy"] == pytest.approx(2 / 3) and result["roc_auc"] == 1.0
    assert json.loads(json.dumps(result)) == result  # JSON-safe


@pytest.mark.parametrize("kind", ["qa", "nli"])
def test_multiclass_accuracy(kind):
    scores = [[0.1, 0.7, 0.2], [2.0, -1.0, 0.5], [0.0, 0.1, 0.3], [0.3, 0.3, 0.4]]
    assert classification_metrics([1, 0, 0, 2], scores, kind) == {"accuracy": 0.75, "n": 4}


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="kind"):
        classification_metrics([0], [0.5], "regression")
    with pytest.raises(ValueError, match="rows"):
        classification_metrics([0, 1], [0.5], "bc")
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics([0, 1], [0.5, float("nan")], "bc")
    with pytest.raises(ValueError, match="0 or 1"):
        classification_metrics([0, 2], [0.5, 0.5], "bc")


# ----------------------------------------------------------------------------------------------- correlation

# instance 0: a = (.1 .2 .3 .4), g = (.2 .1 .4 .3): deviations (-.15 -.05 .05 .15) and (-.05 -.15 .15 .05),
#   Pearson = .03 / sqrt(.05 * .05) = 0.6; Kendall: pairs (1,2) and (3,4) discordant, 4 concordant: 2/6 = 1/3
# instance 1: (.2 .3 .4) vs (.6 .4 .2), a falling line: Pearson -1, Kendall -1
# instance 2: constant attention: undefined, dropped
ATTENTIONS = [[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4], [0.5, 0.5]]
IMPORTANCES = [[0.2, 0.1, 0.4, 0.3], [0.6, 0.4, 0.2], [0.9, 0.1]]
EXPECTED = {"pearson_mean": pytest.approx(-0.2), "pearson_std": pytest.approx(0.8),
            "kendall_mean": pytest.approx(-1 / 3), "kendall_std": pytest.approx(2 / 3), "n": 2, "n_dropped": 1}


def test_correlation_hand_computed():
    assert attention_gradient_correlation(ATTENTIONS, IMPORTANCES) == EXPECTED


def test_correlation_padded_with_mask():
    attention = torch.zeros(3, 5)
    importance = torch.full((3, 5), 7.0)  # padding values differ wildly: they must be ignored
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for row, (a, g) in enumerate(zip(ATTENTIONS, IMPORTANCES)):
        attention[row, :len(a)] = torch.tensor(a)
        importance[row, :len(g)] = torch.tensor(g)
        mask[row, :len(a)] = True
    assert attention_gradient_correlation(attention, importance, mask) == EXPECTED
    with pytest.raises(ValueError, match="mask"):
        attention_gradient_correlation(attention, importance)


def test_correlation_all_dropped_has_no_nan():
    result = attention_gradient_correlation([[1.0], [0.3, 0.3]], [[2.0], [0.1, 0.9]])
    assert result == {"pearson_mean": None, "pearson_std": None, "kendall_mean": None, "kendall_std": None,
                      "n": 0, "n_dropped": 2}
    assert not any(isinstance(v, float) and math.isnan(v) for v in result.values())


def test_correlation_length_mismatch():
    with pytest.raises(ValueError, match="instance 0"):
        attention_gradient_correlation([[0.1, 0.9]], [[0.1, 0.2, 0.7]])


def test_mean_total_variation():
    # 0.5 * (|.5-1| + |.5-0|) = 0.5 and 0 for identical rows: mean 0.25
    assert mean_total_variation([[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.2, 0.8]]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------- heat maps

def test_heatmap_files(tmp_path):
    examples = [
        (["the", "<b>movie</b>", "was", "great", "."], {"attention": [0.1, 0.5, 0.1, 0.25, 0.05],
                                                        "gradient importance": torch.tensor([0.2, 0.3, 0.0, 0.4, 0.1])}),
        (["word"] * 80, {"attention": np.linspace(0, 1, 80), "gradient importance": np.zeros(80)}),  # wraps lines
    ]
    html_path, png_path = write_heatmaps(examples, tmp_path / "maps", "Attention & importance")
    assert html_path.parent == png_path.parent == tmp_path / "maps"
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "&lt;b&gt;movie&lt;/b&gt;" in page and "<b>movie" not in page
    assert "Attention &amp; importance" in page and "gradient importance" in page
    # self-contained: inline CSS only, nothing fetched from elsewhere
    assert "<style>" in page and "http" not in page and "<link" not in page and "<script" not in page
    # each token coloured by its row's weight relative to the row maximum (0.5 -> 1, 0.25 -> 0.5)
    assert "rgba(214, 39, 40, 1.0)" in page and "rgba(214, 39, 40, 0.5)" in page
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_heatmap_bad_input(tmp_path):
    with pytest.raises(ValueError, match="3 values for 2 tokens"):
        write_heatmaps([(["a", "b"], {"attention": [0.1, 0.2, 0.7]})], tmp_path, "t")
    with pytest.raises(TypeError):
        write_heatmaps([(["a", "b"], [0.5, 0.5])], tmp_path, "t")
    with pytest.raises(ValueError, match="no examples"):
        write_heatmaps([], tmp_path, "t")
