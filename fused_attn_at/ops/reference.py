"""The reference as a backend: the same calls as the kernels, computed by python_ref."""
from __future__ import annotations

import python_ref

_NAME = {1: "at", 2: "iat"}


def perturbation(scores, mask, direction, kind: int, eps: float):
    if kind == 1:  # AT and RP share the normalisation
        return python_ref.at_perturbation(direction, mask, eps)
    return python_ref.iat_perturbation(scores, direction, mask, eps)


def attention_pool(h, scores, mask, direction, kind: int, eps: float):
    s = scores if kind == 0 else scores + perturbation(scores, mask, direction, kind, eps)
    a = python_ref.masked_softmax(s, mask)
    return (a[:, None, :] @ h).squeeze(1), a
