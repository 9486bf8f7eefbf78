"""What ``HierarchicalMemory.retrieve`` returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RetrievedChunk(NamedTuple):
    """A retrieved chunk, backtracked to its document: tokens ``[token_start, token_end)`` of ``doc_id``."""

    doc_id: int
    token_start: int
    token_end: int
    score: float


class RetrievalResult:
    """The descent of a batch of B queries.

    Attributes:
        ids: per level, top to bottom, the selected node ids ``[B, t_level]`` int64 (``-1`` = none).
        scores: the matching scores ``[B, t_level]`` float32 (``-inf`` = none), best first.
        leaf_doc, leaf_span: each selected leaf's document ``[B, k]`` and token span ``[B, k, 2]``
            (``-1`` where no leaf was selected).
        level_seconds: with ``profile=True``, the wall time of each level's ``descend`` (top to bottom).
    """

    def __init__(self, ids, scores, leaf_doc, leaf_span, level_seconds=None):
        self.ids, self.scores = ids, scores
        self.leaf_doc, self.leaf_span = leaf_doc, leaf_span
        self.level_seconds = level_seconds
        self._chunks = None

    @property
    def levels(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(ids, scores), ...]`` per level, top to bottom (the shape ``descend_tree`` returns)."""
        return list(zip(self.ids, self.scores))

    @property
    def leaf_ids(self) -> torch.Tensor:
        """Ids of the selected leaves ``[B, k]``."""
        return self.ids[-1] if self.ids else self.leaf_doc

    @property
    def chunks(self) -> list[list[RetrievedChunk]]:
        """Per query, the selected leaves backtracked to ``RetrievedChunk``, best first (built on first use)."""
        if self._chunks is None:
            scores = self.scores[-1].tolist() if self.scores else [[] for _ in range(self.leaf_doc.shape[0])]
            self._chunks = [
                [RetrievedChunk(d, span[0], span[1], s) for d, span, s in zip(docs, spans, row) if d >= 0]
                for docs, spans, row in zip(self.leaf_doc.tolist(), self.leaf_span.tolist(), scores)
            ]
        return self._chunks

    def doc_ids(self, query: int = 0) -> list[int]:
        """Distinct documents of a query's chunks, best first."""
        return list(dict.fromkeys(chunk.doc_id for chunk in self.chunks[query]))

    def __repr__(self) -> str:
        return f"RetrievalResult(queries={self.leaf_doc.shape[0]}, levels={len(self.ids)}, k={self.leaf_doc.shape[1]})"
