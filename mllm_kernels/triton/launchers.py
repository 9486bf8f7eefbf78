"""Launchers of the Triton kernels: one plain function per operator schema.

They are the CUDA kernels of ``mllm_kernels::*`` in builds without CUDA C++ kernels, and the
bodies of the ``mllm_kernels_triton::*`` custom ops (which run on CPU tensors under
``TRITON_INTERPRET=1``). Each validates its inputs (except the backward ops, called by autograd
with tensors the forward produced), makes them contiguous, allocates its outputs with
:func:`mllm_kernels._alloc.empty` and launches. Block sizes: larger tiles on CPU (the
interpreter pays per operation, not per element), register-friendly tiles on a GPU.
"""

from __future__ import annotations

import torch
import triton

from .. import _validate
from .._alloc import empty
from ..reference import compute_dtype
from ._chunk_offsets import chunk_offsets_kernel
from ._cls_pool import cls_pool_bwd_q_kernel, cls_pool_bwd_x_kernel, cls_pool_fwd_kernel
from ._common import log2, next_pow2
from ._descend import descend_kernel, descend_tree_kernel
from ._score import score_children_backward_kernel, score_children_kernel

__all__ = [
    "chunk_offsets",
    "cls_pool",
    "cls_pool_backward",
    "descend",
    "descend_tree",
    "score_children",
    "score_children_backward",
]


def _on_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _launch(kernel, grid, cpu: bool, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; under the interpreter, NumPy's floating-point warnings
    (``log(0)``, ``inf - inf`` in masked lanes) are silenced, as a GPU raises none."""
    if cpu:
        import numpy

        with numpy.errstate(all="ignore"):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _scale_args(scale: float, acc: torch.dtype, device):
    """(float scale, pointer to the scale in float64) -- float64 kernels read the exact value."""
    if acc == torch.float64:
        return float(scale), torch.tensor([scale], dtype=torch.float64, device=device)
    return float(scale), None


def _score_blocks(P: int, D: int, S: int, cpu: bool):
    """(BLOCK_P, BLOCK_S, BLOCK_D) for scoring tiles of child slots (S slots per row).

    The ``[BLOCK_P, BLOCK_S, BLOCK_D]`` product of a D chunk is bounded: 2**18 elements on CPU
    (one NumPy operation each), 4096 on a GPU (registers).
    """
    block_p = next_pow2(P)
    block_s = min(128 if cpu else 32, max(2, next_pow2(S)))
    budget = 2**18 if cpu else 4096
    block_d = max(1, min(next_pow2(D), budget // (block_p * block_s)))
    return block_p, block_s, block_d


# --------------------------------------------------------------------------- chunk_offsets


def chunk_offsets(seg_offsets: torch.Tensor, chunk_size: int):
    _validate.check_chunk_offsets(seg_offsets, chunk_size)
    seg = seg_offsets.contiguous()
    num_segments = seg.numel() - 1
    lengths = seg[1:] - seg[:-1]
    counts = lengths.div(chunk_size, rounding_mode="floor") + (lengths % chunk_size != 0)  # no overflow
    ends = torch.cumsum(counts, 0)
    C = int(ends[-1]) if num_segments else 0
    offsets = empty((C + 1,), torch.int64, seg.device)
    segment = empty((C,), torch.int64, seg.device)
    block = 256 if _on_cpu(seg) else 512
    grid = (max(1, triton.cdiv(C, block)),)
    _launch(chunk_offsets_kernel, grid, _on_cpu(seg), seg, ends if num_segments else seg, offsets, segment,
            num_segments, C, chunk_size, num_segments.bit_length() + 1, BLOCK=block)
    return offsets, segment


# --------------------------------------------------------------------------- cls_pool


def _cls_blocks(H: int, D: int, cpu: bool):
    block_d = next_pow2(D)
    block_h = min(next_pow2(H), 16)
    if cpu:
        return block_h, 32, block_d
    return block_h, max(1, min(16, 8192 // (block_h * block_d))), block_d


def cls_pool(x: torch.Tensor, q: torch.Tensor, chunk_offsets: torch.Tensor, scale: float):
    _validate.check_cls_pool(x, q, chunk_offsets, scale)
    x, q, offsets = x.contiguous(), q.contiguous(), chunk_offsets.contiguous()
    D, H, C = x.shape[1], q.shape[0], offsets.numel() - 1
    acc = compute_dtype(x, q)
    pooled = empty((C, H, D), x.dtype, x.device)
    lse = empty((C, H), acc, x.device)
    if C == 0 or H == 0:
        return pooled, lse
    cpu = _on_cpu(x)
    block_h, block_n, block_d = _cls_blocks(H, D, cpu)
    scale_f, scale_t = _scale_args(scale, acc, x.device)
    _launch(cls_pool_fwd_kernel, (C, triton.cdiv(H, block_h)), cpu,
            x, q, offsets, pooled, lse, scale_f, scale_t, H, D,
            F64=acc == torch.float64, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d)
    return pooled, lse


def cls_pool_backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, x: torch.Tensor,
                      q: torch.Tensor, chunk_offsets: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      scale: float):
    x, q, offsets = x.contiguous(), q.contiguous(), chunk_offsets.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    (N, D), H, C = x.shape, q.shape[0], offsets.numel() - 1
    acc = compute_dtype(x, q)
    cpu = _on_cpu(x)
    grad_x = empty((N, D), x.dtype, x.device)
    first, last = (int(offsets[0]), int(offsets[-1])) if C > 0 else (0, 0)
    grad_x[:first].zero_()
    grad_x[last:].zero_()
    num_rows = last - first
    if num_rows == 0 or H == 0 or D == 0:
        grad_x[first:last].zero_()
        return grad_x, torch.zeros_like(q)
    scale_f, scale_t = _scale_args(scale, acc, x.device)
    block_h = next_pow2(H)
    block_n = 32 if cpu else 16
    block_d = min(next_pow2(D), 512 if cpu else max(1, 4096 // (block_h * block_n)))
    ds = torch.empty((num_rows, H), dtype=acc, device=x.device)
    _launch(cls_pool_bwd_x_kernel, (C,), cpu,
            grad_out, grad_lse if grad_lse is not None else lse, x, q, offsets, out, lse, grad_x, ds,
            scale_f, scale_t, H, D, HAS_GRAD_LSE=grad_lse is not None, F64=acc == torch.float64,
            BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d)
    rows_per_split = num_rows if cpu else max(1024, triton.cdiv(num_rows, 64))
    splits = triton.cdiv(num_rows, rows_per_split)
    block_dq = min(next_pow2(D), 512 if cpu else 64)
    direct = splits == 1 and q.dtype == acc
    grad_q = empty((H, D), q.dtype, q.device) if direct else torch.empty((splits, H, D), dtype=acc, device=q.device)
    _launch(cls_pool_bwd_q_kernel, (triton.cdiv(D, block_dq), splits), cpu,
            ds, x, grad_q, first, num_rows, rows_per_split, scale_f, scale_t, H, D,
            F64=acc == torch.float64, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_dq)
    if not direct:
        grad_q = grad_q.sum(0).to(q.dtype)
    return grad_x, grad_q


# --------------------------------------------------------------------------- score_children


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """The bool mask as bytes (``uint8``), or any tensor (unread: HAS_MASK is False).

    Triton types a ``torch.bool`` pointer ``*i1`` while torch stores a byte per bool, and loads
    through ``*i1`` pointers have been miscompiled (pytorch/pytorch#176353); on an H200 the masked
    kernels gave wrong results when D was a multiple of 16. A ``*u8`` pointer reads the bytes as
    stored.
    """
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


def _scales_arg(key_scales: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """The per-row scales of int8 keys, or any tensor (unread: HAS_SCALES is False)."""
    return fallback if key_scales is None else key_scales.contiguous()


def score_children(probes: torch.Tensor, keys: torch.Tensor, parents: torch.Tensor, fanout: int,
                   reduce: str, mask: torch.Tensor | None, key_scales: torch.Tensor | None = None):
    _validate.check_children("score_children", probes, keys, parents, fanout, reduce, mask, key_scales)
    probes, keys, parents = probes.contiguous(), keys.contiguous(), parents.contiguous()
    (B, P, D), N, T = probes.shape, keys.shape[0], parents.shape[1]
    acc = compute_dtype(probes, keys)
    S = T * fanout
    scores = empty((B, S), acc, probes.device)
    ids = empty((B, S), torch.int64, probes.device)
    if B == 0 or S == 0:
        return scores, ids
    cpu = _on_cpu(probes)
    block_p, block_s, block_d = _score_blocks(P, D, S, cpu)
    _launch(score_children_kernel, (B, min(triton.cdiv(S, block_s), 65535)), cpu,
            probes, keys, _scales_arg(key_scales, probes), parents, _mask_arg(mask, parents), scores, ids,
            P, D, N, T, fanout,
            HAS_MASK=mask is not None, HAS_SCALES=key_scales is not None, LSE=reduce == "lse",
            F64=acc == torch.float64,
            BS=block_s, BLOCK_P=block_p, BLOCK_D=block_d)
    return scores, ids


def score_children_backward(grad_scores: torch.Tensor, probes: torch.Tensor, keys: torch.Tensor,
                            child_ids: torch.Tensor, reduce: str, key_scales: torch.Tensor | None = None):
    """(grad_probes, grad_keys); with int8 keys grad_keys is an empty ``[0, D]`` placeholder."""
    probes, keys = probes.contiguous(), keys.contiguous()
    grad_scores, child_ids = grad_scores.contiguous(), child_ids.contiguous()
    (B, P, D), N, S = probes.shape, keys.shape[0], child_ids.shape[1]
    acc = compute_dtype(probes, keys)
    quantized = key_scales is not None
    grad_probes = torch.zeros((B, P, D), dtype=acc, device=probes.device)
    grad_keys = torch.zeros((0 if quantized else N, D), dtype=acc, device=keys.device)
    if B > 0 and S > 0 and D > 0:
        cpu = _on_cpu(probes)
        block_p, block_s, block_d = _score_blocks(P, D, S, cpu)
        _launch(score_children_backward_kernel, (B,), cpu,
                grad_scores, probes, keys, _scales_arg(key_scales, probes), child_ids, grad_probes,
                grad_probes if quantized else grad_keys, P, D, S,
                HAS_SCALES=quantized, LSE=reduce == "lse", F64=acc == torch.float64,
                BS=block_s, BLOCK_P=block_p, BLOCK_D=block_d)
    return grad_probes.to(probes.dtype), grad_keys if quantized else grad_keys.to(keys.dtype)


# --------------------------------------------------------------------------- descend


#: Largest running top-R merged by ranks on a GPU (the rank merge costs O((R + BS)**2) compares,
#: the bitonic merge O(R log**2 R)); under the interpreter the rank merge is always used.
RANK_MERGE_MAX_R = 128


def _select_blocks(t: int, P: int, D: int, S: int, cpu: bool):
    """(R, LOGR, BS, RANK, BLOCK_P, BLOCK_D): a running top-R fed by tiles of BS slots.

    S is the number of candidate slots of a row; R >= min(t, S) (the kernel pads the rest).
    """
    block_p, block_s, block_d = _score_blocks(P, D, S, cpu)
    R = max(next_pow2(min(t, S)), 2)
    rank = cpu or R <= RANK_MERGE_MAX_R
    if not rank:
        R = max(R, block_s)  # the bitonic merge widens a tile to R
    return R, log2(R), block_s, rank, block_p, block_d


def descend(probes: torch.Tensor, keys: torch.Tensor, parents: torch.Tensor, fanout: int, t: int,
            reduce: str, mask: torch.Tensor | None, key_scales: torch.Tensor | None = None):
    _validate.check_descend(probes, keys, parents, fanout, t, reduce, mask, key_scales)
    probes, keys, parents = probes.contiguous(), keys.contiguous(), parents.contiguous()
    (B, P, D), N, T = probes.shape, keys.shape[0], parents.shape[1]
    acc = compute_dtype(probes, keys)
    ids = empty((B, t), torch.int64, probes.device)
    scores = empty((B, t), acc, probes.device)
    if B == 0:
        return ids, scores
    cpu = _on_cpu(probes)
    width = min(fanout, N)  # children r >= N of any parent are past the level
    R, logr, block_s, rank, block_p, block_d = _select_blocks(t, P, D, T * width, cpu)
    scratch = torch.empty((B, T), dtype=torch.int64, device=probes.device)
    _launch(descend_kernel, (B,), cpu,
            probes, keys, _scales_arg(key_scales, probes), parents, _mask_arg(mask, parents), scratch, ids, scores,
            P, D, N, T, fanout, width, t,
            HAS_MASK=mask is not None, HAS_SCALES=key_scales is not None, LSE=reduce == "lse",
            F64=acc == torch.float64,
            R=R, LOGR=logr, BS=block_s, RANK=rank, PB=64, BLOCK_P=block_p, BLOCK_D=block_d)
    return ids, scores


def descend_tree(probes: list, keys: list, fanout: int, t: list, reduce: str, masks: list,
                 key_scales: list | None = None):
    ts, masks, scales = _validate.check_descend_tree(probes, keys, fanout, t, reduce, masks, key_scales)
    probes = [p.contiguous() for p in probes]
    keys = [k.contiguous() for k in keys]
    masks = [None if m is None else m.contiguous() for m in masks]
    B, device, cpu = probes[0].shape[0], keys[0].device, _on_cpu(keys[0])
    outputs, ids, scores, blocks, f64, widths = [], [], [], [], [], []
    for level, (p, k, t_level) in enumerate(zip(probes, keys, ts)):
        acc = compute_dtype(p, k)
        f64.append(acc == torch.float64)
        ids.append(empty((B, t_level), torch.int64, device))
        scores.append(empty((B, t_level), acc, device))
        outputs += [ids[-1], scores[-1]]
        widths.append(min(fanout, k.shape[0]))
        num_slots = k.shape[0] if level == 0 else ts[level - 1] * widths[-1]
        blocks.append(_select_blocks(t_level, p.shape[1], p.shape[2], num_slots, cpu))
    if B == 0:
        return outputs
    _launch(descend_tree_kernel, (B,), cpu,
            tuple(probes), tuple(keys), tuple(_scales_arg(s, p) for s, p in zip(scales, probes)),
            tuple(_mask_arg(m, k) for m, k in zip(masks, keys)),
            tuple(ids), tuple(scores),
            tuple(p.shape[1] for p in probes), tuple(p.shape[2] for p in probes),
            tuple(k.shape[0] for k in keys), tuple(widths), tuple(ts), fanout,
            L=len(keys), HAS_MASK=tuple(m is not None for m in masks),
            HAS_SCALES=tuple(s is not None for s in scales), F64=tuple(f64), LSE=reduce == "lse",
            R=tuple(b[0] for b in blocks), LOGR=tuple(b[1] for b in blocks), BS=tuple(b[2] for b in blocks),
            RANK=tuple(b[3] for b in blocks), BLOCK_P=tuple(b[4] for b in blocks), BLOCK_D=tuple(b[5] for b in blocks))
    return outputs
