"""Builds the compiled library mllm_kernels._C with torch.utils.cpp_extension (ninja).

Environment:
    MLLM_CPU_ARCH   value for -march (default "native"; e.g. "x86-64-v3" for a portable build)
    FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST   also compile csrc/cuda/*.cu (needs a CUDA build of
                    PyTorch and CUDA_HOME); never decided by torch.cuda.is_available()
    MAX_JOBS        parallel compile jobs (ninja)
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_requested() -> bool:
    asked = os.environ.get("FORCE_CUDA") == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return asked and torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    march = os.environ.get("MLLM_CPU_ARCH", "native")
    # -Wno-maybe-uninitialized: GCC 12's AVX-512 intrinsic headers trip it (GCC bug 105593).
    cxx_flags = ["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden",
                 "-Wno-maybe-uninitialized"]
    with_cuda = _cuda_requested() and bool(cuda_sources)
    if with_cuda:
        return CUDAExtension(
            "mllm_kernels._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DMLLM_WITH_CUDA"], "nvcc": ["-O3", "-DMLLM_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        ), True
    return CppExtension(
        "mllm_kernels._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    ), False


def _write_build_info(with_cuda: bool) -> None:
    """Records what the library is built against, for a readable error when torch changes."""
    with open(os.path.join(ROOT, "mllm_kernels", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: what mllm_kernels._C was built against."""\n\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


extension, with_cuda = _extension()
_write_build_info(with_cuda)

setup(
    packages=find_packages(include=["mllm_kernels", "mllm_kernels.*", "mllm", "mllm.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
