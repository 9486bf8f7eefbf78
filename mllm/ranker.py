"""DecoderRanker: the query chunk -> probe vectors for each tree level, and the level keys."""

from __future__ import annotations

import torch
from torch import nn

import mllm_kernels as mk


def _identity_linear(d_in: int, d_out: int) -> nn.Linear:
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d_in).repeat(d_out // d_in, 1))
        linear.bias.zero_()
    return linear


class DecoderRanker(nn.Module):
    """Per-level query and key projections; scores through the fused ops.

    Levels are addressed by **height**: 1 is the leaves (chunk embeddings), 2 their parents, ...
    (heights stay fixed while the memory grows at the top). For a query chunk embedding ``q``,
    the probes at height h are ``query_proj[h](q)`` split into ``probes_per_chunk`` vectors, and
    a node's key is ``key_proj[h](embedding)``, computed once at index time. Both start as the
    identity, so an untrained ranker scores by the dot product (the cosine, for normalised
    embeddings).
    """

    def __init__(self, d_model: int, max_levels: int, probes_per_chunk: int = 1):
        super().__init__()
        self.d_model, self.probes_per_chunk = d_model, probes_per_chunk
        self.query_proj = nn.ModuleList(
            _identity_linear(d_model, probes_per_chunk * d_model) for _ in range(max_levels)
        )
        self.key_proj = nn.ModuleList(_identity_linear(d_model, d_model) for _ in range(max_levels))

    def _check_height(self, height: int) -> None:
        if not 1 <= height <= len(self.key_proj):
            raise ValueError(f"DecoderRanker: height must be in [1, {len(self.key_proj)}], got {height}")

    def probes(self, query: torch.Tensor, height: int) -> torch.Tensor:
        """``query [B, P, D]`` (the query's chunk embeddings) -> probes ``[B, P * probes_per_chunk, D]`` float32."""
        return self.probes_for(query, [height])[0]

    def probes_for(self, query: torch.Tensor, heights: list[int]) -> list[torch.Tensor]:
        """``probes(query, h)`` for each height in ``heights`` (one identity check for all of them)."""
        for height in heights:
            self._check_height(height)
        query = query.float()
        batch, chunks, _ = query.shape
        identity = self._identity_heights() if not torch.is_grad_enabled() else None
        return [
            query
            if identity is not None and identity[h - 1]  # untrained: skip reading D x D weights
            else self.query_proj[h - 1](query).view(batch, chunks * self.probes_per_chunk, self.d_model)
            for h in heights
        ]

    def _identity_heights(self) -> tuple[bool, ...]:
        """Which query projections are still the identity; recomputed only when a weight changes.

        The tensors' version counters move with every in-place update (optimizer steps,
        ``load_state_dict``), and the data pointers with every replacement.
        """
        params = [p for proj in self.query_proj for p in (proj.weight, proj.bias)]
        version = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
        cached = self.__dict__.get("_identity_cache")
        if cached is None or cached[0] != version:
            eye = torch.eye(self.d_model, device=params[0].device, dtype=params[0].dtype)
            flags = tuple(
                self.probes_per_chunk == 1 and torch.equal(proj.weight, eye) and not bool(proj.bias.any())
                for proj in self.query_proj
            )
            self.__dict__["_identity_cache"] = cached = (version, flags)
        return cached[1]

    def keys(self, embeddings: torch.Tensor, height: int) -> torch.Tensor:
        """Level embeddings ``[N, D]`` -> keys ``[N, D]`` float32 (the memory stores them in its key dtype)."""
        self._check_height(height)
        return self.key_proj[height - 1](embeddings.float())

    def score(
        self,
        query: torch.Tensor,
        embeddings: torch.Tensor,
        height: int,
        parents: torch.Tensor,
        fanout: int,
        reduce: str = "max",
        mask: torch.Tensor | None = None,
    ):
        """Differentiable scores of the children of ``parents`` (training path, ``score_children``).

        Returns ``(scores [B, T * fanout] float32, child_ids [B, T * fanout] int64)``; gradients
        reach the query projection, the key projection and the embeddings.
        """
        return mk.score_children(
            self.probes(query, height), self.keys(embeddings, height), parents, fanout, reduce=reduce, mask=mask
        )
