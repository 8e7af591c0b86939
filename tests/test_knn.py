"""The kNN monitor (pretrain/train/knn.py) on features whose answer is known by hand."""
from __future__ import annotations

import pytest
import torch

from pretrain.train.knn import Bank, gather_features, knn_hits, knn_predict, knn_top1


def _bank(points, labels):
    return gather_features(torch.tensor(points, dtype=torch.float32), torch.tensor(labels), world=1)


def test_nearest_neighbours_vote_by_cosine_similarity():
    # Class 0 points along +x, class 1 along +y, class 2 along -x; scale must not matter.
    bank = _bank([[1, 0], [5, 0.1], [0, 1], [0.1, 3], [-1, 0], [-2, 0.2]], [0, 0, 1, 1, 2, 2])
    queries = torch.tensor([[3.0, 0.2], [0.2, 1.0], [-7.0, -0.1], [1.0, 1.1]])
    assert knn_predict(bank, queries, k=2).tolist() == [0, 1, 2, 1]
    assert knn_hits(bank, queries, torch.tensor([0, 1, 2, 0]), k=2) == (3, 4)
    assert knn_top1(bank, queries, torch.tensor([0, 1, 2, 0]), world=1, k=2) == 0.75


def test_vote_is_weighted_by_similarity_not_a_plain_majority():
    # Query at angle 0: one class-1 neighbour at cos 1.0, two class-0 neighbours at cos ~0.6.
    # Plain majority (k=3) says 0; exp(cos / 0.07) weights say 1 (e^14.3 >> 2 e^8.6).
    bank = _bank([[1, 0], [0.6, 0.8], [0.6, -0.8]], [1, 0, 0])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, q, k=3, temperature=0.07).item() == 1
    # A very high temperature flattens the weights to a majority vote.
    assert knn_predict(bank, q, k=3, temperature=1e4).item() == 0


def test_k_larger_than_the_bank_and_an_empty_query_set():
    bank = _bank([[1, 0], [0, 1]], [0, 1])
    assert knn_predict(bank, torch.tensor([[0.9, 0.1]]), k=20).tolist() == [0]
    assert knn_hits(bank, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == (0, 0)
    assert knn_top1(bank, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), world=1) is None
    with pytest.raises(ValueError, match="empty"):
        knn_predict(Bank(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), torch.ones(1, 2))


def test_separable_random_clusters_score_one_and_shuffled_labels_score_near_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    bank = gather_features(feats[::2], labels[::2], world=1)
    assert knn_top1(bank, feats[1::2], labels[1::2], world=1) == 1.0
    shuffled = gather_features(feats[::2], labels[::2][torch.randperm(100, generator=g)], world=1)
    assert knn_top1(shuffled, feats[1::2], labels[1::2], world=1) < 0.5
