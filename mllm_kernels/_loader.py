"""Loads the compiled library ``mllm_kernels._C`` and explains why when it cannot."""

from __future__ import annotations

import importlib

import torch


def _build_info():
    try:
        return importlib.import_module("mllm_kernels._build_info")
    except ImportError:
        return None


def built_with_cuda() -> bool:
    """True when this installation compiled the CUDA C++ kernels."""
    info = _build_info()
    return bool(info and info.WITH_CUDA)


def _base_version(version: str) -> str:
    return version.split("+")[0]


def load_library() -> None:
    """Import ``mllm_kernels._C``, which registers the ``torch.ops.mllm_kernels`` operators.

    Raises:
        ImportError: naming the PyTorch the library was built for and the one installed, when
            they differ or the shared library cannot be loaded.
    """
    info = _build_info()
    rebuild = "Rebuild it against the installed PyTorch: pip install --no-build-isolation ."
    if info is not None and _base_version(info.TORCH_VERSION) != _base_version(torch.__version__):
        raise ImportError(
            f"mllm_kernels._C was built for PyTorch {info.TORCH_VERSION}, but PyTorch "
            f"{torch.__version__} is installed. {rebuild}"
        )
    try:
        importlib.import_module("mllm_kernels._C")
    except (ImportError, OSError) as error:
        built_for = f"PyTorch {info.TORCH_VERSION}" if info is not None else "an unknown PyTorch"
        raise ImportError(
            f"mllm_kernels: could not load the compiled library mllm_kernels._C ({error}). It was "
            f"built for {built_for}; PyTorch {torch.__version__} is installed. {rebuild}"
        ) from error
