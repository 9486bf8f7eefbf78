"""Operator registration (SPEC 5): opcheck on every op, and torch.compile(fullgraph=True)."""

import pytest
import torch
from testing_utils import F32, F64, TRITON_DEVICE, make_keys, make_parents, make_probes, param, to_device

import mllm_kernels as mk
from mllm_kernels import reference

OPS = [
    "chunk_offsets",
    "cls_pool",
    "cls_pool_backward",
    "score_children",
    "score_children_backward",
    "descend",
    "descend_tree",
]


def _gen():
    return torch.Generator().manual_seed(1)


def samples(op, dtype=F32, small=False):
    """(args) samples of ``op`` in the operator's own calling convention."""
    g = _gen()
    if op == "chunk_offsets":
        return [(torch.tensor([0, 5, 5, 7]), 2), (torch.tensor([3, 3, 10]), 4), (torch.tensor([0]), 1)]
    if op in ("cls_pool", "cls_pool_backward"):
        out = []
        for offsets, H, D in (
            [([2, 5, 5, 9], 2, 3), ([0, 4], 1, 5)]
            if small
            else [([2, 5, 5, 9, 16], 3, 5), ([0, 0], 1, 4), ([1, 7], 2, 33)]
        ):
            offsets = torch.tensor(offsets)
            x = torch.randn(int(offsets[-1]) + 1, D, generator=g, dtype=dtype).requires_grad_()
            q = torch.randn(H, D, generator=g, dtype=dtype).requires_grad_()
            out.append((x, q, offsets, 0.6))
        if op == "cls_pool":
            return out
        backward = []
        for x, q, offsets, scale in out:
            pooled, lse = torch.ops.mllm_kernels.cls_pool(x.detach(), q.detach(), offsets, scale)
            grad = torch.randn(pooled.shape, generator=g, dtype=dtype)
            backward.append((grad, None, x.detach(), q.detach(), offsets, pooled, lse, scale))
        return backward
    shapes = (
        [(2, 3, 5, 20, 3, 4, 5)] if small else [(2, 3, 5, 20, 3, 4, 5), (1, 1, 33, 7, 7, 1, 9), (3, 2, 4, 0, 2, 2, 3)]
    )
    out = []
    for B, P, D, N, fanout, T, t in shapes:
        probes = make_probes(B, P, D, dtype, g).requires_grad_()
        keys = make_keys(N, D, dtype, g).requires_grad_()
        parents = make_parents(B, T, -(-N // fanout), g)
        for mask in (None, torch.rand(N, generator=g) < 0.7):
            if op == "score_children":
                out.append((probes, keys, parents, fanout, "lse" if mask is None else "max", mask))
            elif op == "score_children_backward":
                scores, ids = torch.ops.mllm_kernels.score_children(
                    probes.detach(), keys.detach(), parents, fanout, "lse", mask
                )
                grad = torch.randn(scores.shape, generator=g, dtype=scores.dtype)
                out.append((grad, probes.detach(), keys.detach(), ids, "lse"))
            elif op == "descend":
                out.append((probes.detach(), keys.detach(), parents, fanout, t, "max", mask))
    if op == "descend_tree":
        sizes = [2, 5, 13]
        probes = [make_probes(2, 2, 4, dtype, g) for _ in sizes]
        keys = [make_keys(n, 4, dtype, g) for n in sizes]
        out = [(probes, keys, 3, [2, 3, 4], "max", [None, None, None])]
        if not small:
            out.append((probes[:2], keys[:2], 3, [1, 7], "lse", [torch.tensor([True, False]), None]))
    return out


@pytest.mark.parametrize(
    "op, dtype", [param(op, dtype) for op in OPS for dtype in (F32, F64) if op != "chunk_offsets" or dtype == F32]
)
def test_opcheck_cpp(op, dtype):
    for args in samples(op, dtype):
        torch.library.opcheck(getattr(torch.ops.mllm_kernels, op).default, args)


TRITON_OPS = ["cls_pool", "cls_pool_backward", "score_children", "score_children_backward", "descend"]


@pytest.mark.parametrize("op", TRITON_OPS)
def test_opcheck_triton(op):
    mk.descend(*make_inputs_for_import(), backend="triton")  # imports the Triton namespace
    triton_op = getattr(torch.ops.mllm_kernels_triton, op).default
    for args in samples(op, small=True):
        args = to_device(args, TRITON_DEVICE)
        if op == "cls_pool_backward":
            # The saved outputs must come from the Triton forward (its own log-sum-exp).
            grad, _, x, q, offsets, _, _, scale = args
            pooled, lse = torch.ops.mllm_kernels_triton.cls_pool(x, q, offsets, scale)
            args = (grad, None, x, q, offsets, pooled, lse, scale)
        torch.library.opcheck(triton_op, args)


def make_inputs_for_import():
    g = _gen()
    return make_probes(1, 1, 2, F32, g), make_keys(2, 2, F32, g), torch.tensor([[0]]), 2, 1


def test_registered_ops():
    for op in OPS:
        assert hasattr(torch.ops.mllm_kernels, op), op
        schema = str(getattr(torch.ops.mllm_kernels, op).default._schema)
        assert schema.startswith(f"mllm_kernels::{op}("), schema


# ------------------------------------------------------------------------------------------
# torch.compile


class Retriever(torch.nn.Module):
    """A small model using the ops the way the module layer does."""

    def __init__(self, D, H):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(H, D, generator=_gen()))
        self.proj = torch.nn.Linear(H * D, D)

    def forward(self, x, offsets, keys, parents, fanout: int, t: int):
        pooled = mk.cls_pool(x, self.q, offsets)  # [C, H, D]
        probes = self.proj(pooled.flatten(1)).unsqueeze(0)  # [1, C, D]
        scores, child_ids = mk.score_children(probes, keys, parents, fanout, "lse")
        ids, top = mk.descend(probes.detach(), keys, parents, fanout, t)
        loss = torch.where(child_ids >= 0, scores, torch.zeros_like(scores)).sum()
        return loss, ids, top


def _compile_inputs():
    g = _gen()
    offsets = torch.tensor([0, 4, 4, 9, 17])
    x = torch.randn(17, 6, generator=g)
    keys = torch.randn(23, 6, generator=g)
    parents = torch.tensor([[0, 3, -1, 7]])
    return x, offsets, keys, parents, 3, 5


def check_compiled_matches_eager(model, inputs, compile_backend):
    """``torch.compile(model, fullgraph=True)`` gives eager's loss, ids, scores and parameter
    gradients; returns eager's ids."""
    torch._dynamo.reset()
    loss, ids, top = model(*inputs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    c_loss, c_ids, c_top = compiled(*inputs)
    c_loss.backward()
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(c_ids, ids)
    torch.testing.assert_close(c_top, top)
    for grad, param_ in zip(grads, model.parameters()):
        torch.testing.assert_close(param_.grad, grad, atol=1e-5, rtol=1e-5)
    return ids


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend):
    model = Retriever(6, 2)
    inputs = _compile_inputs()
    ids = check_compiled_matches_eager(model, inputs, compile_backend)
    # The eager result is itself right.
    ref_ids, _ = reference.descend(
        model.proj(reference.cls_pool(inputs[0], model.q, inputs[1], 6**-0.5).flatten(1)).unsqueeze(0).detach(),
        inputs[2],
        inputs[3],
        3,
        5,
    )
    assert torch.equal(ids, ref_ids)


def test_compile_descend_tree_and_chunk_offsets():
    """descend_tree (list in, list out) and chunk_offsets (data-dependent size) under compile."""
    torch._dynamo.reset()
    g = _gen()
    sizes = [3, 7, 20]
    probes = [make_probes(2, 2, 5, F32, g) for _ in sizes]
    keys = [make_keys(n, 5, F32, g) for n in sizes]

    def tree(probes, keys):
        return mk.descend_tree(probes, keys, 3, [2, 4, 5])

    eager = tree(probes, keys)
    compiled = torch.compile(tree, backend="aot_eager", fullgraph=True)(probes, keys)
    for (a, b), (c, d) in zip(eager, compiled):
        assert torch.equal(a, c) and torch.equal(b, d)

    def chunks(seg):
        return mk.chunk_offsets(seg, 3)

    seg = torch.tensor([0, 5, 5, 12])
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        c_off, c_seg = torch.compile(chunks, backend="aot_eager", fullgraph=True)(seg)
    e_off, e_seg = chunks(seg)
    assert torch.equal(c_off, e_off) and torch.equal(c_seg, e_seg)
