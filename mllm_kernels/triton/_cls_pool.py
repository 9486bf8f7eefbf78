"""cls_pool forward and backward kernels (flash-attention style, one query row per head).

Forward: grid ``(C, cdiv(H, BLOCK_H))``. A program streams the rows of its chunk in tiles of
BLOCK_N with an online softmax (running max, running sum, rescaled ``[BLOCK_H, BLOCK_D]``
accumulator, BLOCK_D >= D), so each row of x is read once per head block (once when all heads
fit one block). It writes the pooled rows and the log-sum-exp of the scaled logits.

Backward, two kernels:
1. grid ``(C,)``: per chunk, ``delta[h] = <grad_out[c, h], out[c, h]>``; per row tile,
   ``p = exp(scale * <q_h, x_i> - lse[c, h])``, ``ds = p * (<grad_out_h, x_i> - delta_h + grad_lse_h)``,
   ``grad_x_i = sum_h p * grad_out_h + scale * ds * q_h`` (rows are owned: plain stores) and ds
   stored to a ``[rows, H]`` scratch.
2. grid ``(cdiv(D, BLOCK_D), SPLIT)``: ``grad_q[h] = scale * sum_i ds[i, h] * x_i`` over a slice
   of the rows; SPLIT > 1 writes partial sums that the launcher adds up (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import MAX, SUM


@triton.jit
def cls_pool_fwd_kernel(x_ptr, q_ptr, offsets_ptr, out_ptr, lse_ptr, scale, scale_ptr, H, D,
                        F64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    scale_v = tl.load(scale_ptr) if F64 else scale
    start = tl.load(offsets_ptr + c)
    end = tl.load(offsets_ptr + c + 1)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + offs_h[:, None] * D + offs_d[None, :], mask=hmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    m = tl.full([BLOCK_H], float("-inf"), ACC)
    total = tl.zeros([BLOCK_H], ACC)
    acc = tl.zeros([BLOCK_H, BLOCK_D], ACC)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < end
        x = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        logits = tl.reduce(q[:, None, :] * x[None, :, :], 2, SUM) * scale_v
        logits = tl.where(rmask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(logits, 1, MAX))
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - shift)
        p = tl.exp(logits - shift[:, None])
        total = total * alpha + tl.reduce(p, 1, SUM)
        acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * x[None, :, :], 1, SUM)
        m = m_new
    nonempty = total > 0
    pooled = acc / tl.where(nonempty, total, 1.0)[:, None]
    out_rows = (c * H + offs_h).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], pooled.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + out_rows, lse, mask=hmask)


@triton.jit
def cls_pool_bwd_x_kernel(grad_out_ptr, grad_lse_ptr, x_ptr, q_ptr, offsets_ptr, out_ptr, lse_ptr,
                          grad_x_ptr, ds_ptr, scale, scale_ptr, H, D,
                          HAS_GRAD_LSE: tl.constexpr, F64: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """ds_ptr: ``[rows, H]`` scratch, row 0 = ``offsets[0]``."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    scale_v = tl.load(scale_ptr) if F64 else scale
    first = tl.load(offsets_ptr)
    start = tl.load(offsets_ptr + c)
    end = tl.load(offsets_ptr + c + 1)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    head_rows = (c * H + offs_h).to(tl.int64) * D
    delta = tl.zeros([BLOCK_H], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = hmask[:, None] & (offs_d < D)[None, :]
        go = tl.load(grad_out_ptr + head_rows[:, None] + offs_d[None, :], mask=m2, other=0.0).to(ACC)
        o = tl.load(out_ptr + head_rows[:, None] + offs_d[None, :], mask=m2, other=0.0).to(ACC)
        delta += tl.reduce(go * o, 1, SUM)
    lse = tl.load(lse_ptr + c * H + offs_h, mask=hmask, other=0.0).to(ACC)
    if HAS_GRAD_LSE:
        delta -= tl.load(grad_lse_ptr + c * H + offs_h, mask=hmask, other=0.0).to(ACC)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < end
        logits = tl.zeros([BLOCK_H, BLOCK_N], ACC)
        dp = tl.zeros([BLOCK_H, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            m2 = hmask[:, None] & dmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(ACC)
            q = tl.load(q_ptr + offs_h[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            go = tl.load(grad_out_ptr + head_rows[:, None] + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            logits += tl.reduce(q[:, None, :] * x[None, :, :], 2, SUM)
            dp += tl.reduce(go[:, None, :] * x[None, :, :], 2, SUM)
        valid = hmask[:, None] & rmask[None, :]
        p = tl.where(valid, tl.exp(logits * scale_v - lse[:, None]), 0.0)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        tl.store(ds_ptr + (rows - first)[None, :] * H + offs_h[:, None], ds, mask=valid)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            m2 = hmask[:, None] & dmask[None, :]
            q = tl.load(q_ptr + offs_h[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            go = tl.load(grad_out_ptr + head_rows[:, None] + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            gx = tl.reduce(p[:, :, None] * go[:, None, :] + (ds * scale_v)[:, :, None] * q[:, None, :], 0, SUM)
            tl.store(grad_x_ptr + rows[:, None] * D + offs_d[None, :], gx.to(grad_x_ptr.dtype.element_ty),
                     mask=rmask[:, None] & dmask[None, :])


@triton.jit
def cls_pool_bwd_q_kernel(ds_ptr, x_ptr, out_ptr, first, num_rows, rows_per_split, scale, scale_ptr, H, D,
                          F64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """``out[split, h, d] = scale * sum ds[i, h] * x[first + i, d]`` over the split's rows."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    scale_v = tl.load(scale_ptr) if F64 else scale
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    split = tl.program_id(1).to(tl.int64)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, num_rows)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    acc = tl.zeros([BLOCK_H, BLOCK_D], ACC)
    for r0 in range(lo, hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < hi
        ds = tl.load(ds_ptr + rows[None, :] * H + offs_h[:, None], mask=hmask[:, None] & rmask[None, :],
                     other=0.0).to(ACC)
        x = tl.load(x_ptr + (first + rows)[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(ACC)
        acc += tl.reduce(ds[:, :, None] * x[None, :, :], 1, SUM)
    out_rows = (split * H + offs_h).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], (acc * scale_v).to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])
