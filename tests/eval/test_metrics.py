"""The shared metrics: cosines against hand-computed values, masked accuracy on scored positions only."""

import doctest

import numpy as np
import pytest
import torch

import statelab.eval.metrics as metrics
from statelab.eval.metrics import cosine, masked_accuracy, row_cosine


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def test_cosine_and_row_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert cosine(a, b) == pytest.approx((1 - 2) / (np.sqrt(5) * np.sqrt(3)))
    assert row_cosine(a, b) == pytest.approx((1 / np.sqrt(2) - 1) / 2)
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_masked_accuracy_counts_scored_positions_only():
    targets = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    masks = [np.array([True, False, True, True]), np.array([True, True])]
    predicted = [np.array([1, 9, 9, 4, 7]), np.array([5])]  # longer: cut; shorter: the missing position is wrong
    assert masked_accuracy(predicted, targets, masks) == pytest.approx(3 / 5)
    assert np.isnan(masked_accuracy([np.array([1])], [np.array([1])], [np.array([False])]))
    with pytest.raises(ValueError, match="mask of shape"):
        masked_accuracy([np.array([1])], [np.array([1, 2])], [np.array([True])])
