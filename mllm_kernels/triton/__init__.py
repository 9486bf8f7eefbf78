"""Triton kernels of the mllm_kernels ops.

``launchers`` holds one plain function per operator schema (also used as the CUDA kernels of
``mllm_kernels::*`` when the CUDA C++ kernels are not built); ``ops`` wraps them as the opaque
custom ops ``torch.ops.mllm_kernels_triton.*``. On CPU tensors the kernels run under
``TRITON_INTERPRET=1``, which must be set before these modules are imported. Nothing here is
imported eagerly: importing this package does not import triton.
"""
