// MLLM_HOST_DEVICE marks inline functions shared by the CPU and CUDA kernels.
// Headers in csrc/common/ use no torch types: they compile with a host compiler or nvcc alone.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLLM_HOST_DEVICE inline
#endif
