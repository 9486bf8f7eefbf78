"""The Triton kernels on a GPU, at sizes the interpreter cannot reach (``MLLM_TEST_TRITON_DEVICE=cuda``).

Under the interpreter the running top-R is always the rank merge, and tiles are CPU-sized; on a
GPU, R > 128 takes the bitonic merge and the tiles are register-sized. These cases cover both
paths at the shapes of a real tree (D=384, fanout 64, thousands of candidates per row), the
CUDA dispatch key (``backend="auto"`` on CUDA tensors), and ``torch.compile`` on the GPU.
Inputs are made on the CPU; ``backend="triton"`` calls run on the GPU
(``testing_utils.route_triton_calls``) and are compared with the CPU reference.
"""

import pytest
import torch
from test_descend import check as check_descend
from test_int8_keys import check_descend as check_descend_int8
from test_int8_keys import check_tree as check_int8_tree
from test_int8_keys import make_int8_keys
from test_registration import Retriever, _compile_inputs, check_compiled_matches_eager
from test_score_children import check as check_scores
from testing_utils import (
    BF16,
    F16,
    F32,
    F64,
    TRITON_DEVICE,
    assert_error_budget,
    make_keys,
    make_mask,
    make_parents,
    make_probes,
    num_parents,
    param,
    to_device,
)

import mllm_kernels as mk
from mllm_kernels import reference

pytestmark = pytest.mark.skipif(
    TRITON_DEVICE == "cpu", reason="GPU only: set MLLM_TEST_TRITON_DEVICE=cuda on a machine with a GPU"
)

# (B, P, D, N, fanout, T, t): t > 128 takes the bitonic merge; t > T * fanout pads.
DESCEND_SHAPES = [
    (8, 4, 384, 100_000, 64, 8, 8),
    (4, 1, 384, 100_000, 64, 16, 129),
    (3, 2, 64, 50_000, 64, 32, 256),
    (2, 3, 100, 20_000, 64, 64, 500),
    (2, 2, 33, 5_000, 16, 4, 200),  # t above the 64 candidates: padding after a bitonic top
    (5, 9, 17, 3_000, 7, 100, 300),
]


@pytest.mark.parametrize("shape", [param(s) for s in DESCEND_SHAPES])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("reduce", ["max", "lse"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_descend_large(shape, dtype, reduce, masked, gen):
    B, P, D, N, fanout, T, t = shape
    probes = make_probes(B, P, D, dtype, gen)
    keys = make_keys(N, D, dtype, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    mask = make_mask(N, gen) if masked else None
    check_descend("triton", probes, keys, parents, fanout, t, reduce, mask)


@pytest.mark.parametrize("shape", [param(s) for s in DESCEND_SHAPES])
@pytest.mark.parametrize("reduce", ["max", "lse"])
def test_descend_int8_large(shape, reduce, gen):
    B, P, D, N, fanout, T, t = shape
    probes = make_probes(B, P, D, F32, gen)
    q, scales = make_int8_keys(N, D, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    check_descend_int8("triton", probes, q, scales, parents, fanout, t, reduce, make_mask(N, gen))


@pytest.mark.parametrize("shape", [(4, 4, 384, 50_000, 64, 16), (2, 1, 100, 9_000, 64, 64), (3, 9, 17, 500, 5, 40)])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("reduce", ["max", "lse"])
def test_score_children_large(shape, dtype, reduce, gen):
    B, P, D, N, fanout, T = shape
    probes = make_probes(B, P, D, dtype, gen)
    keys = make_keys(N, D, dtype, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    check_scores("triton", probes, keys, parents, fanout, reduce, make_mask(N, gen))


@pytest.mark.parametrize("leaves, t", [(100_000, [8, 16, 8]), (30_000, [64, 200, 300])])
@pytest.mark.parametrize("int8_leaves", [False, True], ids=["f16", "int8leaves"])
def test_descend_tree_large(leaves, t, int8_leaves, gen):
    """Three levels of a fanout-64 tree of float16 keys (int8 leaves: ``key_scales``)."""
    fanout, D, B = 64, 384, 6
    sizes = [-(-leaves // fanout**2), -(-leaves // fanout), leaves]
    probes = [make_probes(B, 2, D, F32, gen) for _ in sizes]
    keys = [make_keys(n, D, F16, gen) for n in sizes]
    scales = [None] * len(sizes)
    if int8_leaves:
        keys[-1], scales[-1] = make_int8_keys(leaves, D, gen)
    check_int8_tree("triton", probes, keys, scales, fanout, t, "max", None)


@pytest.mark.parametrize("op", ["score_children", "descend"])
def test_cuda_dispatch_key_runs_triton(op, gen):
    """``backend="auto"`` on CUDA tensors reaches the Triton kernels through the dispatcher."""
    probes = make_probes(4, 3, 64, F16, gen)
    keys = make_keys(2_000, 64, F16, gen)
    parents = make_parents(4, 8, num_parents(2_000, 16), gen)
    args = (probes, keys, parents, 16) if op == "score_children" else (probes, keys, parents, 16, 10)
    auto = getattr(mk, op)(*to_device(args, "cuda"), backend="auto")
    triton = getattr(mk, op)(*args, backend="triton")  # routed to the GPU, outputs back on the CPU
    assert all(out.device.type == "cuda" for out in auto)
    for a, b in zip(auto, triton):
        assert torch.equal(a.cpu(), b)


def test_compile_on_gpu_matches_eager():
    """The module layer's use of the ops, compiled with inductor on CUDA tensors."""
    check_compiled_matches_eager(Retriever(6, 2).cuda(), to_device(_compile_inputs(), "cuda"), "inductor")


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_cls_pool_large(dtype, gen):
    """Thousands of chunks of 128 rows, forward and backward, against the reference."""
    rows, D, H, chunk = 40_000, 384, 4, 128
    x = make_keys(rows, D, dtype, gen)
    q = make_keys(H, D, dtype, gen).mul_(0.2)
    offsets = torch.cat([torch.arange(0, rows, chunk), torch.tensor([rows])])
    grad_out = make_keys(offsets.numel() - 1, D, dtype, gen).unsqueeze(1).expand(-1, H, -1).contiguous()

    def grads(fn, x, q):
        x, q = x.detach().requires_grad_(), q.detach().requires_grad_()
        out = fn(x, q)
        return (out, *torch.autograd.grad(out, (x, q), grad_out.to(out.dtype)))

    out = grads(lambda x, q: mk.cls_pool(x, q, offsets, backend="triton"), x, q)
    low = grads(lambda x, q: reference.cls_pool(x, q, offsets), x, q)
    exact = grads(lambda x, q: reference.cls_pool(x, q, offsets), x.double(), q.double())
    for name, a, lo, ex in zip(["pooled", "grad x", "grad q"], out, low, exact):
        if dtype == F32:
            torch.testing.assert_close(a.double(), ex, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert_error_budget(a, lo, ex, name=name)
