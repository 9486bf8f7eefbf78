"""The public ops: thin wrappers that pick a backend and call one registered operator.

Every function takes ``backend``:

* ``"auto"`` (default): one dispatcher call; CPU tensors run the C++ kernels, CUDA tensors the
  CUDA C++ kernels when built, else the Triton kernels.
* ``"cpu"``: the C++ kernels (CPU tensors only).
* ``"cuda"``: the CUDA C++ kernels (only in a build with CUDA kernels).
* ``"triton"``: the Triton kernels; on CPU tensors they run under ``TRITON_INTERPRET=1``, which
  must be set before ``mllm_kernels`` is imported.
* ``"reference"``: the plain-PyTorch implementations of :mod:`mllm_kernels.reference`.

The C++ kernels and the Triton launchers validate their own inputs (the launchers also serve the
CUDA dispatch key), so a call pays for one dispatcher call and nothing else; only the reference
path is checked here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import _validate, reference
from ._loader import built_with_cuda

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_C_OPS = torch.ops.mllm_kernels


def available_backends() -> list[str]:
    """The backends usable in this process (``"triton"`` needs the triton package)."""
    names = ["auto", "cpu", "reference"]
    if built_with_cuda():
        names.append("cuda")
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    return names


def _triton_ops():
    try:
        from .triton import ops as triton_ops  # noqa: F401  (defines torch.ops.mllm_kernels_triton)
    except ImportError as error:
        raise RuntimeError(
            f"backend='triton' needs the triton package, which could not be imported: {error}"
        ) from error
    return torch.ops.mllm_kernels_triton


def _resolve(op: str, backend: str, device: torch.device):
    """The operator namespace for ``backend``, or None for the reference."""
    if backend == "auto":
        return _C_OPS
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
        return _C_OPS
    if backend == "cuda":
        if not built_with_cuda():
            raise RuntimeError(
                f"{op}: backend='cuda' is unavailable: mllm_kernels was built without CUDA kernels "
                "(rebuild with FORCE_CUDA=1 against a CUDA build of PyTorch), use 'triton' instead"
            )
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        return _C_OPS
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                "mllm_kernels is imported"
            )
        return _triton_ops()
    if backend == "reference":
        return None
    raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def _device_of(op: str, name: str, value) -> torch.device:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value.device


def chunk_offsets(seg_offsets: torch.Tensor, chunk_size: int, *, backend: str = "auto"):
    """Split segments into chunks of at most ``chunk_size`` rows (SPEC 4.1).

    Args:
        seg_offsets: int64 ``[S + 1]``, non-decreasing absolute row offsets of S segments.
        chunk_size: rows per chunk, >= 1. A segment's last chunk may be shorter; an empty
            segment gives no chunk; chunks never cross segments.

    Returns:
        ``(chunk_offsets, chunk_segment)``: int64 ``[C + 1]`` with
        ``chunk_offsets[0] == seg_offsets[0]``, and int64 ``[C]``, the segment of each chunk.

    Example:
        >>> chunk_offsets(torch.tensor([0, 5, 5, 7]), 2)
        (tensor([0, 2, 4, 5, 7]), tensor([0, 0, 0, 2]))
    """
    ops = _resolve("chunk_offsets", backend, _device_of("chunk_offsets", "seg_offsets", seg_offsets))
    if ops is None:
        _validate.check_chunk_offsets(seg_offsets, chunk_size)
        return reference.chunk_offsets(seg_offsets, chunk_size)
    return ops.chunk_offsets(seg_offsets, chunk_size)


def cls_pool(
    x: torch.Tensor,
    q: torch.Tensor,
    chunk_offsets: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention pooling of each chunk with per-head CLS queries, in one pass over ``x`` (SPEC 4.2).

    ``pooled[c, h] = sum_i softmax_i(scale * <q[h], x[i]>) * x[i]`` over the rows i of chunk c.

    Args:
        x: ``[N, D]`` rows (float32, float16, bfloat16; float64 on CPU).
        q: ``[H, D]`` per-head CLS queries, already folded through the key projection.
        chunk_offsets: int64 ``[C + 1]`` non-decreasing row offsets into ``x``.
        scale: logit scale; ``1 / sqrt(D)`` when None.

    Returns:
        ``[C, H, D]`` in ``x.dtype``; an empty chunk gives zeros. Differentiable with respect to
        ``x`` and ``q``; the backward recomputes the weights from a saved log-sum-exp.
    """
    ops = _resolve("cls_pool", backend, _device_of("cls_pool", "x", x))
    if scale is None:
        # 1/sqrt(D); any placeholder for a malformed x, which the op itself rejects by name.
        scale = x.shape[-1] ** -0.5 if x.dim() > 0 and x.shape[-1] > 0 else 1.0
    if ops is None:
        _validate.check_cls_pool(x, q, chunk_offsets, scale)
        return reference.cls_pool(x, q, chunk_offsets, scale)
    return ops.cls_pool(x, q, chunk_offsets, scale)[0]


def score_children(
    probes: torch.Tensor,
    keys: torch.Tensor,
    parents: torch.Tensor,
    fanout: int,
    reduce: str = "max",
    mask: torch.Tensor | None = None,
    key_scales: torch.Tensor | None = None,
    *,
    backend: str = "auto",
):
    """Score every child of ``parents`` against the probes (SPEC 4.3).

    Child slot ``j`` of row ``b`` is node ``parents[b, j // fanout] * fanout + j % fanout``; its
    score is ``max_p <probes[b, p], keys[child]>`` (``reduce="max"``) or the logsumexp over p
    (``"lse"``). With int8 keys, ``<probes[b, p], keys[child]>`` stands for
    ``key_scales[child] * <probes[b, p], keys[child]>`` (the int8 row converted exactly,
    accumulated in float32), before the reduction.

    Args:
        probes: ``[B, P, D]`` float.
        keys: ``[N, D]`` float32, float16 or bfloat16 (float64 on CPU), or int8 with
            ``key_scales`` (see :func:`mllm_kernels.quantize_keys`).
        parents: int64 ``[B, T]`` node ids of the parent level (``ceil(N / fanout)`` nodes),
            ``-1`` = empty slot.
        fanout: children per parent, >= 1.
        reduce: ``"max"`` or ``"lse"``.
        mask: optional bool ``[N]``; False = not a candidate.
        key_scales: float32 ``[N]``, one scale per key row; required with int8 keys, must be
            None with float keys.

    Returns:
        ``(scores, child_ids)``: float32 ``[B, T * fanout]`` (float64 for float64 inputs) and
        int64 ``[B, T * fanout]``. Slots of empty parents, children ``>= N`` and masked children
        are ``-inf`` / ``-1``. Differentiable with respect to ``probes`` and (float) ``keys``;
        int8 keys and their scales get no gradient (``key_scales`` must not require one).
    """
    ops = _resolve("score_children", backend, _device_of("score_children", "probes", probes))
    if ops is None:
        _validate.check_children("score_children", probes, keys, parents, fanout, reduce, mask, key_scales)
        if torch.is_grad_enabled():  # as the registered autograd of the kernels (mllm_kernels._autograd)
            _validate.check_scales_not_differentiable("score_children", key_scales)
        return reference.score_children(probes, keys, parents, fanout, reduce, mask, key_scales)
    return ops.score_children(probes, keys, parents, fanout, reduce, mask, key_scales)


def descend(
    probes: torch.Tensor,
    keys: torch.Tensor,
    parents: torch.Tensor,
    fanout: int,
    t: int,
    reduce: str = "max",
    mask: torch.Tensor | None = None,
    key_scales: torch.Tensor | None = None,
    *,
    backend: str = "auto",
):
    """One level of the descent in one launch: the top ``t`` children of ``parents`` (SPEC 4.4).

    Scores as in :func:`score_children`, selected inside the kernel: the ``[B, T * fanout]``
    score matrix is never written to memory. int8 ``keys`` with float32 ``key_scales [N]``
    (:func:`mllm_kernels.quantize_keys`) read a quarter of the bytes of float32 keys; on CPUs with
    AVX2 or AVX-512 VNNI the C++ kernel also skips the exact scoring of int8 rows whose integer
    score bound cannot beat the running t-th score (same results as scoring every row).

    Returns:
        ``(ids, scores)``: int64 and float32 ``[B, t]``, sorted by score descending; equal
        scores: smaller id first; a child under a duplicated parent counts once; NaN scores are
        never selected; fewer than ``t`` candidates: padded with ``-1`` / ``-inf``.
    """
    ops = _resolve("descend", backend, _device_of("descend", "probes", probes))
    if ops is None:
        _validate.check_descend(probes, keys, parents, fanout, t, reduce, mask, key_scales)
        return reference.descend(probes, keys, parents, fanout, t, reduce, mask, key_scales)
    return ops.descend(probes, keys, parents, fanout, t, reduce, mask, key_scales)


def descend_tree(
    probes: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    fanout: int,
    t: int | Sequence[int],
    reduce: str = "max",
    masks: Sequence[torch.Tensor | None] | None = None,
    key_scales: Sequence[torch.Tensor | None] | None = None,
    *,
    backend: str = "auto",
):
    """The whole descent, top level to leaves, in one call (SPEC 4.5).

    Args:
        probes: list over levels, top to bottom, of ``[B, P_k, D_k]``.
        keys: list over levels of ``[N_k, D_k]`` with ``N_{k-1} == ceil(N_k / fanout)``; each
            level float, or int8 with its scales in ``key_scales``.
        fanout: children per node, >= 1.
        t: beam width, one int or one per level.
        reduce: ``"max"`` or ``"lse"``.
        masks: None, or one optional bool ``[N_k]`` mask per level.
        key_scales: None (no int8 level), or one entry per level: float32 ``[N_k]`` for an int8
            level, None for a float level.

    Returns:
        list over levels of ``(ids [B, t_k], scores [B, t_k])``. Every node of the top level is a
        candidate; each lower level's candidates are the children of the level above's selection.
    """
    if not isinstance(keys, (list, tuple)) or not keys:
        raise TypeError("descend_tree: keys must be a non-empty list of tensors (one per level)")
    ops = _resolve("descend_tree", backend, _device_of("descend_tree", "keys[0]", keys[0]))
    if ops is None:
        ts, masks, scales = _validate.check_descend_tree(probes, keys, fanout, t, reduce, masks, key_scales)
        return reference.descend_tree(probes, keys, fanout, ts, reduce, masks, scales)
    ts = [t] * len(keys) if isinstance(t, int) else list(t)
    masks = [None] * len(keys) if masks is None else list(masks)
    if key_scales is not None:
        key_scales = list(key_scales)
    flat = ops.descend_tree(list(probes), list(keys), fanout, ts, reduce, masks, key_scales)
    return [(flat[2 * level], flat[2 * level + 1]) for level in range(len(keys))]
