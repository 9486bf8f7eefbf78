"""Runs the Triton kernels for CUDA tensors when the CUDA C++ kernels were not built."""

from __future__ import annotations

import torch

from ._fake import FAKE_KERNELS


def register_triton_for_cuda() -> None:
    """Register the Triton launchers as the CUDA kernels of ``mllm_kernels::*``.

    Triton is imported on the first CUDA call, so CPU-only users never pay for it.
    """
    for name in FAKE_KERNELS:

        def kernel(*args, _name=name):
            from .triton import launchers

            return getattr(launchers, _name)(*args)

        torch.library.impl(f"mllm_kernels::{name}", "CUDA")(kernel)
