"""Output allocation with optional poisoning, to catch kernels that leave outputs half-written.

With ``MLLM_POISON_OUTPUTS=1`` in the environment (the test suite sets it), every output that a
kernel allocates uninitialised is filled with NaN (floating point) or the smallest int64
(integers) first. The C++ kernels read the same variable (``csrc/cpu/alloc.h``).
"""

from __future__ import annotations

import os

import torch

POISON = os.environ.get("MLLM_POISON_OUTPUTS") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, poisoned when ``MLLM_POISON_OUTPUTS=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(torch.nan if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out
