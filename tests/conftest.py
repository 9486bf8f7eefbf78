"""Test configuration of the mllm_kernels suite.

The environment variables below must be set before torch, triton or mllm_kernels is imported:
``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, and
``MLLM_POISON_OUTPUTS`` when the output allocators are imported (Python and C++). With poisoning
on, every output a kernel allocates uninitialised starts as NaN / int64 min, so a kernel that
leaves part of an output unwritten fails the comparisons instead of passing by luck.

On a machine with a GPU, ``MLLM_TEST_TRITON_DEVICE=cuda`` runs the Triton cases there instead
of under the interpreter (``testing_utils.route_triton_calls``).
"""

import os

if os.environ.get("MLLM_TEST_TRITON_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["MLLM_POISON_OUTPUTS"] = "1"

import faulthandler
import importlib.util
import sys
import zlib
from pathlib import Path

import pytest

if importlib.util.find_spec("mllm_kernels") is None:
    # Not installed: test the checkout (the compiled _C must have been built in place).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from hypothesis import HealthCheck, settings
from testing_utils import TRITON_DEVICE, route_triton_calls

settings.register_profile(
    "mllm",
    deadline=None,
    derandomize=True,  # reproducible CI runs; set HYPOTHESIS_PROFILE=explore for fresh examples
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", parent=settings.get_profile("mllm"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mllm"))

# A kernel that hangs (e.g. loops over 2**62 child slots) must fail loudly, not stall CI: a
# watchdog thread dumps every stack and exits the process when one test runs this long.
TEST_TIMEOUT_S = float(os.environ.get("MLLM_TEST_TIMEOUT_S", "600"))


def pytest_configure(config):
    # Raised inside torch.compile's own machinery, not by this project.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True, scope="session")
def _check_environment():
    import mllm_kernels  # noqa: F401  (fails with a readable message when _C is missing)
    from mllm_kernels import _alloc

    assert _alloc.POISON, "MLLM_POISON_OUTPUTS must be set before mllm_kernels is imported"
    if TRITON_DEVICE != "cpu":
        assert torch.cuda.is_available(), f"MLLM_TEST_TRITON_DEVICE={TRITON_DEVICE}, but torch sees no GPU"
        route_triton_calls(TRITON_DEVICE)
    yield


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: reproducible, and different for every test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["cpu", "triton"])
def backend(request):
    """The compared implementations (the oracle is mllm_kernels.reference)."""
    return request.param
