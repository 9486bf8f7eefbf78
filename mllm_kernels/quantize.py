"""int8 keys with one float32 scale per row: a quarter of the memory traffic of float32 keys.

``score_children``, ``descend`` and ``descend_tree`` accept int8 keys together with
``key_scales``; the score of key row n for probe p is ``key_scales[n] * <probes[p], keys[n]>``,
accumulated in float32 (float64 for float64 probes), then reduced over the probes as for float
keys.
"""

from __future__ import annotations

import torch

from .reference import dequantize_keys

__all__ = ["INT8_KEY_MAX", "dequantize_keys", "quantize_keys"]

#: Quantised values lie in ``[-INT8_KEY_MAX, INT8_KEY_MAX]`` (the range is symmetric; -128 is unused).
INT8_KEY_MAX = 127

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Rows quantised per step: bounds the float temporaries to about 4M elements, so that quantising
# a level of gigabytes does not allocate several times its size.
_BLOCK_ELEMENTS = 1 << 22


@torch.no_grad()
def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation of ``keys [N, D]``.

    ``scale[n] = max_d |keys[n, d]| / 127`` (float32) and
    ``q[n, d] = round(keys[n, d] / scale[n])`` (round half to even) in ``[-127, 127]``, so that
    ``|keys[n, d] - scale[n] * q[n, d]| <= scale[n] / 2`` up to float rounding. A row of zeros
    gets scale 0 and zeros. The division runs in float32 (float64 for float64 keys).

    Args:
        keys: ``[N, D]`` float32, float16, bfloat16 or float64, finite, on any device.

    Returns:
        ``(q, scales)``: int8 ``[N, D]`` and float32 ``[N]`` on the device of ``keys``, ready to
        pass as ``keys=q, key_scales=scales`` to the ops (``dequantize_keys(q, scales)`` gives
        back the approximation).

    Raises:
        TypeError: ``keys`` is not a float tensor.
        ValueError: ``keys`` is not 2-D, holds NaN or infinity, or (float64) has rows whose scale
            overflows float32.
    """
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"quantize_keys: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_keys: keys must be float32, float16, bfloat16 or float64, got {keys.dtype}")
    if keys.dim() != 2:
        raise ValueError(f"quantize_keys: keys must have shape [N, D], got {list(keys.shape)}")
    N, D = keys.shape
    q = torch.empty((N, D), dtype=torch.int8, device=keys.device)
    scales = torch.zeros(N, dtype=torch.float32, device=keys.device)
    if N == 0 or D == 0:
        return q, scales
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
    step = max(1, _BLOCK_ELEMENTS // D)
    for start in range(0, N, step):
        block = keys[start : start + step].to(compute)
        if not bool(torch.isfinite(block).all()):
            raise ValueError("quantize_keys: keys must be finite (found NaN or infinity)")
        scale = (block.abs().amax(1) / INT8_KEY_MAX).to(torch.float32)
        if not bool(torch.isfinite(scale).all()):  # float64 rows beyond the float32 range
            raise ValueError("quantize_keys: keys have rows whose scale max|row| / 127 overflows float32")
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).to(compute)
        values = torch.round(block / divisor[:, None]).clamp_(-INT8_KEY_MAX, INT8_KEY_MAX)
        q[start : start + step] = values.to(torch.int8)
        scales[start : start + step] = scale
    return q, scales
