"""score_children forward and backward kernels.

Forward: grid ``(B, min(cdiv(T * fanout, BS), 65535))``; a program scores tiles of BS child
slots of one row against all P probes of the row (D walked in chunks) and writes scores and
child ids.

Backward: grid ``(B,)``; a program walks the row's slots in tiles, recomputes the dots, the
probe weights (max: the arg-max probes, split evenly among exact ties, as torch.amax's backward;
lse: the softmax over probes) and ``G[p, s] = grad_scores[b, s] * weight[p, s]``. It then adds
``G @ keys[child]`` to the row's probe gradient (owned by the program: plain read-add-write) and
``G^T @ probes[b]`` to the children's key gradients with atomic adds (several rows, or duplicated
parents of one row, may share a child). With int8 keys (HAS_SCALES) the probe gradient adds
``G @ (scale * keys[child])`` and no key gradient is computed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import SUM, probe_scores


@triton.jit
def score_children_kernel(probes_ptr, keys_ptr, scales_ptr, parents_ptr, mask_ptr, scores_ptr, ids_ptr,
                          P, D, N, T, fanout,
                          HAS_MASK: tl.constexpr, HAS_SCALES: tl.constexpr, LSE: tl.constexpr, F64: tl.constexpr,
                          BS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    num_slots = T * fanout
    for tile in range(tl.program_id(1), tl.cdiv(num_slots, BS), tl.num_programs(1)):
        j = tl.arange(0, BS).to(tl.int64) + tile * BS
        in_range = j < num_slots
        slot_parent = j // fanout
        parent = tl.load(parents_ptr + b * T + slot_parent, mask=in_range, other=-1)
        child = parent * fanout + (j - slot_parent * fanout)
        valid = in_range & (parent >= 0) & (child < N)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + child, mask=valid, other=0) != 0)
        _, score = probe_scores(probes_ptr + b * P * D, P, D, keys_ptr, scales_ptr, child, valid, LSE, HAS_SCALES,
                                BS, BLOCK_P, BLOCK_D, ACC)
        out = b * num_slots + j
        tl.store(scores_ptr + out, tl.where(valid, score, float("-inf")), mask=in_range)
        tl.store(ids_ptr + out, tl.where(valid, child, -1), mask=in_range)


@triton.jit
def score_children_backward_kernel(grad_ptr, probes_ptr, keys_ptr, scales_ptr, ids_ptr, grad_probes_ptr,
                                   grad_keys_ptr, P, D, S,
                                   HAS_SCALES: tl.constexpr, LSE: tl.constexpr, F64: tl.constexpr,
                                   BS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_probes (``[B, P, D]``) and grad_keys (``[N, D]``; unused with HAS_SCALES) are
    zero-initialised ``ACC`` buffers."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    probe_row = probes_ptr + b * P * D
    grad_probe_row = grad_probes_ptr + b * P * D
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    for j0 in range(0, S, BS):
        j = j0 + tl.arange(0, BS)
        in_range = j < S
        child = tl.load(ids_ptr + b * S + j, mask=in_range, other=-1)
        valid = in_range & (child >= 0)
        g = tl.load(grad_ptr + b * S + j, mask=valid, other=0.0).to(ACC)
        g = tl.where(valid, g, 0.0)
        dots, score = probe_scores(probe_row, P, D, keys_ptr, scales_ptr, child, valid, LSE, HAS_SCALES,
                                   BS, BLOCK_P, BLOCK_D, ACC)
        if HAS_SCALES:
            row_scale = tl.load(scales_ptr + child, mask=valid, other=0.0).to(ACC)
        if LSE:
            weight = tl.exp(dots - score[None, :])
        else:
            hit = dots == score[None, :]
            count = tl.reduce(tl.where(pmask[:, None] & hit, 1.0, 0.0).to(ACC), 0, SUM)
            weight = tl.where(hit, 1.0 / tl.maximum(count, 1.0)[None, :], 0.0)
        G = tl.where(pmask[:, None] & valid[None, :], weight * g[None, :], 0.0).to(ACC)
        row = tl.where(valid, child, 0).to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            kmask = valid[:, None] & dmask[None, :]
            pm2 = pmask[:, None] & dmask[None, :]
            kr = tl.load(keys_ptr + row[:, None] + offs_d[None, :], mask=kmask, other=0.0).to(ACC)
            if HAS_SCALES:
                kr = kr * row_scale[:, None]
            gp_ptrs = grad_probe_row + offs_p[:, None] * D + offs_d[None, :]
            gp = tl.load(gp_ptrs, mask=pm2, other=0.0) + tl.reduce(G[:, :, None] * kr[None, :, :], 1, SUM)
            tl.store(gp_ptrs, gp, mask=pm2)
            if not HAS_SCALES:
                pr = tl.load(probe_row + offs_p[:, None] * D + offs_d[None, :], mask=pm2, other=0.0).to(ACC)
                gk = tl.reduce(G[:, :, None] * pr[:, None, :], 0, SUM)
                tl.atomic_add(grad_keys_ptr + row[:, None] + offs_d[None, :], gk, mask=kmask)
