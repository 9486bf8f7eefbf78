"""Quality and latency of tree retrieval against exact flat search over the leaves."""

from __future__ import annotations

import dataclasses
import time

import torch

from .memory import HierarchicalMemory


class FlatIndex:
    """Exact search over the visible leaves of a memory, by the ranker's leaf-level score.

    Keys are computed once in float32 from the leaf embeddings (the tree stores them in the key
    dtype), so this is the exact answer the descent approximates.
    """

    def __init__(self, memory: HierarchicalMemory):
        self.memory = memory
        self.keys = memory.ranker.keys(memory.tree.emb[0], 1)
        masks = memory.visible_masks()
        self.visible = memory.tree.live[0] if masks is None else masks[-1]

    def scores_of(self, query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact scores ``[B, k]`` of the leaves ``ids [B, k]`` (``-inf`` where ``ids`` is ``-1``)."""
        probes = self.memory.ranker.probes(query, 1)
        scores = torch.einsum("bpd,bkd->bpk", probes, self.keys[ids.clamp(min=0)]).amax(1)
        return scores.masked_fill(ids < 0, float("-inf"))

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [B, P, D]`` -> the ``k`` best leaves ``(ids [B, k], scores [B, k])`` by ``max`` over probes."""
        probes = self.memory.ranker.probes(query, 1)
        scores = torch.einsum("bpd,nd->bpn", probes, self.keys).amax(1)
        scores = scores.masked_fill(~self.visible, float("-inf"))
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return top.indices, top.values


def recall_at_k(found_scores: torch.Tensor, exact_scores: torch.Tensor, tolerance: float = 1e-6) -> float:
    """Tie-aware recall@k: the share of the exact top-k matched by what was found.

    ``found_scores [B, k]``: the exact (float32) scores of the leaves the descent returned
    (``-inf`` for none); ``exact_scores [B, k]``: flat search's top-k scores. A found leaf counts
    when it scores at least the exact k-th best: among equal scores any choice is right, which
    plain id matching would count as misses.
    """
    finite = torch.isfinite(exact_scores)
    kth = exact_scores.masked_fill(~finite, float("inf")).amin(1, keepdim=True)  # fewer than k visible: the last
    valid = finite.sum(1).clamp(min=1)
    hits = (torch.isfinite(found_scores) & (found_scores >= kth - tolerance)).sum(1)
    return (hits.clamp(max=valid).float() / valid).mean().item()


def seconds_per_query(fn, queries: torch.Tensor, rounds: int = 3) -> float:
    """Median over ``rounds`` of the mean wall time of ``fn(query[i:i+1])`` over all queries (batch 1)."""
    fn(queries[:1])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(queries.shape[0]):
            fn(queries[i : i + 1])
        times.append((time.perf_counter() - start) / queries.shape[0])
    return sorted(times)[len(times) // 2]


@dataclasses.dataclass
class RecallRow:
    layout: str
    t: int
    recall: float
    us_per_query: float


@torch.no_grad()
def evaluate(
    memory: HierarchicalMemory, query: torch.Tensor, beams: list[int], k: int = 10, rounds: int = 3
) -> tuple[list[RecallRow], float]:
    """Recall@k and batch-1 latency of the descent at each beam ``t`` (``k`` leaves returned), and flat search's latency.

    ``query [B, P, D]``: encoded query chunks. Returns ``(rows, flat_us_per_query)``.
    """
    flat = FlatIndex(memory)
    _, exact_scores = flat.search(query, k)
    rows = []
    for t in beams:
        found = memory.retrieve(query, t=t, k=k).leaf_ids
        seconds = seconds_per_query(lambda q, t=t: memory.retrieve(q, t=t, k=k), query, rounds)
        recall = recall_at_k(flat.scores_of(query, found), exact_scores)
        rows.append(RecallRow(memory.config.layout, t, recall, seconds * 1e6))
    flat_seconds = seconds_per_query(lambda q: flat.search(q, k), query, rounds)
    return rows, flat_seconds * 1e6
