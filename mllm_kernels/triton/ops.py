"""The Triton launchers as opaque custom ops ``torch.ops.mllm_kernels_triton.*``.

Same schemas as ``mllm_kernels::*``; fake kernels and autograd are the shared ones of
:mod:`mllm_kernels._fake` and :mod:`mllm_kernels._autograd`. Opaque ``custom_op`` rather than
``triton_op``: under ``TRITON_INTERPRET=1`` only the opaque op passes opcheck and torch.compile.
"""

from __future__ import annotations

import torch

from .. import _autograd, _fake
from . import launchers

NAMESPACE = "mllm_kernels_triton"


@torch.library.custom_op(f"{NAMESPACE}::chunk_offsets", mutates_args=())
def chunk_offsets(seg_offsets: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.chunk_offsets(seg_offsets, chunk_size)


@torch.library.custom_op(f"{NAMESPACE}::cls_pool", mutates_args=())
def cls_pool(x: torch.Tensor, q: torch.Tensor, chunk_offsets: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.cls_pool(x, q, chunk_offsets, scale)


@torch.library.custom_op(f"{NAMESPACE}::cls_pool_backward", mutates_args=())
def cls_pool_backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, x: torch.Tensor,
                      q: torch.Tensor, chunk_offsets: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.cls_pool_backward(grad_out, grad_lse, x, q, chunk_offsets, out, lse, scale)


@torch.library.custom_op(f"{NAMESPACE}::score_children", mutates_args=())
def score_children(probes: torch.Tensor, keys: torch.Tensor, parents: torch.Tensor, fanout: int,
                   reduce: str, mask: torch.Tensor | None,
                   key_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.score_children(probes, keys, parents, fanout, reduce, mask, key_scales)


@torch.library.custom_op(f"{NAMESPACE}::score_children_backward", mutates_args=())
def score_children_backward(grad_scores: torch.Tensor, probes: torch.Tensor, keys: torch.Tensor,
                            child_ids: torch.Tensor, reduce: str,
                            key_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.score_children_backward(grad_scores, probes, keys, child_ids, reduce, key_scales)


@torch.library.custom_op(f"{NAMESPACE}::descend", mutates_args=())
def descend(probes: torch.Tensor, keys: torch.Tensor, parents: torch.Tensor, fanout: int, t: int,
            reduce: str, mask: torch.Tensor | None,
            key_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers.descend(probes, keys, parents, fanout, t, reduce, mask, key_scales)


# The schema is spelled out: ``Tensor?[]?`` (None, or one optional tensor per level) is not
# inferred from type hints.
@torch.library.custom_op(
    f"{NAMESPACE}::descend_tree",
    mutates_args=(),
    schema="(Tensor[] probes, Tensor[] keys, SymInt fanout, SymInt[] t, str reduce, Tensor?[] masks, "
    "Tensor?[]? key_scales=None) -> Tensor[]",
)
def descend_tree(probes, keys, fanout, t, reduce, masks, key_scales=None):
    return launchers.descend_tree(probes, keys, fanout, t, reduce, masks, key_scales)


_fake.register(NAMESPACE)
_autograd.register(NAMESPACE)
