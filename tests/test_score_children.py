"""score_children (SPEC 4.3): values and gradients of every backend vs the reference."""

import pytest
import torch
from testing_utils import (
    BACKENDS,
    BF16,
    F16,
    F32,
    F64,
    assert_no_poison,
    assert_scores_close,
    dtypes_for,
    make_keys,
    make_mask,
    make_parents,
    make_probes,
    num_parents,
    param,
    randn,
    score_tol,
    strided,
    transposed,
)

import mllm_kernels as mk
from mllm_kernels import reference

REDUCES = ["max", "lse"]

# (B, P, D, N, fanout, T)
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (3, 4, 5, 20, 3, 4),
    (2, 2, 33, 50, 7, 5),
    (4, 3, 100, 130, 64, 3),
    (2, 5, 384, 29, 3, 6),
    (1, 8, 17, 200, 1, 9),
    (3, 2, 8, 10, 64, 2),  # one parent, fewer children than fanout
]
TRITON_SHAPES = [
    (2, 3, 5, 20, 3, 4),
    (2, 2, 33, 17, 7, 3),
    (1, 1, 1, 3, 1, 2),
    (2, 4, 100, 130, 64, 3),
    (1, 2, 384, 29, 3, 6),
]


def check(backend, probes, keys, parents, fanout, reduce="max", mask=None, **call):
    scores, ids = mk.score_children(probes, keys, parents, fanout, reduce, mask, backend=backend)
    ref_scores, ref_ids = reference.score_children(probes, keys, parents, fanout, reduce, mask)
    assert ids.dtype == torch.int64
    assert_no_poison(ids, "child_ids")
    assert torch.equal(ids, ref_ids), f"child_ids {ids} != reference {ref_ids}"
    assert_scores_close(scores, ref_scores, **score_tol(probes, keys))
    return scores, ids


def _params():
    out = []
    for backend in BACKENDS:
        shapes = CPU_SHAPES if backend == "cpu" else TRITON_SHAPES
        for shape in shapes:
            for reduce in REDUCES:
                out.append(param(backend, F32, reduce, shape))
        for dtype in dtypes_for(backend):
            if dtype != F32:
                out.append(param(backend, dtype, "lse", shapes[1]))
                out.append(param(backend, dtype, "max", shapes[2]))
    return out


@pytest.mark.parametrize(
    "backend, dtype, reduce, shape",
    _params(),
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_values(backend, dtype, reduce, shape, masked, gen):
    B, P, D, N, fanout, T = shape
    probes = make_probes(B, P, D, dtype, gen)
    keys = make_keys(N, D, dtype, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    parents[0, -1] = num_parents(N, fanout) - 1  # the last parent, maybe with fewer children
    mask = make_mask(N, gen) if masked else None
    check(backend, probes, keys, parents, fanout, reduce, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keys_dtype", [F16, BF16], ids=str)
def test_mixed_dtypes(backend, keys_dtype, gen):
    """float32 probes (from the model) with keys stored in half precision (SPEC 3)."""
    probes = make_probes(2, 3, 33, F32, gen)
    keys = make_keys(40, 33, keys_dtype, gen)
    parents = make_parents(2, 4, num_parents(40, 7), gen)
    for reduce in REDUCES:
        scores, _ = check(backend, probes, keys, parents, 7, reduce)
        assert scores.dtype == F32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, T, N",
    [(0, 3, 10), (2, 0, 10), (2, 3, 0), (0, 0, 0)],
    ids=["B0", "T0", "N0", "all0"],
)
def test_empty(backend, B, T, N, gen):
    fanout = 3
    probes = make_probes(B, 2, 4, F32, gen)
    keys = make_keys(N, 4, F32, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    scores, ids = check(backend, probes, keys, parents, fanout)
    assert scores.shape == ids.shape == (B, T * fanout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_invalid_slots(backend, reduce, gen):
    """Empty parents, children past N and masked children are -1 / -inf; a full mask hides all."""
    N, fanout = 10, 4
    probes = make_probes(2, 2, 6, F32, gen)
    keys = make_keys(N, 6, F32, gen)
    parents = torch.tensor([[2, -1, 0], [-1, -1, -1]])
    scores, ids = check(backend, probes, keys, parents, fanout, reduce)
    assert ids[0].tolist() == [8, 9, -1, -1, -1, -1, -1, -1, 0, 1, 2, 3]
    assert (ids[1] == -1).all() and (scores[1] == -torch.inf).all()
    mask = torch.zeros(N, dtype=torch.bool)
    scores, ids = check(backend, probes, keys, parents, fanout, reduce, mask)
    assert (ids == -1).all() and (scores == -torch.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_nan_keys(backend, reduce, gen):
    """A NaN key scores NaN (unless masked); its neighbours are unaffected."""
    N, fanout = 12, 3
    probes = make_probes(2, 3, 5, F32, gen)
    keys = make_keys(N, 5, F32, gen)
    keys[4, 2] = torch.nan
    keys[7] = torch.nan
    parents = torch.tensor([[1, 2, 3], [0, 2, -1]])
    scores, ids = check(backend, probes, keys, parents, fanout, reduce)
    assert torch.isnan(scores[0, [1, 4]]).all()
    mask = torch.ones(N, dtype=torch.bool)
    mask[7] = False
    scores, ids = check(backend, probes, keys, parents, fanout, reduce, mask)
    assert ids[0, 4] == -1 and scores[0, 4] == -torch.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_single_probe_equals_max(backend, gen):
    probes = make_probes(2, 1, 9, F32, gen)
    keys = make_keys(30, 9, F32, gen)
    parents = make_parents(2, 4, num_parents(30, 5), gen)
    s_max, _ = mk.score_children(probes, keys, parents, 5, "max", backend=backend)
    s_lse, _ = mk.score_children(probes, keys, parents, 5, "lse", backend=backend)
    assert_scores_close(s_lse, s_max, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_large_scores_are_stable(backend, gen):
    """Dot products in the thousands: exp without the max shift overflows."""
    probes = make_probes(2, 4, 16, F32, gen) * 300
    keys = make_keys(20, 16, F32, gen)
    parents = make_parents(2, 3, num_parents(20, 3), gen, p_empty=0)
    scores, ids = check(backend, probes, keys, parents, 3, "lse")
    assert torch.isfinite(scores[ids >= 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "which", ["probes_transposed", "keys_transposed", "keys_strided", "parents_strided", "mask_strided"]
)
def test_non_contiguous(backend, which, gen):
    N, fanout = 25, 4
    args = {
        "probes": make_probes(2, 3, 7, F32, gen),
        "keys": make_keys(N, 7, F32, gen),
        "parents": make_parents(2, 3, num_parents(N, fanout), gen),
        "mask": make_mask(N, gen),
    }
    name, how = which.split("_")
    view = transposed(args[name]) if how == "transposed" else strided(args[name])
    assert not view.is_contiguous()
    call = {**args, name: view}
    scores, ids = mk.score_children(
        call["probes"], call["keys"], call["parents"], fanout, "lse", call["mask"], backend=backend
    )
    ref_scores, ref_ids = reference.score_children(
        args["probes"], args["keys"], args["parents"], fanout, "lse", args["mask"]
    )
    assert torch.equal(ids, ref_ids)
    assert_scores_close(scores, ref_scores, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck_cpu(reduce, masked, gen):
    N, fanout, D = 11, 3, 4
    probes = randn((2, 3, D), F64, gen).requires_grad_()
    keys = randn((N, D), F64, gen).requires_grad_()
    # -1 parents, a duplicated parent (its children are scored twice) and the partial last parent.
    parents = torch.tensor([[0, 3, -1, 0], [2, -1, 1, 3]])
    mask = make_mask(N, gen, p_keep=0.6) if masked else None

    def fn(probes, keys):
        scores, _ = mk.score_children(probes, keys, parents, fanout, reduce, mask, backend="cpu")
        return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))

    assert torch.autograd.gradcheck(fn, (probes, keys), eps=1e-6, atol=1e-7)


def _grads(fn, probes, keys, grad):
    probes = probes.detach().requires_grad_()
    keys = keys.detach().requires_grad_()
    scores, _ = fn(probes, keys)
    gp, gk = torch.autograd.grad(scores, (probes, keys), grad)
    return gp, gk


GRAD_SHAPES = {"cpu": [(3, 4, 33, 50, 7, 5), (2, 2, 100, 130, 64, 3)], "triton": [(2, 3, 5, 20, 3, 4)]}


@pytest.mark.parametrize("backend, shape", [param(b, s) for b in BACKENDS for s in GRAD_SHAPES[b]])
@pytest.mark.parametrize("reduce", REDUCES)
def test_grad_float32_vs_reference(backend, shape, reduce, gen):
    B, P, D, N, fanout, T = shape
    probes = make_probes(B, P, D, F32, gen)
    keys = make_keys(N, D, F32, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_dup=0.3)
    mask = make_mask(N, gen)
    # The upstream gradient of invalid (-inf) slots must be ignored, whatever it holds.
    grad = randn((B, T * fanout), F32, gen)
    gp, gk = _grads(
        lambda p, k: mk.score_children(p, k, parents, fanout, reduce, mask, backend=backend), probes, keys, grad
    )
    rgp, rgk = _grads(lambda p, k: reference.score_children(p, k, parents, fanout, reduce, mask), probes, keys, grad)
    assert_no_poison(gp, "grad probes")
    assert_no_poison(gk, "grad keys")
    torch.testing.assert_close(gp, rgp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gk, rgk, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_half_keys(backend, gen):
    """Training a ranker on half-precision keys: gradients come back in the keys' dtype."""
    probes = make_probes(2, 3, 8, F32, gen)
    keys = make_keys(20, 8, F16, gen)
    parents = make_parents(2, 3, num_parents(20, 4), gen)
    grad = randn((2, 12), F32, gen)
    gp, gk = _grads(lambda p, k: mk.score_children(p, k, parents, 4, "lse", backend=backend), probes, keys, grad)
    rgp, rgk = _grads(lambda p, k: reference.score_children(p, k, parents, 4, "lse"), probes, keys, grad)
    assert gp.dtype == F32 and gk.dtype == F16
    torch.testing.assert_close(gp, rgp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gk, rgk, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_layout", ["expanded", "transposed"])
def test_grad_non_contiguous_upstream(backend, grad_layout, gen):
    """An expanded (stride 0, e.g. from .sum()) or transposed upstream gradient."""
    N, fanout = 20, 4
    probes = make_probes(2, 3, 6, F32, gen)
    keys = make_keys(N, 6, F32, gen)
    parents = make_parents(2, 3, num_parents(N, fanout), gen)
    if grad_layout == "expanded":
        grad = torch.ones(1, 1).expand(2, 12)
    else:
        grad = randn((12, 2), F32, gen).T
    assert not grad.is_contiguous()
    gp, gk = _grads(lambda p, k: mk.score_children(p, k, parents, fanout, "lse", backend=backend), probes, keys, grad)
    rgp, rgk = _grads(lambda p, k: reference.score_children(p, k, parents, fanout, "lse"), probes, keys, grad)
    torch.testing.assert_close(gp, rgp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gk, rgk, atol=1e-5, rtol=1e-4)
