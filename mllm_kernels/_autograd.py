"""Autograd for the differentiable ops, shared by the C++ and the Triton namespaces.

``cls_pool`` returns ``(pooled, lse)``; its backward recomputes the attention weights from the
saved log-sum-exp instead of storing them. ``score_children`` returns ``(scores, child_ids)``;
its backward recomputes the probe scores of each selected child. With int8 keys only the probes
get a gradient: int8 tensors cannot require one, and ``key_scales`` must not (checked when the
forward is recorded, so the error points at the call).
"""

from __future__ import annotations

import torch

from . import _validate


def register(namespace: str) -> None:
    """Register autograd formulas for ``namespace::cls_pool`` and ``namespace::score_children``."""
    ops = getattr(torch.ops, namespace)

    def cls_pool_setup(ctx, inputs, output):
        x, q, chunk_offsets, scale = inputs
        pooled, lse = output
        ctx.save_for_backward(x, q, chunk_offsets, pooled, lse)
        ctx.scale = scale

    def cls_pool_backward(ctx, grad_pooled, grad_lse):
        x, q, chunk_offsets, pooled, lse = ctx.saved_tensors
        if grad_pooled is None:
            grad_pooled = torch.zeros_like(pooled)
        grad_x, grad_q = ops.cls_pool_backward(
            grad_pooled, grad_lse, x, q, chunk_offsets, pooled, lse, ctx.scale
        )
        return grad_x, grad_q, None, None

    def score_children_setup(ctx, inputs, output):
        probes, keys, _parents, _fanout, reduce, _mask, key_scales = inputs
        _validate.check_scales_not_differentiable("score_children", key_scales)
        _scores, child_ids = output
        ctx.save_for_backward(probes, keys, child_ids, key_scales)
        ctx.reduce = reduce
        ctx.quantized = key_scales is not None

    def score_children_backward(ctx, grad_scores, _grad_child_ids):
        probes, keys, child_ids, key_scales = ctx.saved_tensors
        grad_probes, grad_keys = ops.score_children_backward(
            grad_scores, probes, keys, child_ids, ctx.reduce, key_scales
        )
        if ctx.quantized:
            grad_keys = None
        return grad_probes, grad_keys, None, None, None, None, None

    torch.library.register_autograd(
        f"{namespace}::cls_pool", cls_pool_backward, setup_context=cls_pool_setup
    )
    torch.library.register_autograd(
        f"{namespace}::score_children", score_children_backward, setup_context=score_children_setup
    )
