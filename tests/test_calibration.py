"""The calibration loss on hand-made probabilities, checked against direct arithmetic."""
import numpy as np
import pytest
import torch

from pipeline.calibration import calibration_objective, calibration_terms


def test_terms_on_hand_made_probabilities():
    # image 0: two samples, both confident in the true class 1 -> recoverable
    # image 1: samples disagree (class 0 and class 2), true label 1 -> not recoverable
    probs = torch.tensor(
        [
            [[0.1, 0.8, 0.1], [0.0, 1.0, 0.0]],
            [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    labels = torch.tensor([1, 1])
    t = calibration_terms(probs, labels)
    brier0 = ((0.1**2 + 0.2**2 + 0.1**2) + 0.0) / 2
    brier1 = ((1 + 1 + 0) + (0 + 1 + 1)) / 2
    np.testing.assert_allclose(t.brier.numpy(), [brier0, brier1], rtol=1e-6)
    qbar0 = np.array([0.05, 0.9, 0.05])
    qbar1 = np.array([0.5, 0.0, 0.5])
    np.testing.assert_allclose(t.collision.numpy(), [(qbar0**2).sum(), (qbar1**2).sum()], rtol=1e-6)
    np.testing.assert_array_equal(t.recoverable.numpy(), [1.0, 0.0])
    np.testing.assert_allclose(t.top_frequency.numpy(), [1.0, 0.5])
    lam = 0.3
    obj = calibration_objective(t, lam)
    np.testing.assert_allclose(obj.numpy(), [brier0, lam * (qbar1**2).sum()], rtol=1e-6)


def test_gradients_push_the_right_way():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([2])  # q_bar's argmax is 0 or 1, never 2: unrecoverable -> diversify
    t = calibration_terms(logits.softmax(-1), labels)
    assert t.recoverable.item() == 0.0
    calibration_objective(t, lam=1.0).sum().backward()
    # diversity: lowering the collision probability moves mass toward the unused class 2
    assert logits.grad[0, :, 2].lt(0).all()  # gradient descent raises class-2 logits


def test_rejects_single_sample():
    with pytest.raises(ValueError, match="m >= 2"):
        calibration_terms(torch.ones(2, 1, 3) / 3, torch.tensor([0, 1]))
