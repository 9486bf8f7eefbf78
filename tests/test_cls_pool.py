"""cls_pool (SPEC 4.2): values and gradients of every backend vs the reference."""

import pytest
import torch
from testing_utils import (
    BACKENDS,
    F16,
    F32,
    F64,
    LOW_PRECISION,
    OUT_TOL,
    assert_error_budget,
    assert_no_poison,
    dtypes_for,
    make_offsets,
    param,
    randn,
    strided,
    transposed,
)

import mllm_kernels as mk
from mllm_kernels import reference

# (name, chunk lengths, rows before the first chunk, rows after the last chunk)
LAYOUTS = {
    "ragged_empty": ([3, 0, 1, 7, 0, 12], 2, 3),
    "one_long": ([150], 0, 0),
    "no_chunks": ([], 4, 1),
    "all_empty": ([0, 0, 0], 1, 1),
    "first_empty": ([0, 5, 1], 0, 0),
    "many_small": ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, 0, 0),
}
TRITON_LAYOUTS = ["ragged_empty", "no_chunks", "first_empty", "one_long"]


def make_inputs(layout, D, H, dtype, gen, x_scale=1.0):
    lengths, before, after = LAYOUTS[layout]
    offsets = make_offsets(lengths, start=before)
    N = int(offsets[-1]) + after
    x = randn((N, D), dtype, gen, scale=x_scale)
    q = randn((H, D), dtype, gen)
    return x, q, offsets


def check_pooled(out, x, q, offsets, scale):
    """Compare with the reference: tolerances for fp32/fp64, the error budget for fp16/bf16."""
    C, H, D = offsets.numel() - 1, q.shape[0], x.shape[1]
    assert out.shape == (C, H, D) and out.dtype == x.dtype
    assert_no_poison(out, "pooled")
    ref = reference.cls_pool(x, q, offsets, scale)
    if x.dtype in LOW_PRECISION:
        exact = reference.cls_pool(x.double(), q.double(), offsets, scale)
        assert_error_budget(out, ref, exact, name="pooled")
    else:
        torch.testing.assert_close(out, ref, **OUT_TOL[x.dtype])
    empty = (offsets[1:] == offsets[:-1]).nonzero().flatten()
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty chunks must pool to zeros"


def _value_params():
    params = []
    for backend in BACKENDS:
        for dtype in dtypes_for(backend):
            if backend == "cpu":
                for layout in LAYOUTS:
                    for D in (1, 5, 33, 100, 384):
                        for H in (1, 3):
                            if dtype != F32 and (D, H) not in ((33, 3), (5, 1)):
                                continue
                            params.append(param(backend, dtype, layout, D, H))
            else:
                for layout in TRITON_LAYOUTS:
                    for D, H in ((5, 1), (33, 2), (100, 1), (384, 2)) if dtype == F32 else ((33, 2),):
                        params.append(param(backend, dtype, layout, D, H))
    return params


@pytest.mark.parametrize("backend, dtype, layout, D, H", _value_params())
def test_values(backend, dtype, layout, D, H, gen):
    x, q, offsets = make_inputs(layout, D, H, dtype, gen)
    out = mk.cls_pool(x, q, offsets, backend=backend)
    check_pooled(out, x, q, offsets, D**-0.5)


@pytest.mark.parametrize("dtype", dtypes_for("cpu"), ids=str)
@pytest.mark.parametrize("H", [4, 8, 11])
@pytest.mark.parametrize("layout", ["one_long", "many_small"])
def test_many_heads_cpu(dtype, H, layout, gen):
    """More heads than one pass of the CPU kernel's accumulator update takes (8), and tiles of
    rows with a partial last group of logits (150 rows: tiles of 16, groups of 6)."""
    x, q, offsets = make_inputs(layout, 100, H, dtype, gen)
    out = mk.cls_pool(x, q, offsets, backend="cpu")
    check_pooled(out, x, q, offsets, 100**-0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 3.0, -1.5, 1e-3], ids=lambda s: f"scale{s}")
def test_explicit_scale(backend, scale, gen):
    x, q, offsets = make_inputs("ragged_empty", 7, 2, F32, gen)
    out = mk.cls_pool(x, q, offsets, scale, backend=backend)
    check_pooled(out, x, q, offsets, scale)
    if scale == 0.0:  # uniform weights: the mean of each chunk
        c = 3  # chunk 3 of "ragged_empty" is rows [6, 13)
        start, end = int(offsets[c]), int(offsets[c + 1])
        torch.testing.assert_close(out[c], x[start:end].mean(0).expand(2, -1), **OUT_TOL[F32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_large_logits_are_stable(backend, dtype, gen):
    """Logits of several hundred: a kernel without the max shift overflows exp."""
    x, q, offsets = make_inputs("ragged_empty", 16, 2, dtype, gen, x_scale=40.0)
    out = mk.cls_pool(x, q, offsets, 4.0, backend=backend)
    assert torch.isfinite(out).all()
    check_pooled(out, x, q, offsets, 4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_attention(backend):
    """Exactly checkable: one row dominates the softmax of its chunk."""
    x = torch.zeros(6, 4)
    x[:, 0] = torch.tensor([0.0, 50.0, 0.0, 0.0, 0.0, 50.0])
    x[:, 1:] = torch.arange(18, dtype=F32).reshape(6, 3)
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    offsets = torch.tensor([0, 3, 6])
    out = mk.cls_pool(x, q, offsets, 1.0, backend=backend)
    torch.testing.assert_close(out[:, 0], x[[1, 5]], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x_transposed", "x_strided", "q_strided", "offsets_strided"])
def test_non_contiguous(backend, which, gen):
    x, q, offsets = make_inputs("ragged_empty", 9, 2, F32, gen)
    args = {"x": x, "q": q, "offsets": offsets}
    name, how = which.split("_")
    args[name] = transposed(args[name]) if how == "transposed" else strided(args[name])
    assert not args[name].is_contiguous()
    out = mk.cls_pool(args["x"], args["q"], args["offsets"], backend=backend)
    check_pooled(out, x, q, offsets, 9**-0.5)


# ------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("layout", ["ragged_empty", "first_empty"])
@pytest.mark.parametrize("H", [1, 3])
def test_gradcheck_cpu(layout, H, gen):
    lengths, before, after = LAYOUTS[layout]
    lengths = [min(n, 4) for n in lengths]  # keep gradcheck small
    offsets = make_offsets(lengths, start=before)
    N, D = int(offsets[-1]) + after, 3
    x = randn((N, D), F64, gen).requires_grad_()
    q = randn((H, D), F64, gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, q: mk.cls_pool(x, q, offsets, 0.7, backend="cpu"), (x, q), eps=1e-6, atol=1e-7
    )


def _grads(fn, x, q, grad_out):
    x = x.detach().requires_grad_()
    q = q.detach().requires_grad_()
    out = fn(x, q)
    gx, gq = torch.autograd.grad(out, (x, q), grad_out)
    return out, gx, gq


GRAD_CASES = {
    # 11 and 9 heads: more than one pass of the CPU kernel's accumulator update (8 heads)
    "cpu": [("ragged_empty", 33, 3), ("many_small", 100, 2), ("one_long", 5, 1), ("no_chunks", 4, 2),
            ("one_long", 100, 11), ("many_small", 33, 9)],
    "triton": [("ragged_empty", 5, 2), ("first_empty", 33, 1)],
}


@pytest.mark.parametrize(
    "backend, layout, D, H",
    [param(b, *c) for b in BACKENDS for c in GRAD_CASES[b]],
)
def test_grad_float32_vs_reference(backend, layout, D, H, gen):
    x, q, offsets = make_inputs(layout, D, H, F32, gen)
    grad_out = randn((offsets.numel() - 1, H, D), F32, gen)
    _out, gx, gq = _grads(lambda x, q: mk.cls_pool(x, q, offsets, backend=backend), x, q, grad_out)
    _, rgx, rgq = _grads(lambda x, q: reference.cls_pool(x, q, offsets), x, q, grad_out)
    assert_no_poison(gx, "grad x")
    assert_no_poison(gq, "grad q")
    torch.testing.assert_close(gx, rgx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gq, rgq, atol=1e-5, rtol=1e-4)
    # Rows outside every chunk get no gradient.
    _lengths, before, after = LAYOUTS[layout]
    assert torch.equal(gx[:before], torch.zeros_like(gx[:before]))
    if after:
        assert torch.equal(gx[-after:], torch.zeros_like(gx[-after:]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_grad_low_precision_error_budget(backend, dtype, gen):
    x, q, offsets = make_inputs("ragged_empty", 16, 2, dtype, gen)
    grad_out = randn((offsets.numel() - 1, 2, 16), dtype, gen)
    _, gx, gq = _grads(lambda x, q: mk.cls_pool(x, q, offsets, backend=backend), x, q, grad_out)
    _, lgx, lgq = _grads(lambda x, q: reference.cls_pool(x, q, offsets), x, q, grad_out)
    _, egx, egq = _grads(lambda x, q: reference.cls_pool(x, q, offsets), x.double(), q.double(), grad_out.double())
    assert gx.dtype == dtype and gq.dtype == dtype
    assert_error_budget(gx, lgx, egx, name="grad x")
    assert_error_budget(gq, lgq, egq, name="grad q")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_one_input(backend, gen):
    """Only q (the learned CLS query) requires grad; only x requires grad."""
    x, q, offsets = make_inputs("ragged_empty", 6, 2, F32, gen)
    qg = q.clone().requires_grad_()
    mk.cls_pool(x, qg, offsets, backend=backend).square().sum().backward()
    qr = q.clone().requires_grad_()
    reference.cls_pool(x, qr, offsets).square().sum().backward()
    torch.testing.assert_close(qg.grad, qr.grad, atol=1e-5, rtol=1e-4)
    xg = x.clone().requires_grad_()
    mk.cls_pool(xg, q, offsets, backend=backend).sum().backward()
    xr = x.clone().requires_grad_()
    reference.cls_pool(xr, q, offsets).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_layout", ["expanded", "permuted"])
def test_grad_non_contiguous_upstream(backend, grad_layout, gen):
    """The upstream gradient may be an expanded (stride 0) or permuted view."""
    x, q, offsets = make_inputs("ragged_empty", 6, 2, F32, gen)
    C = offsets.numel() - 1
    if grad_layout == "expanded":
        grad_out = torch.ones(1, 1, 1).expand(C, 2, 6)
    else:
        grad_out = randn((6, C, 2), F32, gen).permute(1, 2, 0)
    assert not grad_out.is_contiguous()
    _, gx, gq = _grads(lambda x, q: mk.cls_pool(x, q, offsets, backend=backend), x, q, grad_out)
    _, rgx, rgq = _grads(lambda x, q: reference.cls_pool(x, q, offsets), x, q, grad_out.contiguous())
    torch.testing.assert_close(gx, rgx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gq, rgq, atol=1e-5, rtol=1e-4)
