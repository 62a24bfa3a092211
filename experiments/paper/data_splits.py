"""Seeded train/test splits that give the same partitions as the authors' preprocessing.

The authors (and Jain & Wallace before them) split with scikit-learn's ``train_test_split(..., random_state=S)``,
optionally stratified. scikit-learn is not a dependency of this project, so these functions re-implement the
two algorithms on top of ``numpy.random.RandomState(S)``, drawing the random numbers in the same order, so a
given seed selects the same items. They were checked against scikit-learn 1.9.1 (see tests/test_data.py, which
holds index lists computed with scikit-learn) on the sizes and class balances of the paper's datasets.

Sizes follow scikit-learn's rules: a float ``test_size`` takes ``ceil(test_size * n)`` items for the test part,
a float ``train_size`` takes ``floor(train_size * n)`` for the train part, and the other part is the rest.
Returned index lists are in the (shuffled) order scikit-learn returns them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _split_sizes(n: int, test_size: float | None, train_size: float | None) -> tuple[int, int]:
    if (test_size is None) == (train_size is None):
        raise ValueError("give exactly one of test_size and train_size (a fraction in (0, 1))")
    fraction = test_size if test_size is not None else train_size
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must lie in (0, 1), got {fraction}")
    if test_size is not None:
        n_test = math.ceil(test_size * n)
        n_train = n - n_test
    else:
        n_train = math.floor(train_size * n)
        n_test = n - n_train
    if n_train == 0 or n_test == 0:
        raise ValueError(f"cannot split {n} items with test_size={test_size}, train_size={train_size}: a part would be empty")
    return n_train, n_test


def shuffle_split(n: int, seed: int, *, test_size: float | None = None,
                  train_size: float | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, test) of ``range(n)`` as ``train_test_split(range(n), ..., random_state=seed)`` gives them."""
    n_train, n_test = _split_sizes(n, test_size, train_size)
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test:n_test + n_train].tolist(), permutation[:n_test].tolist()


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class counts summing to n_draws, proportional to class_counts; remainders are rounded up
    largest-first, ties among equal remainders broken by rng (scikit-learn's rule, same draws)."""
    continuous = class_counts / class_counts.sum() * n_draws
    counts = np.floor(continuous)
    missing = int(n_draws - counts.sum())
    if missing > 0:
        remainder = continuous - counts
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            take = min(len(tied), missing)
            counts[rng.choice(tied, size=take, replace=False)] += 1
            missing -= take
            if missing == 0:
                break
    return counts.astype(int)


def stratified_split(labels: Sequence, seed: int, *, test_size: float | None = None,
                     train_size: float | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, test) of ``range(len(labels))`` as
    ``train_test_split(range(n), stratify=labels, ..., random_state=seed)`` gives them."""
    labels = np.asarray(labels)
    n = len(labels)
    n_train, n_test = _split_sizes(n, test_size, train_size)
    classes, class_of = np.unique(labels, return_inverse=True)
    class_counts = np.bincount(class_of)
    if class_counts.min() < 2:
        raise ValueError(f"stratified split needs at least 2 items per class; counts {dict(zip(classes.tolist(), class_counts.tolist()))}")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"stratified split of {n} items into {n_train}/{n_test} cannot hold {len(classes)} classes in each part")
    # items of each class in their original order (a stable sort keeps ties in index order)
    members = np.split(np.argsort(class_of, kind="mergesort"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    train_per_class = _approximate_mode(class_counts, n_train, rng)
    test_per_class = _approximate_mode(class_counts - train_per_class, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for class_members, n_tr, n_te in zip(members, train_per_class, test_per_class):
        shuffled = class_members[rng.permutation(len(class_members))]
        train.extend(shuffled[:n_tr].tolist())
        test.extend(shuffled[n_tr:n_tr + n_te].tolist())
    return rng.permutation(train).tolist(), rng.permutation(test).tolist()
