"""Plain-PyTorch reference implementations of every op.

These are the oracle of the tests and the eager baseline of the benchmarks: readable, built
from ordinary tensor ops (gather + matmul + topk), differentiable through PyTorch autograd.
They assume valid inputs; the public wrappers in :mod:`mllm_kernels.ops` validate first.

Conventions shared by every implementation (see SPEC section 4):

* index tensors are int64, ``-1`` marks an empty slot;
* scores are float32 (float64 when an input is float64), accumulated in that precision;
* the children of node ``i`` are nodes ``[i * fanout, min((i + 1) * fanout, N))``;
* top-t order: score descending, equal scores by smaller node id; NaN scores and invalid
  slots are never selected; missing results are ``-1`` / ``-inf``;
* int8 keys come with ``key_scales`` (float32, one per row) and stand for
  ``key_scales[n] * keys[n]``: they are dequantised and scored like float keys.
"""

from __future__ import annotations

import torch

__all__ = [
    "chunk_offsets",
    "cls_pool",
    "compute_dtype",
    "dequantize_keys",
    "descend",
    "descend_tree",
    "score_children",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation and score dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dequantize_keys(keys: torch.Tensor, key_scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The values int8 ``keys [..., D]`` with per-row ``key_scales [...]`` stand for, in ``dtype``:
    ``key_scales[..., None] * keys``."""
    return keys.to(dtype) * key_scales.to(dtype).unsqueeze(-1)


def chunk_offsets(seg_offsets: torch.Tensor, chunk_size: int):
    """Split segments into chunks of ``chunk_size`` rows.

    Args:
        seg_offsets: int64 ``[S + 1]``, non-decreasing row offsets of S segments.
        chunk_size: rows per chunk (>= 1); a segment's last chunk may be shorter.

    Returns:
        ``(chunk_offsets int64 [C + 1], chunk_segment int64 [C])``. Empty segments give no chunk.
    """
    lengths = seg_offsets[1:] - seg_offsets[:-1]
    # (length - 1) // chunk_size + 1 rather than (length + chunk_size - 1) // chunk_size: no overflow
    n_chunks = torch.where(lengths > 0, (lengths - 1) // chunk_size + 1, 0)
    num_segments = lengths.numel()
    chunk_segment = torch.repeat_interleave(
        torch.arange(num_segments, device=seg_offsets.device), n_chunks
    )
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    rank_in_segment = torch.arange(chunk_segment.numel(), device=seg_offsets.device) - first_chunk[chunk_segment]
    starts = seg_offsets[chunk_segment] + rank_in_segment * chunk_size
    return torch.cat([starts, seg_offsets[-1:]]), chunk_segment


def _row_chunk_ids(chunk_offsets_: torch.Tensor):
    """Rows covered by the chunks and the chunk id of each row."""
    lengths = chunk_offsets_[1:] - chunk_offsets_[:-1]
    chunk_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    rows = torch.arange(int(chunk_offsets_[0]), int(chunk_offsets_[-1]), device=lengths.device)
    return rows, chunk_of_row


def cls_pool(x: torch.Tensor, q: torch.Tensor, chunk_offsets_: torch.Tensor, scale: float | None = None):
    """Per-chunk, per-head softmax attention pooling of the rows of ``x``.

    ``pooled[c, h] = sum_i softmax_i(scale * <q[h], x[i]>) * x[i]`` over the rows of chunk c.

    Args:
        x: ``[N, D]`` float rows (tokens).
        q: ``[H, D]`` float per-head CLS queries.
        chunk_offsets_: int64 ``[C + 1]`` non-decreasing row offsets.
        scale: logit scale, ``1 / sqrt(D)`` when None.

    Returns:
        ``[C, H, D]`` in ``x.dtype``; an empty chunk gives zeros.
    """
    D = x.shape[1]
    H = q.shape[0]
    C = chunk_offsets_.numel() - 1
    scale = D**-0.5 if scale is None else scale
    acc = compute_dtype(x, q)
    rows, chunk_of_row = _row_chunk_ids(chunk_offsets_)
    xr = x[rows].to(acc)  # [R, D]
    logits = scale * (xr @ q.to(acc).T)  # [R, H]
    # The softmax is shift invariant, so the per-chunk max needs no gradient.
    with torch.no_grad():
        chunk_max = torch.full((C, H), -torch.inf, dtype=acc, device=x.device)
        chunk_max.scatter_reduce_(0, chunk_of_row[:, None].expand(-1, H), logits, "amax")
    weights = torch.exp(logits - chunk_max[chunk_of_row])  # [R, H]
    denom = torch.zeros((C, H), dtype=acc, device=x.device).index_add(0, chunk_of_row, weights)
    weighted = torch.zeros((C, H, D), dtype=acc, device=x.device).index_add(
        0, chunk_of_row, weights[:, :, None] * xr[:, None, :]
    )
    pooled = weighted / denom.clamp_min(torch.finfo(acc).tiny)[:, :, None]
    return pooled.to(x.dtype)


def _child_slots(keys, parents, fanout, mask):
    """Child ids ``[B, T * fanout]`` of every parent slot and whether each slot is a candidate."""
    N = keys.shape[0]
    slot = torch.arange(parents.shape[1] * fanout, device=parents.device)
    parent_of_slot = parents[:, slot // fanout]
    child = parent_of_slot * fanout + slot % fanout
    valid = (parent_of_slot >= 0) & (child < N)
    if mask is not None:
        valid &= mask[child.clamp(0, max(N - 1, 0))] if N > 0 else valid
    return child, valid


def _reduce_probes(dots: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "max":
        return dots.amax(-1)
    return torch.logsumexp(dots, -1)


def score_children(probes, keys, parents, fanout, reduce="max", mask=None, key_scales=None):
    """Score every child slot of ``parents`` against the probes.

    Args:
        probes: ``[B, P, D]`` float.
        keys: ``[N, D]`` float, or int8 with ``key_scales``.
        parents: int64 ``[B, T]`` parent-level node ids, ``-1`` = empty slot.
        fanout: children per parent.
        reduce: ``"max"`` or ``"lse"`` (logsumexp) over the P probe scores.
        mask: optional bool ``[N]``, False = not a candidate.
        key_scales: float32 ``[N]`` with int8 keys (the score uses ``key_scales[n] * keys[n]``),
            else None.

    Returns:
        ``(scores [B, T * fanout] float32, child_ids [B, T * fanout] int64)``; invalid slots
        are ``-inf`` / ``-1``.
    """
    acc = compute_dtype(probes, keys)
    child, valid = _child_slots(keys, parents, fanout, mask)
    row = torch.where(valid, child, 0)
    if keys.shape[0] > 0:
        gathered = keys[row]
    else:
        gathered = keys.new_zeros(child.shape + keys.shape[1:])
    if key_scales is not None:
        row_scales = key_scales[row] if keys.shape[0] > 0 else key_scales.new_zeros(child.shape)
        gathered = dequantize_keys(gathered, row_scales, acc)
    dots = torch.einsum("bpd,bsd->bsp", probes.to(acc), gathered.to(acc))
    scores = _reduce_probes(dots, reduce)
    scores = torch.where(valid, scores, torch.full_like(scores, -torch.inf))
    return scores, torch.where(valid, child, torch.full_like(child, -1))


def _select_top(scores: torch.Tensor, ids: torch.Tensor, t: int):
    """Top t of each row: score descending, ties by smaller id; ``ids == -1`` and NaN never win."""
    valid = (ids >= 0) & ~torch.isnan(scores)
    big = torch.iinfo(torch.int64).max
    order_ids = torch.where(valid, ids, torch.full_like(ids, big))
    order_scores = torch.where(valid, scores, torch.full_like(scores, -torch.inf))
    # Two stable sorts give the lexicographic order (valid first, score desc, id asc).
    by_id = torch.argsort(order_ids, dim=1, stable=True)
    by_score = torch.argsort(torch.gather(order_scores, 1, by_id), dim=1, descending=True, stable=True)
    order = torch.gather(by_id, 1, by_score)[:, :t]
    top_ids = torch.gather(order_ids, 1, order)
    top_scores = torch.gather(order_scores, 1, order)
    keep = top_ids != big
    top_ids = torch.where(keep, top_ids, torch.full_like(top_ids, -1))
    top_scores = torch.where(keep, top_scores, torch.full_like(top_scores, -torch.inf))
    pad = t - top_ids.shape[1]
    if pad > 0:
        top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
        top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=-torch.inf)
    return top_ids, top_scores


def _drop_duplicate_parents(parents: torch.Tensor) -> torch.Tensor:
    """Replace every parent that already appeared earlier in its row by ``-1``."""
    T = parents.shape[1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=parents.device).tril(-1)
    same = parents[:, :, None] == parents[:, None, :]
    duplicate = (same & earlier).any(-1)
    return torch.where(duplicate, torch.full_like(parents, -1), parents)


def descend(probes, keys, parents, fanout, t, reduce="max", mask=None, key_scales=None):
    """One level of the descent: the top ``t`` children of ``parents``.

    Same arguments as :func:`score_children` plus ``t`` (>= 1).

    Returns:
        ``(ids [B, t] int64, scores [B, t] float32)``, sorted by score descending, ties by
        smaller id; a child under a duplicated parent counts once; padded with ``-1`` / ``-inf``.
    """
    scores, child = score_children(probes, keys, _drop_duplicate_parents(parents), fanout, reduce, mask, key_scales)
    return _select_top(scores, child, t)


def descend_tree(probes, keys, fanout, t, reduce="max", masks=None, key_scales=None):
    """The whole descent, top level to leaves.

    Args:
        probes: list over levels (top to bottom) of ``[B, P_k, D_k]``.
        keys: list over levels of ``[N_k, D_k]``, with ``N_{k-1} == ceil(N_k / fanout)``.
        fanout: children per parent.
        t: int or one int per level.
        reduce: ``"max"`` or ``"lse"``.
        masks: None or a list of optional bool ``[N_k]`` masks.
        key_scales: None or a list of optional float32 ``[N_k]`` scales (for the int8 levels).

    Returns:
        list over levels of ``(ids [B, t_k], scores [B, t_k])``. Every node of the top level is a
        candidate; each lower level's candidates are the children of the level above's selection.
    """
    levels = len(keys)
    ts = [t] * levels if isinstance(t, int) else list(t)
    masks = [None] * levels if masks is None else list(masks)
    scales = [None] * levels if key_scales is None else list(key_scales)
    B = probes[0].shape[0]
    if B == 0:  # no query: empty [0, t_k] outputs, whatever the slot counts would be
        return [
            (torch.empty(0, ts[level], dtype=torch.int64, device=keys[level].device),
             torch.empty(0, ts[level], dtype=compute_dtype(probes[level], keys[level]), device=keys[level].device))
            for level in range(levels)
        ]
    results = []
    for level in range(levels):
        if level == 0:
            # The top level is the children of one virtual root that owns every node.
            n_top = keys[0].shape[0]
            root = torch.zeros(B, 1, dtype=torch.int64, device=keys[0].device)
            scores, child = score_children(probes[0], keys[0], root, max(n_top, 1), reduce, masks[0], scales[0])
        else:
            scores, child = score_children(
                probes[level], keys[level], results[-1][0], fanout, reduce, masks[level], scales[level]
            )
        results.append(_select_top(scores, child, ts[level]))
    return results
