"""int8 keys with one float32 scale per row (issue 5, item 3): quantize_keys, and
score_children / descend / descend_tree of every backend against the reference.

The oracle of the scores is the float reference on the dequantised keys
(``key_scales[n] * keys[n]``): the int8 path of every backend, the reference's included, must
score exactly what the dequantised float keys score, up to the float32 summation order.
"""

import random

import pytest
import torch
from testing_utils import (
    ALL_BACKENDS,
    BACKENDS,
    BF16,
    F16,
    F32,
    F64,
    TRITON_DEVICE,
    assert_no_poison,
    assert_scores_close,
    assert_topk_equal,
    make_keys,
    make_mask,
    make_parents,
    make_probes,
    num_parents,
    param,
    randn,
    score_tol,
    strided,
    to_device,
    torch_threads,
)

import mllm_kernels as mk
from mllm_kernels import quantize, reference
from mllm_kernels.reference import dequantize_keys

I8 = torch.int8
REDUCES = ["max", "lse"]


def make_int8_keys(N, D, gen, zero_rows=True):
    """Quantised standard-normal keys (scores O(1) with make_probes), some rows all zero."""
    keys = make_keys(N, D, F32, gen)
    if zero_rows and N > 2:
        keys[N // 2] = 0.0
    return mk.quantize_keys(keys)


def exact_candidates(probes, q, scales, parents, fanout, reduce, mask):
    """Every candidate's float64 score: ``(ids, scores)`` for assert_topk_equal."""
    scores, ids = reference.score_children(
        probes.double(), dequantize_keys(q, scales, F64), parents, fanout, reduce, mask
    )
    return ids, scores


# ------------------------------------------------------------------------------------------
# quantize_keys


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
def test_quantize_round_trip(dtype, gen):
    keys = randn((37, 19), dtype, gen, scale=3.0)
    keys[5] = 0.0  # an all-zero row
    keys[9, 4] = -keys[9].abs().max() * 2  # the row's extreme value is negative
    q, scales = mk.quantize_keys(keys)
    assert q.dtype == I8 and q.shape == keys.shape and scales.dtype == F32 and scales.shape == (37,)
    x = keys.double()
    absmax = x.abs().amax(1)
    torch.testing.assert_close(scales.double(), absmax / 127, atol=0, rtol=2**-23)
    assert q.abs().max() <= 127
    assert (q.abs().amax(1)[absmax > 0] == 127).all(), "each nonzero row's extreme maps to +-127"
    assert q[9, 4] == -127
    assert scales[5] == 0 and (q[5] == 0).all()
    err = (x - dequantize_keys(q, scales, F64)).abs()
    bound = scales.double()[:, None] * (0.5 + 1e-4)
    assert (err <= bound).all(), f"round trip error {(err - bound).max()} above scale / 2"
    # Quantising the dequantised keys gives the same codes back.
    q2, scales2 = mk.quantize_keys(dequantize_keys(q, scales, F32))
    assert torch.equal(q2, q)
    torch.testing.assert_close(scales2, scales, atol=0, rtol=2**-22)


def test_quantize_in_blocks(gen, monkeypatch):
    """Levels are quantised a block of rows at a time: same codes as in one block."""
    keys = randn((50, 7), F32, gen)
    whole = mk.quantize_keys(keys)
    monkeypatch.setattr(quantize, "_BLOCK_ELEMENTS", 3 * 7)
    blocks = mk.quantize_keys(keys)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


def test_quantize_edge_shapes():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        q, scales = mk.quantize_keys(torch.randn(shape))
        assert q.shape == shape and q.dtype == I8 and scales.shape == (shape[0],) and (scales == 0).all()
    q, scales = mk.quantize_keys(transposed_keys := torch.randn(6, 4).T)  # non-contiguous
    assert torch.equal(q, mk.quantize_keys(transposed_keys.contiguous())[0])


@pytest.mark.parametrize(
    "keys, exc",
    [
        (torch.ones(3, 4, dtype=torch.int64), TypeError),
        (torch.ones(3, 4, dtype=I8), TypeError),
        (torch.ones(4), ValueError),
        (torch.ones(2, 3, 4), ValueError),
        (torch.tensor([[1.0, float("nan")]]), ValueError),
        (torch.tensor([[1.0], [float("inf")]]), ValueError),
        (torch.tensor([[1e300, 1.0]], dtype=F64), ValueError),  # the scale overflows float32
        ([[1.0, 2.0]], TypeError),
    ],
    ids=["int64", "int8", "1d", "3d", "nan", "inf", "f64_overflow", "list"],
)
def test_quantize_errors(keys, exc):
    with pytest.raises(exc, match="quantize_keys: keys"):
        mk.quantize_keys(keys)


# ------------------------------------------------------------------------------------------
# score_children

# (B, P, D, N, fanout, T)
SCORE_SHAPES = {
    "cpu": [
        (1, 1, 1, 1, 1, 1),
        (3, 4, 5, 20, 3, 4),  # odd D below one vector
        (2, 2, 33, 50, 7, 5),  # vectors plus a tail
        (1, 3, 384, 29, 3, 6),
        (4, 3, 100, 130, 64, 3),  # N not a multiple of fanout: a partial last parent
        (2, 1, 16, 10, 64, 2),  # one parent with fewer children than fanout
    ],
    "triton": [(2, 3, 5, 20, 3, 4), (1, 2, 33, 17, 7, 3), (2, 1, 1, 3, 1, 2)],
    "reference": [(3, 4, 5, 20, 3, 4), (2, 2, 33, 50, 7, 5)],
}


def check_scores(backend, probes, q, scales, parents, fanout, reduce="max", mask=None):
    scores, ids = mk.score_children(probes, q, parents, fanout, reduce, mask, scales, backend=backend)
    acc = reference.compute_dtype(probes, q)
    ref_scores, ref_ids = reference.score_children(
        probes, dequantize_keys(q, scales, acc), parents, fanout, reduce, mask
    )
    assert_no_poison(ids, "child_ids")
    assert torch.equal(ids, ref_ids), f"child_ids {ids} != reference {ref_ids}"
    assert_scores_close(scores, ref_scores, **score_tol(probes))
    return scores, ids


@pytest.mark.parametrize("backend, shape", [param(b, s) for b in ALL_BACKENDS for s in SCORE_SHAPES[b]])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_score_children(backend, shape, reduce, masked, gen):
    B, P, D, N, fanout, T = shape
    probes = make_probes(B, P, D, F32, gen)
    q, scales = make_int8_keys(N, D, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    parents[0, -1] = num_parents(N, fanout) - 1  # the last parent, maybe with fewer children
    mask = make_mask(N, gen) if masked else None
    check_scores(backend, probes, q, scales, parents, fanout, reduce, mask)


@pytest.mark.parametrize(
    "backend, probes_dtype",
    [
        param("cpu", F16),
        param("cpu", BF16),
        param("cpu", F64),
        param("triton", F16),
        param("triton", BF16),
        param("reference", F64),
    ],
)
def test_score_children_probe_dtypes(backend, probes_dtype, gen):
    probes = make_probes(2, 3, 21, probes_dtype, gen)
    q, scales = make_int8_keys(40, 21, gen)
    parents = make_parents(2, 4, num_parents(40, 7), gen)
    scores, _ = check_scores(backend, probes, q, scales, parents, 7, "lse")
    assert scores.dtype == (F64 if probes_dtype == F64 else F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_applied_before_the_reduction(backend):
    """Negative and zero scales: max_p(s * dot_p) is not s * max_p(dot_p), nor lse."""
    probes = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    q = torch.tensor([[3, 0], [3, 0], [3, 0]], dtype=I8)
    scales = torch.tensor([1.0, -1.0, 0.0])
    for reduce in REDUCES:
        scores, _ = check_scores(backend, probes, q, scales, torch.tensor([[0]]), 3, reduce)
        if reduce == "max":
            assert scores[0].tolist() == [3.0, 6.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_children_non_contiguous(backend, gen):
    probes = make_probes(2, 3, 9, F32, gen)
    q, scales = make_int8_keys(25, 9, gen)
    parents = make_parents(2, 3, num_parents(25, 4), gen)
    q_view, scales_view = q.T.contiguous().T, strided(scales)
    assert not q_view.is_contiguous() and not scales_view.is_contiguous()
    out = mk.score_children(probes, q_view, parents, 4, "lse", None, scales_view, backend=backend)
    expected = mk.score_children(probes, q, parents, 4, "lse", None, scales, backend=backend)
    assert torch.equal(out[1], expected[1])
    torch.testing.assert_close(out[0], expected[0], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Gradients: probes only


def _probe_grad(fn, probes, grad):
    probes = probes.detach().requires_grad_()
    scores, _ = fn(probes)
    return torch.autograd.grad(scores, probes, grad)[0]


@pytest.mark.parametrize(
    "backend, shape",
    [param("cpu", (3, 4, 33, 50, 7, 5)), param("cpu", (2, 2, 100, 130, 64, 3)), param("triton", (2, 3, 5, 20, 3, 4))],
)
@pytest.mark.parametrize("reduce", REDUCES)
def test_probe_grad_vs_reference(backend, shape, reduce, gen):
    B, P, D, N, fanout, T = shape
    probes = make_probes(B, P, D, F32, gen)
    q, scales = make_int8_keys(N, D, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_dup=0.3)
    mask = make_mask(N, gen)
    grad = randn((B, T * fanout), F32, gen)
    gp = _probe_grad(
        lambda p: mk.score_children(p, q, parents, fanout, reduce, mask, scales, backend=backend), probes, grad
    )
    float_keys = dequantize_keys(q, scales)
    rgp = _probe_grad(lambda p: reference.score_children(p, float_keys, parents, fanout, reduce, mask), probes, grad)
    assert_no_poison(gp, "grad probes")
    torch.testing.assert_close(gp, rgp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reduce", REDUCES)
def test_gradcheck_probes_cpu(reduce, gen):
    probes = randn((2, 3, 4), F64, gen).requires_grad_()
    q, scales = make_int8_keys(11, 4, gen)
    parents = torch.tensor([[0, 3, -1, 0], [2, -1, 1, 3]])  # -1, a duplicate, the partial last parent
    mask = make_mask(11, gen, p_keep=0.6)

    def fn(probes):
        scores, _ = mk.score_children(probes, q, parents, 3, reduce, mask, scales, backend="cpu")
        return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))

    assert torch.autograd.gradcheck(fn, (probes,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scales_requiring_grad_are_refused(backend, gen):
    probes = make_probes(2, 2, 6, F32, gen).requires_grad_()
    q, scales = make_int8_keys(12, 6, gen)
    parents = torch.tensor([[0, 1], [3, -1]])
    with pytest.raises(RuntimeError, match="key_scales"):
        mk.score_children(probes, q, parents, 3, "max", None, scales.requires_grad_(), backend=backend)
    # Without grad mode there is nothing to refuse.
    with torch.no_grad():
        mk.score_children(probes, q, parents, 3, "max", None, scales, backend=backend)


# ------------------------------------------------------------------------------------------
# descend

# (B, P, D, N, fanout, T, t)
DESCEND_SHAPES = {
    "cpu": [
        (1, 1, 1, 1, 1, 1, 1),
        (3, 4, 5, 20, 3, 4, 5),
        (2, 2, 33, 50, 7, 5, 10),
        (4, 3, 100, 130, 64, 3, 20),
        (1, 5, 384, 29, 3, 6, 4),
        (2, 3, 8, 10, 3, 2, 20),  # t larger than the candidates
        (5, 2, 24, 4096, 64, 64, 50),  # thousands of candidates per row
    ],
    "triton": [(2, 3, 5, 20, 3, 4, 5), (1, 2, 33, 17, 7, 3, 25), (2, 1, 16, 130, 16, 8, 12)],
    "reference": [(3, 4, 5, 20, 3, 4, 5), (2, 3, 8, 10, 3, 2, 20)],
}


def check_descend(backend, probes, q, scales, parents, fanout, t, reduce="max", mask=None):
    ids, scores = mk.descend(probes, q, parents, fanout, t, reduce, mask, scales, backend=backend)
    acc = reference.compute_dtype(probes, q)
    ref_ids, ref_scores = reference.descend(probes, dequantize_keys(q, scales, acc), parents, fanout, t, reduce, mask)
    cand = exact_candidates(probes, q, scales, parents, fanout, reduce, mask)
    assert_topk_equal(ids, scores, ref_ids, ref_scores, candidates=cand, **score_tol(probes))
    return ids, scores


@pytest.mark.parametrize("backend, shape", [param(b, s) for b in ALL_BACKENDS for s in DESCEND_SHAPES[b]])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_descend(backend, shape, reduce, masked, gen):
    B, P, D, N, fanout, T, t = shape
    probes = make_probes(B, P, D, F32, gen)
    q, scales = make_int8_keys(N, D, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)  # -1 slots and duplicated parents
    parents[0, -1] = num_parents(N, fanout) - 1
    mask = make_mask(N, gen) if masked else None
    check_descend(backend, probes, q, scales, parents, fanout, t, reduce, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_fanout(backend, gen):
    """fanout far beyond N: parent 0 owns every node, as with fanout = N; nothing may be sized or
    looped by fanout (the reference is: it materialises T * fanout slots)."""
    N = 300
    q, scales = make_int8_keys(N, 6, gen)
    probes = make_probes(2, 2, 6, F32, gen)
    parents = torch.tensor([[0], [-1]])
    ids, scores = mk.descend(probes, q, parents, 2**40, 3, key_scales=scales, backend=backend)
    ref_ids, ref_scores = reference.descend(probes, dequantize_keys(q, scales), parents, N, 3)
    assert_topk_equal(ids, scores, ref_ids, ref_scores)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_descend_ties_exact(backend, gen):
    """Integer probes, keys and power-of-two scales: exact scores, many ties, smaller id first."""
    q = torch.randint(-2, 3, (40, 3), generator=gen).to(I8)
    scales = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (40,), generator=gen)]
    probes = torch.randint(-1, 2, (3, 2, 3), generator=gen).to(F32)
    parents = torch.tensor([[0, 1, 2, 3], [4, 4, -1, 5], [7, 6, 5, 4]])
    ids, scores = mk.descend(probes, q, parents, 5, 9, "max", None, scales, backend=backend)
    ref_ids, ref_scores = reference.descend(probes, dequantize_keys(q, scales), parents, 5, 9, "max")
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_descend_matches_float_keys_on_exact_values(backend, gen):
    """Keys that int8 represents exactly: same result as the float32 keys they stand for."""
    q, scales = make_int8_keys(300, 16, gen)
    float_keys = dequantize_keys(q, scales)
    probes = make_probes(4, 2, 16, F32, gen)
    parents = make_parents(4, 3, num_parents(300, 16), gen, p_empty=0.0, p_dup=0.0)
    ids, scores = mk.descend(probes, q, parents, 16, 7, key_scales=scales, backend=backend)
    f_ids, f_scores = mk.descend(probes, float_keys, parents, 16, 7, backend=backend)
    assert_topk_equal(ids, scores, f_ids, f_scores)


# ------------------------------------------------------------------------------------------
# The CPU int8 screen: exactly the same result as scoring every row
#
# With AVX2 or AVX-512 VNNI the CPU descent bounds each int8 row's score from above and below
# from the probes rounded to integer digits, and skips rows whose upper bound is below the t-th
# best lower bound. Its result must be bit for bit the top t of score_children's scores, which
# the same float32 arithmetic computes without skipping. Rows that share their parents (4 rows
# per parent or more) are scored together without the screen: the same bits.


def _cpu_top_without_screen(probes, q, scales, parents, fanout, t, reduce, mask):
    unique = reference._drop_duplicate_parents(parents)
    scores, ids = mk.score_children(probes, q, unique, fanout, reduce, mask, scales, backend="cpu")
    return reference._select_top(scores, ids, t)


def _check_screen(probes, q, scales, parents, fanout, t, reduce, mask=None):
    """The batch, and each row alone: rows that share their parents enough are scored together
    without the screen, a row alone goes through it (where more than 4t children make it pay)."""
    exp_ids, exp_scores = _cpu_top_without_screen(probes, q, scales, parents, fanout, t, reduce, mask)
    ids, scores = mk.descend(probes, q, parents, fanout, t, reduce, mask, scales, backend="cpu")
    assert torch.equal(ids, exp_ids), f"{ids} != {exp_ids}"
    assert torch.equal(scores, exp_scores), f"{scores} != {exp_scores}"
    for b in range(probes.shape[0]):
        ids, scores = mk.descend(probes[b : b + 1], q, parents[b : b + 1], fanout, t, reduce, mask, scales, backend="cpu")
        assert torch.equal(ids[0], exp_ids[b]), f"row {b}: {ids[0]} != {exp_ids[b]}"
        assert torch.equal(scores[0], exp_scores[b]), f"row {b}: {scores[0]} != {exp_scores[b]}"


@pytest.mark.parametrize("P", [1, 4, 9])  # whole and partial blocks of probes (2 with VNNI, 4 with AVX2)
@pytest.mark.parametrize("D", [1, 64, 200])  # whole and partial 64-byte chunks
@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_screen_is_exact(P, D, reduce, gen):
    N, fanout, B, T = 1500, 64, 3, 12
    probes = make_probes(B, P, D, F32, gen)
    q, scales = make_int8_keys(N, D, gen)
    scales[::7] *= -1  # negative scales flip the bound
    scales[5::11] = 0.0
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_empty=0.1, p_dup=0.1)
    mask = make_mask(N, gen, p_keep=0.8) if D % 2 else None
    for t in (1, 7, 40):
        _check_screen(probes, q, scales, parents, fanout, t, reduce, mask)


@pytest.mark.parametrize("P", [1, 3, 4, 8])
@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_screen_exact_ties(P, reduce, gen):
    """Integer data: many exactly equal scores; the smaller id must win every tie."""
    N, fanout, D = 2000, 50, 70
    rows = torch.randint(-3, 4, (4, D), generator=gen).to(I8)
    q = rows[torch.randint(0, 4, (N,), generator=gen)]
    scales = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (N,), generator=gen)]
    probes = torch.randint(-2, 3, (4, P, D), generator=gen).to(F32)
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:20] for _ in range(4)])
    for t in (3, 25):
        _check_screen(probes, q, scales, parents, fanout, t, reduce)


@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_rows_sharing_parents_without_screen(P, reduce, gen):
    """With few children per t (at most 4t), or many rows per parent (here 6 to 12), int8 rows skip
    the screen, and rows that share parents are scored together (scaled dots against each row's
    t-th score), on one thread and two: the same bits as scoring each row alone (through the
    screen where it has more than 4t children). Small integers (exact ties), negative, zero and
    non-finite scales, masked children, empty and repeated parents."""
    B, D, N, fanout, T = 24, 12, 45, 8, 3  # 6 parents, the last one short
    q = torch.randint(-3, 4, (N, D), generator=gen).to(I8)
    scales = torch.tensor([0.5, 1.0, -2.0, 0.0])[torch.randint(0, 4, (N,), generator=gen)]
    scales[7], scales[20], scales[33] = torch.inf, -torch.inf, torch.nan
    probes = torch.randint(-2, 3, (B, P, D), generator=gen).to(F32)
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_empty=0.1, p_dup=0.1)
    mask = make_mask(N, gen, p_keep=0.8)
    for num_threads in (1, 2):
        with torch_threads(num_threads):
            for t in (2, 6, 24):  # 3 * 8 children: > 4 t, <= 4 t
                for m in (None, mask):
                    _check_screen(probes, q, scales, parents, fanout, t, reduce, m)


@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_screen_all_rows_tie(reduce, gen):
    """Every row the same: no bound rules a row out, so the screen's list of candidates grows past
    its pruning limit, and the t smallest ids must win. An all-zero probe row gives bounds equal
    to the scores (all 0): a tie with the threshold must keep the row."""
    N, fanout, D = 3000, 64, 33
    q = torch.randint(-127, 128, (1, D), generator=gen).to(I8).expand(N, D).contiguous()
    scales = torch.full((N,), 0.25)
    probes = make_probes(3, 2, D, F32, gen)
    probes[2] = 0.0
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:40] for _ in range(3)])
    for t in (1, 8):
        _check_screen(probes, q, scales, parents, fanout, t, reduce)


@pytest.mark.parametrize("P", [1, 4, 6])
@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_screen_near_ties(P, reduce, gen):
    """Rows one int8 unit apart: score gaps far below the error of the probes' int8 rounding,
    so only a correct error bound keeps the screen exact."""
    N, fanout, D = 1500, 64, 64
    base = torch.randint(-100, 101, (D,), generator=gen)
    q = base.repeat(N, 1)
    q[torch.arange(N), torch.randint(0, D, (N,), generator=gen)] += torch.randint(-1, 2, (N,), generator=gen)
    q = q.to(I8)
    scales = torch.where(torch.rand(N, generator=gen) < 0.3, -1.0, 1.0)
    probes = make_probes(3, P, D, F32, gen)
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:16] for _ in range(3)])
    for t in (1, 5, 30):
        _check_screen(probes, q, scales, parents, fanout, t, reduce)


@pytest.mark.parametrize("P", [1, 4])
@pytest.mark.parametrize("reduce", REDUCES)
def test_cpu_screen_full_int8_range(P, reduce, gen):
    """Keys quantised elsewhere may hold -128, which quantize_keys never writes: rows of -128s
    and 127s, one unit apart, must still be screened exactly (the bound allows |q| = 128)."""
    N, fanout, D = 1200, 64, 48
    base = torch.where(torch.rand(D, generator=gen) < 0.5, -128, 127)
    q = base.repeat(N, 1)
    moved = torch.randint(0, D, (N,), generator=gen)
    q[torch.arange(N), moved] -= torch.sign(base[moved])  # one unit towards zero
    q = q.to(I8)
    assert (q == -128).any() and (q == 127).any()
    scales = torch.where(torch.rand(N, generator=gen) < 0.3, -1.0, 1.0)
    probes = make_probes(3, P, D, F32, gen)
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:16] for _ in range(3)])
    for t in (1, 6, 30):
        _check_screen(probes, q, scales, parents, fanout, t, reduce)


@pytest.mark.parametrize("P", [1, 2])  # one probe: two digits per element with VNNI
def test_cpu_screen_edge_values(P, gen):
    """Non-finite scales (never skipped), huge and tiny probes (down to where a probe's remainder
    would be subnormal), an all-zero probe, a NaN probe."""
    N, fanout, D = 1200, 64, 40
    q, scales = make_int8_keys(N, D, gen)
    scales[3] = float("inf")
    scales[70] = float("-inf")
    scales[130] = float("nan")
    scales[200:260] = 1e-30
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:15] for _ in range(7)])
    probes = make_probes(7, P, D, F32, gen)
    probes[1] *= 1e30
    probes[2] *= 1e-30
    probes[3, 0] = 0.0
    probes[4, -1, 7] = float("nan")  # this row cannot be screened: every row is scored
    probes[5] *= 1e-34  # one probe: one digit (its remainder would be subnormal)
    probes[6] *= 1e-20  # two digits
    for reduce in REDUCES:
        for t in (2, 9):
            _check_screen(probes, q, scales, parents, fanout, t, reduce)


# ------------------------------------------------------------------------------------------
# descend_tree


def make_int8_tree(seed, sizes, B=3, dims=(5, 33), int8_levels=None, masked=False):
    """Random levels, int8 where ``int8_levels`` says (default: every level)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    probes, keys, scales, masks = [], [], [], []
    for level, n in enumerate(sizes):
        D, P = rng.choice(dims), rng.randint(1, 3)
        probes.append(make_probes(B, P, D, F32, gen))
        if int8_levels is None or level in int8_levels:
            q, s = make_int8_keys(n, D, gen)
            keys.append(q)
            scales.append(s)
        else:
            keys.append(make_keys(n, D, F16, gen))
            scales.append(None)
        masks.append(make_mask(n, gen, p_keep=0.8) if masked and rng.random() < 0.7 else None)
    return probes, keys, scales, (masks if masked else None)


def check_tree(backend, probes, keys, scales, fanout, t, reduce, masks):
    """Each level equals the reference given the level above (so a near-tie cannot cascade)."""
    out = mk.descend_tree(probes, keys, fanout, t, reduce, masks, scales, backend=backend)
    levels = len(keys)
    assert isinstance(out, list) and len(out) == levels
    ts = [t] * levels if isinstance(t, int) else t
    ms = masks or [None] * levels
    B = probes[0].shape[0]
    for k, (ids, scores) in enumerate(out):
        parents = torch.zeros(B, 1, dtype=torch.int64) if k == 0 else out[k - 1][0]
        level_fanout = max(keys[0].shape[0], 1) if k == 0 else fanout
        float_keys = keys[k] if scales[k] is None else dequantize_keys(keys[k], scales[k])
        ref_ids, ref_scores = reference.descend(probes[k], float_keys, parents, level_fanout, ts[k], reduce, ms[k])
        cand = reference.score_children(probes[k].double(), float_keys.double(), parents, level_fanout, reduce, ms[k])
        try:
            assert_topk_equal(ids, scores, ref_ids, ref_scores, candidates=(cand[1], cand[0]), **score_tol(probes[k]))
        except AssertionError as error:
            raise AssertionError(f"level {k} of {levels}: {error}") from error
    return out


# (seed, level sizes top to bottom, fanout, t, int8 levels or None for all)
TREES = {
    "cpu": [
        (1, [3, 7, 19], 3, 4, None),
        (2, [2, 9, 70, 555], 8, [2, 5, 9, 30], None),
        (3, [5, 300], 64, 8, {1}),  # float16 top level, int8 leaves
        (4, [1, 1, 1], 1, 3, {0, 2}),
        (5, [4, 13, 50], 4, 60, None),  # t larger than any level
    ],
    "triton": [(11, [3, 7, 19], 3, 4, None), (12, [3, 9, 33], 4, [2, 3, 5], {2})],
    "reference": [(21, [3, 7, 19], 3, 4, {1, 2})],
}


@pytest.mark.parametrize(
    "backend, seed, sizes, fanout, t, int8_levels", [param(b, *c) for b in ALL_BACKENDS for c in TREES[b]]
)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_descend_tree(backend, seed, sizes, fanout, t, int8_levels, reduce, masked):
    probes, keys, scales, masks = make_int8_tree(seed, sizes, int8_levels=int8_levels, masked=masked)
    check_tree(backend, probes, keys, scales, fanout, t, reduce, masks)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_descend_tree_batch_of_one_and_no_float_levels(backend):
    probes, keys, scales, _ = make_int8_tree(31, [3, 10, 40], B=1, dims=(12,))
    check_tree(backend, probes, keys, scales, 4, 3, "max", None)
    # Float keys only: key_scales=None and a list of Nones are the same call.
    float_keys = [dequantize_keys(k, s) for k, s in zip(keys, scales)]
    a = mk.descend_tree(probes, float_keys, 4, 3, backend=backend)
    b = mk.descend_tree(probes, float_keys, 4, 3, key_scales=[None] * 3, backend=backend)
    for (ai, as_), (bi, bs) in zip(a, b):
        assert torch.equal(ai, bi) and torch.equal(as_, bs)


# ------------------------------------------------------------------------------------------
# Registration: schemas, fake kernels and autograd with int8 keys


def test_opcheck_cpp(gen):
    probes = make_probes(2, 3, 5, F32, gen)
    q, scales = make_int8_keys(20, 5, gen)
    parents = make_parents(2, 4, num_parents(20, 3), gen)
    mask = make_mask(20, gen)
    ops = torch.ops.mllm_kernels
    torch.library.opcheck(ops.score_children.default, (probes.requires_grad_(), q, parents, 3, "lse", mask, scales))
    torch.library.opcheck(ops.descend.default, (probes.detach(), q, parents, 3, 4, "max", None, scales))
    scores, ids = ops.score_children(probes.detach(), q, parents, 3, "lse", None, scales)
    grad = randn(scores.shape, F32, gen)
    torch.library.opcheck(ops.score_children_backward.default, (grad, probes.detach(), q, ids, "lse", scales))
    tree_probes, tree_keys, tree_scales, _ = make_int8_tree(41, [2, 5, 13], int8_levels={1, 2}, dims=(4,))
    torch.library.opcheck(
        ops.descend_tree.default, (tree_probes, tree_keys, 3, [2, 3, 4], "max", [None] * 3, tree_scales)
    )


def test_opcheck_triton(gen):
    mk.descend(
        make_probes(1, 1, 2, F32, gen), make_keys(2, 2, F32, gen), torch.tensor([[0]]), 2, 1, backend="triton"
    )  # imports the Triton namespace
    probes = make_probes(2, 2, 4, F32, gen)
    q, scales = make_int8_keys(9, 4, gen)
    parents = make_parents(2, 2, num_parents(9, 3), gen)
    probes, q, scales, parents = to_device((probes, q, scales, parents), TRITON_DEVICE)
    ops = torch.ops.mllm_kernels_triton
    torch.library.opcheck(ops.score_children.default, (probes.requires_grad_(), q, parents, 3, "max", None, scales))
    torch.library.opcheck(ops.descend.default, (probes.detach(), q, parents, 3, 4, "max", None, scales))


# ------------------------------------------------------------------------------------------
# Errors: each names the argument


def _children_args(op):
    g = torch.Generator().manual_seed(0)
    q, scales = mk.quantize_keys(torch.randn(20, 6, generator=g))
    args = {
        "probes": torch.randn(2, 3, 6, generator=g),
        "keys": q,
        "parents": torch.tensor([[0, 6], [2, -1]]),
        "fanout": 3,
        "key_scales": scales,
    }
    if op == "descend":
        args["t"] = 4
    return args


def _tree_args():
    g = torch.Generator().manual_seed(0)
    q, scales = mk.quantize_keys(torch.randn(8, 5, generator=g))
    return {
        "probes": [torch.randn(2, 2, 6, generator=g), torch.randn(2, 1, 5, generator=g)],
        "keys": [torch.randn(3, 6, generator=g), q],
        "fanout": 3,
        "t": 2,
        "key_scales": [None, scales],
    }


_SCALE_ERRORS = [
    # (id, edit of the args, exception, match)
    ("no_scales", {"key_scales": None}, ValueError, r"key_scales.*required"),
    ("scales_on_float_keys", {"keys": torch.randn(20, 6)}, ValueError, r"key_scales.*None"),
    ("scales_on_half_keys", {"keys": torch.randn(20, 6).half()}, ValueError, r"key_scales.*None"),
    ("f64_scales", {"key_scales": torch.ones(20, dtype=F64)}, TypeError, "key_scales"),
    ("f16_scales", {"key_scales": torch.ones(20, dtype=F16)}, TypeError, "key_scales"),
    ("int_scales", {"key_scales": torch.ones(20, dtype=torch.int64)}, TypeError, "key_scales"),
    ("short_scales", {"key_scales": torch.ones(19)}, ValueError, "key_scales"),
    ("2d_scales", {"key_scales": torch.ones(20, 1)}, ValueError, "key_scales"),
    ("0d_scales", {"key_scales": torch.tensor(1.0)}, ValueError, "key_scales"),
    ("uint8_keys", {"keys": torch.ones(20, 6, dtype=torch.uint8)}, TypeError, "keys"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["score_children", "descend"])
@pytest.mark.parametrize("case, edit, exc, match", [pytest.param(*c, id=c[0]) for c in _SCALE_ERRORS])
def test_errors(backend, op, case, edit, exc, match):
    args = {**_children_args(op), **edit}
    with pytest.raises(exc, match=match):
        getattr(mk, op)(**args, backend=backend)


_TREE_ERRORS = [
    ("no_scales", {"key_scales": None}, ValueError, r"key_scales\[1\].*required"),
    ("scales_on_float_level", {"key_scales": [torch.ones(3), None]}, ValueError, r"key_scales\[0\]"),
    ("scales_list_short", {"key_scales": [None]}, ValueError, "key_scales"),
    ("scales_list_long", {"key_scales": [None, None, None]}, ValueError, "key_scales"),
    ("f64_scales", {"key_scales": [None, torch.ones(8, dtype=F64)]}, TypeError, r"key_scales\[1\]"),
    ("short_scales", {"key_scales": [None, torch.ones(7)]}, ValueError, r"key_scales\[1\]"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case, edit, exc, match", [pytest.param(*c, id=c[0]) for c in _TREE_ERRORS])
def test_tree_errors(backend, case, edit, exc, match):
    args = {**_tree_args(), **edit}
    with pytest.raises(exc, match=match):
        mk.descend_tree(**args, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["score_children", "descend"])
def test_valid_base_inputs(backend, op):
    getattr(mk, op)(**_children_args(op), backend=backend)
    mk.descend_tree(**_tree_args(), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_scales_on_another_device(backend):
    """The machines have no GPU: a meta tensor plays the other device. The C++ kernel is called
    on its CPU dispatch key (a meta argument would send the dispatcher to the fake kernel)."""
    args = _children_args("descend")
    args["key_scales"] = torch.ones(20, device="meta")
    positional = (args["probes"], args["keys"], args["parents"], 3, 4, "max", None, args["key_scales"])
    if backend == "cpu":
        keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        call = lambda: torch.ops.mllm_kernels.descend.default.redispatch(keyset, *positional)
    elif backend == "triton":
        from mllm_kernels.triton import launchers

        call = lambda: launchers.descend(*positional)
    else:
        call = lambda: mk.descend(**args, backend=backend)
    with pytest.raises(ValueError, match="key_scales"):
        call()
