"""k-nearest-neighbour top-1 of frozen features: the monitor of self-supervised runs.

A memory bank of labelled training samples (their pooled encoder features and labels) votes
for the class of each held-out query: the k most cosine-similar bank entries each add
exp(similarity / temperature) to their class (the weighted vote of Wu et al. 2018 and
DINO, k=20 and T=0.07 by default). Top-1 is the share of queries whose winning class is
their label. No training, no head: it measures what the features already separate.

    bank = gather_features(feats, labels, world)                 # every rank: the whole bank
    correct, counted = knn_hits(bank, query_feats, query_labels, k=20, temperature=0.07)

`gather_features` is collective (all ranks, same call order); `knn_hits` is local, so
each rank scores its own queries and the caller sums (correct, counted) over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class Bank:
    features: torch.Tensor   # (N, D) float32, L2-normalised
    labels: torch.Tensor     # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def gather_features(features: torch.Tensor, labels: torch.Tensor, world: int) -> Bank:
    """This rank's (n, D) features and (n,) labels -> the bank of all ranks (collective).

    Ranks may hold different n (the caller drops padding and unlabelled samples first), so
    each rank's share is padded to the largest before the all-gather and cut back after."""
    features = F.normalize(features.float(), dim=-1)
    labels = labels.long()
    if world <= 1 or not dist.is_initialized():
        return Bank(features, labels)
    device = features.device
    n = torch.tensor([labels.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    pad_f = features.new_zeros(top, features.shape[1])
    pad_f[:len(labels)] = features
    pad_y = labels.new_full((top,), -1)
    pad_y[:len(labels)] = labels
    all_f = [torch.empty_like(pad_f) for _ in range(world)]
    all_y = [torch.empty_like(pad_y) for _ in range(world)]
    dist.all_gather(all_f, pad_f)
    dist.all_gather(all_y, pad_y)
    feats = torch.cat([f[:s] for f, s in zip(all_f, sizes)])        # (N, D)
    labs = torch.cat([y[:s] for y, s in zip(all_y, sizes)])         # (N,)
    return Bank(feats, labs)


def knn_predict(bank: Bank, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(Q, D) query features -> (Q,) predicted class (weighted vote of the k nearest)."""
    if len(bank) == 0:
        raise ValueError("the kNN memory bank is empty")
    k = min(k, len(bank))
    classes = int(bank.labels.max().item()) + 1
    queries = F.normalize(queries.float(), dim=-1)
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.features.T                 # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)                                 # (q, k)
        weight = (top_sim / temperature).exp()                                # (q, k)
        votes = sim.new_zeros(sim.shape[0], classes)                          # (q, C)
        votes.scatter_add_(1, bank.labels[top_idx], weight)
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=queries.device)


def knn_hits(bank: Bank, queries: torch.Tensor, labels: torch.Tensor, k: int = 20,
             temperature: float = 0.07) -> tuple[int, int]:
    """(correct, counted) of this rank's queries."""
    if queries.shape[0] == 0:
        return 0, 0
    predicted = knn_predict(bank, queries, k, temperature)
    return int((predicted == labels.to(predicted.device)).sum().item()), int(labels.shape[0])


def knn_top1(bank: Bank, queries: torch.Tensor, labels: torch.Tensor, world: int, k: int = 20,
             temperature: float = 0.07) -> float | None:
    """Top-1 over every rank's queries (collective); None when no rank has any."""
    correct, counted = knn_hits(bank, queries, labels, k, temperature)
    stats = torch.tensor([float(correct), float(counted)], dtype=torch.float64,
                         device=queries.device)   # NCCL reduces device tensors only
    if world > 1 and dist.is_initialized():
        dist.all_reduce(stats)
    correct, counted = stats.tolist()
    return correct / counted if counted else None
