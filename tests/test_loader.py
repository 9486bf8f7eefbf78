"""The compiled library's load errors say what it was built for and what is installed."""

import sys
import types

import pytest
import torch

from mllm_kernels import _loader


def _fake_build_info(monkeypatch, version):
    info = types.ModuleType("mllm_kernels._build_info")
    info.TORCH_VERSION, info.CUDA_VERSION, info.WITH_CUDA = version, None, False
    monkeypatch.setitem(sys.modules, "mllm_kernels._build_info", info)


def test_version_mismatch_names_both_versions(monkeypatch):
    _fake_build_info(monkeypatch, "1.13.0+cpu")
    with pytest.raises(ImportError) as error:
        _loader.load_library()
    message = str(error.value)
    assert "built for PyTorch 1.13.0+cpu" in message
    assert torch.__version__ in message
    assert "pip install --no-build-isolation" in message


def test_unloadable_library_is_explained(monkeypatch):
    _fake_build_info(monkeypatch, torch.__version__)

    def broken_import(name):
        raise OSError("undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(
        _loader.importlib,
        "import_module",
        lambda name: sys.modules[name] if name.endswith("_build_info") else broken_import(name),
    )
    with pytest.raises(ImportError, match=r"could not load the compiled library mllm_kernels\._C.*undefined symbol"):
        _loader.load_library()


def test_matching_build_loads():
    _loader.load_library()
    assert hasattr(torch.ops.mllm_kernels, "descend")
