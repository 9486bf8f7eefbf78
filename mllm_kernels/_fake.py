"""Fake (meta) kernels: output shapes and dtypes of every op, for ``torch.compile`` and opcheck.

The same functions serve the C++ ops (``mllm_kernels::*``) and the Triton custom ops
(``mllm_kernels_triton::*``), whose schemas are identical.
"""

from __future__ import annotations

import torch

from .reference import compute_dtype


def chunk_offsets(seg_offsets, chunk_size):
    num_chunks = torch.library.get_ctx().new_dynamic_size()
    return seg_offsets.new_empty(num_chunks + 1), seg_offsets.new_empty(num_chunks)


def cls_pool(x, q, chunk_offsets, scale):
    num_chunks, heads = chunk_offsets.shape[0] - 1, q.shape[0]
    pooled = x.new_empty(num_chunks, heads, x.shape[1])
    lse = x.new_empty(num_chunks, heads, dtype=compute_dtype(x, q))
    return pooled, lse


def cls_pool_backward(grad_out, grad_lse, x, q, chunk_offsets, out, lse, scale):
    return torch.empty_like(x), torch.empty_like(q)


def score_children(probes, keys, parents, fanout, reduce, mask, key_scales=None):
    shape = (parents.shape[0], parents.shape[1] * fanout)
    scores = probes.new_empty(shape, dtype=compute_dtype(probes, keys))
    return scores, parents.new_empty(shape)


def score_children_backward(grad_scores, probes, keys, child_ids, reduce, key_scales=None):
    if keys.dtype == torch.int8:  # int8 keys get no gradient: an empty [0, D] placeholder
        return torch.empty_like(probes), keys.new_empty((0, keys.shape[1]), dtype=compute_dtype(probes, keys))
    return torch.empty_like(probes), torch.empty_like(keys)


def descend(probes, keys, parents, fanout, t, reduce, mask, key_scales=None):
    shape = (probes.shape[0], t)
    return parents.new_empty(shape), probes.new_empty(shape, dtype=compute_dtype(probes, keys))


def descend_tree(probes, keys, fanout, t, reduce, masks, key_scales=None):
    out = []
    for level_probes, level_keys, level_t in zip(probes, keys, t):
        shape = (level_probes.shape[0], level_t)
        out.append(level_probes.new_empty(shape, dtype=torch.int64))
        out.append(level_probes.new_empty(shape, dtype=compute_dtype(level_probes, level_keys)))
    return out


FAKE_KERNELS = {
    "chunk_offsets": chunk_offsets,
    "cls_pool": cls_pool,
    "cls_pool_backward": cls_pool_backward,
    "score_children": score_children,
    "score_children_backward": score_children_backward,
    "descend": descend,
    "descend_tree": descend_tree,
}
"""Every operator of a namespace (``mllm_kernels`` or ``mllm_kernels_triton``) and its fake."""


def register(namespace: str) -> None:
    """Register the fake kernels for every op of ``namespace``."""
    for name, fn in FAKE_KERNELS.items():
        torch.library.register_fake(f"{namespace}::{name}", fn)
