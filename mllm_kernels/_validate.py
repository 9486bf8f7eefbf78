"""Input checks for the backends that are not the C++ extension (Triton, reference).

The C++ kernels check the same things with ``TORCH_CHECK`` (``csrc/ops.cpp`` and the kernels),
raising the same exception types: TypeError for dtypes, ValueError for shapes and values,
IndexError for ids or offsets out of range. Messages name the op and the argument.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KEY_DTYPES = FLOAT_DTYPES + (torch.int8,)  # int8 keys come with float32 key_scales
REDUCTIONS = ("max", "lse")


def _tensor(op, name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _float(op, name, value):
    _tensor(op, name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {value.dtype}")


def _key_dtype(op, name, value, scales_name="key_scales"):
    _tensor(op, name, value)
    if value.dtype not in KEY_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float16, bfloat16, float64 or int8 (with {scales_name}), got {value.dtype}"
        )


def check_key_scales(op, keys, key_scales, keys_name="keys", scales_name="key_scales"):
    """int8 ``keys [N, D]`` need ``key_scales``, float32 ``[N]`` on their device; float keys take None."""
    if keys.dtype != torch.int8:
        if key_scales is not None:
            raise ValueError(
                f"{op}: {scales_name} must be None unless {keys_name} are int8, got {keys_name} of dtype {keys.dtype}"
            )
        return
    if key_scales is None:
        raise ValueError(
            f"{op}: {scales_name} is required with int8 {keys_name} (one float32 scale per row, as returned "
            "by quantize_keys)"
        )
    _tensor(op, scales_name, key_scales)
    if key_scales.dtype != torch.float32:
        raise TypeError(f"{op}: {scales_name} must be float32, got {key_scales.dtype}")
    if key_scales.dim() != 1 or key_scales.shape[0] != keys.shape[0]:
        raise ValueError(
            f"{op}: {scales_name} must have shape [{keys.shape[0]}] (one scale per row of {keys_name}), "
            f"got {list(key_scales.shape)}"
        )
    _same_device(op, **{keys_name: keys, scales_name: key_scales})


def check_scales_not_differentiable(op, key_scales):
    """int8 keys and their scales get no gradient: refuse ``key_scales`` that asks for one."""
    if key_scales is not None and key_scales.requires_grad:
        raise RuntimeError(
            f"{op}: key_scales must not require grad: int8 keys and their scales are not differentiable "
            "(only probes get a gradient); pass key_scales.detach()"
        )


def _int64(op, name, value):
    _tensor(op, name, value)
    if value.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {value.dtype}")


def _rank(op, name, value, dims):
    if value.dim() != len(dims):
        raise ValueError(f"{op}: {name} must have shape [{', '.join(dims)}], got {list(value.shape)}")


def _positive_int(op, name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")


def _same_device(op, **tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{op}: all tensors must be on one device, {first_name} is on {first.device} "
                f"and {name} on {tensor.device}"
            )


def check_offsets(op, name, offsets, num_rows=None):
    """``offsets`` is int64 ``[K + 1]`` (K >= 0), non-decreasing, within ``[0, num_rows]``."""
    _int64(op, name, offsets)
    _rank(op, name, offsets, ["K + 1"])
    if offsets.numel() < 1:
        raise ValueError(f"{op}: {name} must hold at least one offset")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{op}: {name} must be non-decreasing")
    low, high = int(offsets.min()), int(offsets.max())
    if low < 0 or (num_rows is not None and high > num_rows):
        bound = "" if num_rows is None else f" and <= {num_rows}"
        raise IndexError(f"{op}: {name} must be >= 0{bound}, got values in [{low}, {high}]")


def check_chunk_offsets(seg_offsets, chunk_size):
    check_offsets("chunk_offsets", "seg_offsets", seg_offsets)
    _positive_int("chunk_offsets", "chunk_size", chunk_size)


def check_cls_pool(x, q, chunk_offsets, scale):
    op = "cls_pool"
    _float(op, "x", x)
    _float(op, "q", q)
    _rank(op, "x", x, ["N", "D"])
    _rank(op, "q", q, ["H", "D"])
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: q must have D={x.shape[1]} columns like x, got {q.shape[1]}")
    _same_device(op, x=x, q=q, chunk_offsets=chunk_offsets)
    check_offsets(op, "chunk_offsets", chunk_offsets, x.shape[0])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")


def check_level(op, probes, keys, mask, probes_name="probes", keys_name="keys", mask_name="mask",
                key_scales=None, scales_name="key_scales"):
    """One level: probes ``[B, P, D]``, keys ``[N, D]`` (float, or int8 with ``key_scales``),
    optional bool mask ``[N]``."""
    _float(op, probes_name, probes)
    _key_dtype(op, keys_name, keys, scales_name)
    _rank(op, probes_name, probes, ["B", "P", "D"])
    _rank(op, keys_name, keys, ["N", "D"])
    if probes.shape[1] < 1:
        raise ValueError(f"{op}: {probes_name} must hold at least one probe (P >= 1), got P=0")
    if probes.shape[2] != keys.shape[1]:
        raise ValueError(
            f"{op}: {probes_name} has D={probes.shape[2]} but {keys_name} has D={keys.shape[1]}"
        )
    if mask is not None:
        _tensor(op, mask_name, mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: {mask_name} must be bool, got {mask.dtype}")
        if mask.dim() != 1 or mask.shape[0] != keys.shape[0]:
            raise ValueError(f"{op}: {mask_name} must have shape [{keys.shape[0]}], got {list(mask.shape)}")
    _same_device(op, **{probes_name: probes, keys_name: keys, mask_name: mask})
    check_key_scales(op, keys, key_scales, keys_name, scales_name)


def check_reduce(op, reduce):
    if reduce not in REDUCTIONS:
        raise ValueError(f"{op}: reduce must be 'max' or 'lse', got {reduce!r}")


def check_children(op, probes, keys, parents, fanout, reduce, mask, key_scales=None):
    """The arguments shared by ``score_children`` and ``descend``."""
    check_level(op, probes, keys, mask, key_scales=key_scales)
    _positive_int(op, "fanout", fanout)
    check_reduce(op, reduce)
    _int64(op, "parents", parents)
    _rank(op, "parents", parents, ["B", "T"])
    if parents.shape[0] != probes.shape[0]:
        raise ValueError(f"{op}: parents has B={parents.shape[0]} rows but probes has B={probes.shape[0]}")
    _same_device(op, probes=probes, parents=parents)
    if parents.shape[1] * fanout > torch.iinfo(torch.int64).max:
        raise ValueError(f"{op}: T * fanout overflows int64 (T={parents.shape[1]}, fanout={fanout})")
    if parents.numel():
        num_parents = -(-keys.shape[0] // fanout)
        low, high = int(parents.min()), int(parents.max())
        if low < -1 or high >= num_parents:
            raise IndexError(
                f"{op}: parents must be -1 or in [0, ceil(N / fanout)) = [0, {num_parents}), "
                f"got values in [{low}, {high}]"
            )


def check_descend(probes, keys, parents, fanout, t, reduce, mask, key_scales=None):
    check_children("descend", probes, keys, parents, fanout, reduce, mask, key_scales)
    _positive_int("descend", "t", t)


def check_descend_tree(probes, keys, fanout, t, reduce, masks, key_scales=None):
    """Returns the per-level beam widths, masks and key scales as lists."""
    op = "descend_tree"
    if not isinstance(probes, (list, tuple)) or not isinstance(keys, (list, tuple)):
        raise TypeError(f"{op}: probes and keys must be lists of tensors (one per level)")
    levels = len(keys)
    if levels < 1:
        raise ValueError(f"{op}: keys must hold at least one level")
    if len(probes) != levels:
        raise ValueError(f"{op}: probes has {len(probes)} levels but keys has {levels}")
    _positive_int(op, "fanout", fanout)
    check_reduce(op, reduce)
    ts = [t] * levels if isinstance(t, int) and not isinstance(t, bool) else list(t)
    if len(ts) != levels:
        raise ValueError(f"{op}: t has {len(ts)} entries but there are {levels} levels")
    for level, t_level in enumerate(ts):
        _positive_int(op, f"t[{level}]", t_level)
    masks = [None] * levels if masks is None else list(masks)
    if len(masks) != levels:
        raise ValueError(f"{op}: masks has {len(masks)} entries but there are {levels} levels")
    if key_scales is not None and not isinstance(key_scales, (list, tuple)):
        raise TypeError(f"{op}: key_scales must be None or a list with one optional tensor per level")
    scales = [None] * levels if key_scales is None else list(key_scales)
    if len(scales) != levels:
        raise ValueError(f"{op}: key_scales has {len(scales)} entries but there are {levels} levels")
    for level in range(levels):
        check_level(op, probes[level], keys[level], masks[level],
                    f"probes[{level}]", f"keys[{level}]", f"masks[{level}]", scales[level], f"key_scales[{level}]")
        if probes[level].shape[0] != probes[0].shape[0]:
            raise ValueError(f"{op}: probes[{level}] has B={probes[level].shape[0]}, probes[0] has B={probes[0].shape[0]}")
        _same_device(op, **{"keys[0]": keys[0], f"keys[{level}]": keys[level]})
        if level > 0:
            expected = -(-keys[level].shape[0] // fanout)
            if keys[level - 1].shape[0] != expected:
                raise ValueError(
                    f"{op}: keys[{level - 1}] has {keys[level - 1].shape[0]} nodes but keys[{level}] has "
                    f"{keys[level].shape[0]}, so it must have ceil({keys[level].shape[0]} / {fanout}) = {expected}"
                )
    return ts, masks, scales
