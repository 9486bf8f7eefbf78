"""mllm_kernels: fused kernels of the hierarchical embedding memory.

Importing the package loads the compiled library and registers the operators
``torch.ops.mllm_kernels.{chunk_offsets, cls_pool, score_children, descend, descend_tree}``
(plus the backward ops), their fake kernels and their autograd formulas. On CUDA tensors, a
build without CUDA C++ kernels runs the Triton kernels. ``quantize_keys`` makes the int8 keys
with per-row float32 scales that ``score_children``, ``descend`` and ``descend_tree`` accept
through ``key_scales``.
"""

from ._loader import built_with_cuda, load_library

load_library()

from . import _autograd, _fake, reference
from ._cuda_fallback import register_triton_for_cuda
from .ops import (
    BACKENDS,
    available_backends,
    chunk_offsets,
    cls_pool,
    descend,
    descend_tree,
    score_children,
)
from .quantize import dequantize_keys, quantize_keys

_fake.register("mllm_kernels")
_autograd.register("mllm_kernels")
if not built_with_cuda():
    register_triton_for_cuda()

__all__ = [
    "BACKENDS",
    "available_backends",
    "built_with_cuda",
    "chunk_offsets",
    "cls_pool",
    "dequantize_keys",
    "descend",
    "descend_tree",
    "quantize_keys",
    "reference",
    "score_children",
]
