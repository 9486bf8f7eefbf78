"""descend and descend_tree: scoring and top-t selection fused in one launch.

One program per query row b. The row's candidate slots are walked in tiles of BS; each tile is
scored against the row's probes (:func:`probe_scores`), turned into
(order key, node id) pairs, and merged into a running top-R held in registers
(:func:`push_top`: a rank merge for R <= 128 and always under the interpreter, else a bitonic
merge). Scores are never written to memory; only the final t pairs are. A tile whose best pair
cannot enter the running top-R is skipped.

``descend`` first writes the row's parents with duplicates replaced by -1 into a scratch row
(a child under a duplicated parent counts once), then selects from that scratch row.
``descend_tree`` loops over the levels inside the program: level 0 takes every node as a
candidate, level l > 0 reads back the ids level l - 1 just stored (after a barrier). Per-level
pointers, sizes and block shapes are passed as tuples, so the kernel is specialised on the
number of levels and each level keeps its own dtype (int8 levels with their scales: HAS_SCALES).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import I64_MAX, I64_MIN, MAX, key_score, probe_scores, push_top


@triton.jit
def _select_row(probe_row, P, D, keys_ptr, scales_ptr, N, mask_ptr, parent_row, T, fanout, width, t,
                out_ids_row, out_scores_row,
                TOP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALES: tl.constexpr, LSE: tl.constexpr,
                F64: tl.constexpr,
                R: tl.constexpr, LOGR: tl.constexpr, BS: tl.constexpr, RANK: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Top t children of one row, written to ``out_ids_row[:t]`` / ``out_scores_row[:t]``.

    TOP: the candidates are all N nodes (slot j is node j). Else slot j is child
    ``parent * fanout + j % width`` of ``parent = parent_row[j // width]`` for the T parents,
    where ``width = min(fanout, N)``: child ``r >= N`` of any parent is past the level, so a
    huge fanout costs nothing. R >= min(t, number of slots); outputs past R are padding.
    """
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    run_k = tl.full([R], I64_MIN, tl.int64)
    run_v = tl.full([R], I64_MAX, tl.int64)
    if TOP:
        num_slots = N
    else:
        num_slots = T * width
    for j0 in range(0, num_slots, BS):
        j = j0 + tl.arange(0, BS).to(tl.int64)
        in_range = j < num_slots
        if TOP:
            child = j
            valid = in_range
        else:
            slot_parent = j // width
            parent = tl.load(parent_row + slot_parent, mask=in_range, other=-1)
            child = parent * fanout + (j - slot_parent * width)
            valid = in_range & (parent >= 0) & (child < N)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + child, mask=valid, other=0) != 0)
        _, score = probe_scores(probe_row, P, D, keys_ptr, scales_ptr, child, valid, LSE, HAS_SCALES,
                                BS, BLOCK_P, BLOCK_D, ACC)
        run_k, run_v = push_top(run_k, run_v, score, child, valid, F64, R, LOGR, BS, RANK)
    offs = tl.arange(0, R)
    found = run_k > I64_MIN
    tl.store(out_ids_row + offs, tl.where(found, run_v, -1), mask=offs < t)
    score = tl.where(found, key_score(run_k, F64), float("-inf")).to(out_scores_row.dtype.element_ty)
    tl.store(out_scores_row + offs, score, mask=offs < t)
    for o0 in range(R, t, R):  # t > number of slots: the rest is padding
        o = o0 + offs
        tl.store(out_ids_row + o, tl.full([R], -1, tl.int64), mask=o < t)
        tl.store(out_scores_row + o, tl.full([R], float("-inf"), out_scores_row.dtype.element_ty), mask=o < t)


@triton.jit
def _dedup_parents(parent_row, scratch_row, T, PB: tl.constexpr):
    """``scratch_row[i] = parent_row[i]``, or -1 when an earlier parent of the row is equal."""
    for i0 in range(0, T, PB):
        pi = i0 + tl.arange(0, PB)
        pm = pi < T
        pa = tl.load(parent_row + pi, mask=pm, other=-1)
        dup = tl.zeros([PB], tl.int32)
        for k0 in range(0, i0 + PB, PB):
            pk = k0 + tl.arange(0, PB)
            pb = tl.load(parent_row + pk, mask=pk < T, other=-2)
            same = (pa[:, None] == pb[None, :]) & (pk[None, :] < pi[:, None])
            dup = tl.maximum(dup, tl.reduce(same.to(tl.int32), 1, MAX))
        tl.store(scratch_row + pi, tl.where(dup > 0, -1, pa), mask=pm)


@triton.jit
def descend_kernel(probes_ptr, keys_ptr, scales_ptr, parents_ptr, mask_ptr, scratch_ptr, ids_ptr, scores_ptr,
                   P, D, N, T, fanout, width, t,
                   HAS_MASK: tl.constexpr, HAS_SCALES: tl.constexpr, LSE: tl.constexpr, F64: tl.constexpr,
                   R: tl.constexpr, LOGR: tl.constexpr, BS: tl.constexpr, RANK: tl.constexpr, PB: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    scratch_row = scratch_ptr + b * T
    _dedup_parents(parents_ptr + b * T, scratch_row, T, PB)
    tl.debug_barrier()
    _select_row(probes_ptr + b * P * D, P, D, keys_ptr, scales_ptr, N, mask_ptr, scratch_row, T, fanout, width, t,
                ids_ptr + b * t, scores_ptr + b * t,
                False, HAS_MASK, HAS_SCALES, LSE, F64, R, LOGR, BS, RANK, BLOCK_P, BLOCK_D)


@triton.jit
def descend_tree_kernel(probes, keys, scales, masks, ids, scores, Ps, Ds, Ns, widths, ts, fanout,
                        L: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALES: tl.constexpr, F64: tl.constexpr,
                        LSE: tl.constexpr,
                        R: tl.constexpr, LOGR: tl.constexpr, BS: tl.constexpr, RANK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every argument but fanout, L and LSE is a tuple with one entry per level."""
    b = tl.program_id(0).to(tl.int64)
    for level in tl.static_range(L):
        P = Ps[level]
        D = Ds[level]
        t = ts[level]
        if level == 0:
            parent_row = ids[0]  # unused: the top level takes every node
            T = 0
        else:
            tl.debug_barrier()  # level - 1's ids were just stored by this program
            parent_row = ids[level - 1] + b * ts[level - 1]
            T = ts[level - 1]
        _select_row(probes[level] + b * P * D, P, D, keys[level], scales[level], Ns[level], masks[level],
                    parent_row, T, fanout, widths[level], t, ids[level] + b * t, scores[level] + b * t,
                    level == 0, HAS_MASK[level], HAS_SCALES[level], LSE, F64[level], R[level], LOGR[level], BS[level],
                    RANK[level], BLOCK_P[level], BLOCK_D[level])
