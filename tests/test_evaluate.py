"""Weighted k-NN against hand-computed cases."""
import math

import pytest
import torch

from bissl_kit.evaluate import knn_accuracy, knn_predict


def test_weighted_vote_by_hand():
    # train points on the unit circle; the query at angle 0
    angles = torch.tensor([0.1, 0.2, 1.5, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, q, k=3, temperature=0.5, num_classes=2)
    w = [math.exp(math.cos(a) / 0.5) for a in (0.1, 0.2, 1.5)]
    assert scores[0, 0].item() == pytest.approx(w[0])
    assert scores[0, 1].item() == pytest.approx(w[1] + w[2])
    # with k = 3 the two class-1 neighbours outvote the nearest (class 0) one
    assert knn_accuracy(train, labels, q, torch.tensor([1]), k=3, temperature=0.5).accuracy == 1.0
    # with k = 1 the nearest one decides
    assert knn_accuracy(train, labels, q, torch.tensor([1]), k=1, temperature=0.5).accuracy == 0.0


def test_protocol_is_reported_and_k_is_capped():
    res = knn_accuracy(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 2]),
                       k=50, temperature=0.07)
    assert res.accuracy == 1.0 and res.k == 3
    assert "k=3" in res.protocol() and "T=0.07" in res.protocol()
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), k=0, temperature=1.0, num_classes=3)
