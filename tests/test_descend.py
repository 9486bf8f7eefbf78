"""descend (SPEC 4.4): the fused top-t of every backend vs the reference."""

import itertools

import pytest
import torch
from testing_utils import (
    BACKENDS,
    BF16,
    F16,
    F32,
    assert_topk_equal,
    dtypes_for,
    make_keys,
    make_mask,
    make_parents,
    make_probes,
    num_parents,
    param,
    score_tol,
    strided,
    torch_threads,
    transposed,
)

import mllm_kernels as mk
from mllm_kernels import reference

REDUCES = ["max", "lse"]

# (B, P, D, N, fanout, T, t)
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (3, 4, 5, 20, 3, 4, 5),
    (2, 2, 33, 50, 7, 5, 10),
    (4, 3, 100, 130, 64, 3, 20),
    (2, 5, 384, 29, 3, 6, 4),
    (2, 8, 17, 200, 1, 9, 3),
    (2, 3, 8, 10, 3, 2, 20),  # t larger than the candidates
    (2, 2, 16, 300, 64, 4, 200),
    (3, 2, 12, 500, 64, 8, 1),
    (5, 2, 24, 4096, 64, 64, 50),  # thousands of candidates per row
]
TRITON_SHAPES = [
    (2, 3, 5, 20, 3, 4, 5),
    (2, 2, 33, 17, 7, 3, 25),
    (1, 1, 1, 3, 1, 2, 1),
    (2, 2, 8, 130, 16, 8, 12),
    (2, 3, 100, 130, 64, 3, 20),
    (1, 5, 384, 29, 3, 6, 4),
    (1, 2, 16, 300, 64, 4, 70),
]


def check(backend, probes, keys, parents, fanout, t, reduce="max", mask=None):
    ids, scores = mk.descend(probes, keys, parents, fanout, t, reduce, mask, backend=backend)
    ref_ids, ref_scores = reference.descend(probes, keys, parents, fanout, t, reduce, mask)
    candidates = reference.score_children(probes.double(), keys.double(), parents, fanout, reduce, mask)
    candidates = (candidates[1], candidates[0])
    assert_topk_equal(ids, scores, ref_ids, ref_scores, candidates=candidates, **score_tol(probes, keys))
    return ids, scores


def _params():
    out = []
    for backend in BACKENDS:
        shapes = CPU_SHAPES if backend == "cpu" else TRITON_SHAPES
        for shape in shapes:
            for reduce in REDUCES:
                out.append(param(backend, F32, reduce, shape))
        for dtype in dtypes_for(backend):
            if dtype != F32:
                out.append(param(backend, dtype, "max", shapes[1]))
                out.append(param(backend, dtype, "lse", shapes[2]))
    return out


@pytest.mark.parametrize(
    "backend, dtype, reduce, shape",
    _params(),
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_values(backend, dtype, reduce, shape, masked, gen):
    B, P, D, N, fanout, T, t = shape
    probes = make_probes(B, P, D, dtype, gen)
    keys = make_keys(N, D, dtype, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    parents[0, 0] = num_parents(N, fanout) - 1  # the last parent, maybe with fewer children
    mask = make_mask(N, gen) if masked else None
    check(backend, probes, keys, parents, fanout, t, reduce, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keys_dtype", [F16, BF16], ids=str)
def test_mixed_dtypes(backend, keys_dtype, gen):
    probes = make_probes(2, 3, 33, F32, gen)
    keys = make_keys(40, 33, keys_dtype, gen)
    parents = make_parents(2, 4, num_parents(40, 7), gen)
    _ids, scores = check(backend, probes, keys, parents, 7, 6, "lse")
    assert scores.dtype == F32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_duplicated_parents_count_once(backend, reduce, gen):
    N, fanout = 12, 3
    probes = make_probes(3, 2, 6, F32, gen)
    keys = make_keys(N, 6, F32, gen)
    parents = torch.tensor([[1, 1, 1], [2, -1, 2], [3, 0, 3]])
    ids, _scores = check(backend, probes, keys, parents, fanout, 8, reduce)
    assert (ids[0, 3:] == -1).all() and sorted(ids[0, :3].tolist()) == [3, 4, 5]
    assert (ids[1] >= 0).sum() == 3 and (ids[2] >= 0).sum() == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty_parents", "mask_all", "T0", "B0", "N0"])
def test_no_candidates(backend, case, gen):
    N, fanout, t, B, T = 10, 4, 3, 2, 3
    mask = None
    if case == "N0":
        N = 0
    if case == "T0":
        T = 0
    if case == "B0":
        B = 0
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_empty=0)
    if case == "empty_parents":
        parents[:] = -1
    if case == "mask_all":
        mask = torch.zeros(N, dtype=torch.bool)
    probes = make_probes(B, 2, 5, F32, gen)
    keys = make_keys(N, 5, F32, gen)
    ids, scores = mk.descend(probes, keys, parents, fanout, t, mask=mask, backend=backend)
    assert ids.shape == scores.shape == (B, t)
    assert (ids == -1).all() and (scores == -torch.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_nan_never_selected(backend, reduce, gen):
    N, fanout = 15, 5
    probes = make_probes(2, 3, 4, F32, gen)
    keys = make_keys(N, 4, F32, gen)
    keys[[0, 3, 6, 7, 11]] = torch.nan
    keys[9, 1] = torch.nan
    parents = torch.tensor([[0, 1, 2], [1, -1, -1]])
    ids, scores = check(backend, probes, keys, parents, fanout, 15, reduce)
    nan_ids = {0, 3, 6, 7, 9, 11}
    assert not nan_ids & set(ids.flatten().tolist())
    assert (ids[0] >= 0).sum() == N - len(nan_ids)
    assert (ids[1] >= 0).sum() == 2  # children 5..9 of parent 1, less 6, 7 and 9
    # All candidates NaN: nothing is selected.
    keys[:] = torch.nan
    ids, scores = mk.descend(probes, keys, parents, fanout, 4, reduce, backend=backend)
    assert (ids == -1).all() and (scores == -torch.inf).all()


def _tie_inputs(gen, D=4, N=24):
    """Small-integer data: every dot product is exact, so tied scores are exactly equal."""
    base = torch.randint(-2, 3, (3, D), generator=gen).to(F32)
    keys = base[torch.randint(0, 3, (N,), generator=gen)]  # many duplicated rows
    probes = torch.randint(-2, 3, (3, 2, D), generator=gen).to(F32)
    return probes, keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 5, 30])
def test_ties_smaller_id_first(backend, t, gen):
    probes, keys = _tie_inputs(gen)
    # Parents listed in decreasing order: the kernel meets the larger ids first.
    parents = torch.tensor([[7, 5, 3, 1], [0, 2, 4, 6], [6, -1, 1, 6]])
    ids, scores = mk.descend(probes, keys, parents, 3, t, "max", backend=backend)
    ref_ids, ref_scores = reference.descend(probes, keys, parents, 3, t, "max")
    assert torch.equal(ids, ref_ids), f"{ids} != {ref_ids}"
    assert torch.equal(scores, ref_scores)
    for _ in range(3):
        again = mk.descend(probes, keys, parents, 3, t, "max", backend=backend)
        assert torch.equal(again[0], ids) and torch.equal(again[1], scores)


@pytest.mark.parametrize("num_probes", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_equal_keys_score_equal_wherever_they_fall(num_probes, dtype, gen):
    """The CPU kernels score keys in groups of up to six (tiles of one to six keys against one to
    four probe rows); a key's score must not depend on its group or tile, or exact ties would break
    by position instead of by id."""
    N, D, fanout = 23, 389, 5  # D: SIMD blocks plus a scalar tail; fanout: groups straddle parents
    keys = make_keys(1, D, dtype, gen).expand(N, D).contiguous()
    probes = make_probes(2, num_probes, D, F32, gen)
    parents = torch.tensor([[4, 0, 2, 1, 3], [3, -1, 1, 4, 0]])
    # Masked children shift the group boundaries inside blocks; 19 to 14 live children end the
    # row on a group of every size.
    for dropped, reduce in itertools.product(range(6), REDUCES):
        mask = torch.ones(N, dtype=torch.bool)
        mask[[1, 6, 7, 13, 20, 21, 22, 2, 9][: 4 + dropped]] = False
        ids, scores = mk.descend(probes, keys, parents, fanout, N, reduce, mask, backend="cpu")
        live = torch.nonzero(mask).flatten()
        assert torch.equal(ids[0, : live.numel()], live), ids[0]
        for b in range(2):
            valid = scores[b][ids[b] >= 0]
            assert torch.all(valid == valid[0]), valid
        slot_scores, slot_ids = mk.score_children(probes, keys, parents, fanout, reduce, mask, backend="cpu")
        assert torch.all(slot_scores[0][slot_ids[0] >= 0] == scores[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_lse(backend, gen):
    probes, keys = _tie_inputs(gen)
    parents = torch.tensor([[7, 5, 3, 1], [0, 2, 4, 6], [6, -1, 1, 6]])
    check(backend, probes, keys, parents, 3, 7, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    B, N, fanout = (64, 3000, 64) if backend == "cpu" else (4, 60, 8)
    probes = make_probes(B, 3, 20, F32, gen)
    keys = make_keys(N, 20, F32, gen)
    parents = make_parents(B, 10, num_parents(N, fanout), gen)
    first = mk.descend(probes, keys, parents, fanout, 17, "lse", backend=backend)
    for _ in range(2):
        again = mk.descend(probes, keys, parents, fanout, 17, "lse", backend=backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_matches_own_score_children(backend, reduce, gen):
    """descend == the top t of the same backend's score_children (duplicates removed)."""
    N, fanout, t = 45, 6, 9
    probes = make_probes(3, 2, 10, F32, gen)
    keys = make_keys(N, 10, F32, gen)
    parents = torch.stack([torch.randperm(num_parents(N, fanout), generator=gen)[:4] for _ in range(3)])
    parents[1, 2] = -1
    mask = make_mask(N, gen)
    ids, scores = mk.descend(probes, keys, parents, fanout, t, reduce, mask, backend=backend)
    all_scores, all_ids = mk.score_children(probes, keys, parents, fanout, reduce, mask, backend=backend)
    top_ids, top_scores = reference._select_top(all_scores, all_ids, t)
    assert_topk_equal(ids, scores, top_ids, top_scores, atol=1e-5, rtol=1e-5)


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
    ids, scores = mk.descend(
        call["probes"], call["keys"], call["parents"], fanout, 5, "max", call["mask"], backend=backend
    )
    ref_ids, ref_scores = reference.descend(
        args["probes"], args["keys"], args["parents"], fanout, 5, "max", args["mask"]
    )
    assert_topk_equal(ids, scores, ref_ids, ref_scores)


@pytest.mark.parametrize("num_probes", [1, 2, 5])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("reduce", REDUCES)
def test_rows_sharing_parents(num_probes, dtype, reduce, gen):
    """Many rows selecting the same few parents: the C++ kernel reads each shared block once for
    all of them. Each row must get what it gets alone (bit for bit) and what the reference gives."""
    B, D, N, fanout, T = 48, 40, 6 * 16 - 5, 16, 4  # 6 parents, the last one short
    probes = make_probes(B, num_probes, D, F32, gen)
    keys = make_keys(N, D, dtype, gen)
    parents = make_parents(B, T, num_parents(N, fanout), gen)
    mask = make_mask(N, gen)
    for t in (1, 7, 40):
        ids, scores = check("cpu", probes, keys, parents, fanout, t, reduce, mask)
        for b in range(0, B, 5):
            alone = mk.descend(probes[b : b + 1], keys, parents[b : b + 1], fanout, t, reduce, mask, backend="cpu")
            assert torch.equal(alone[0][0], ids[b]) and torch.equal(alone[1][0], scores[b]), b


@pytest.mark.parametrize("num_probes", [1, 2, 5])
def test_rows_sharing_parents_non_finite_and_ties(num_probes, gen):
    """Rows sharing parents, with tops that fill up, many exact ties (small integers) and NaN and
    infinite dot products: the kernel rules a child out for the rows of its parent from its probe
    dots against each row's t-th score, which must never drop a child that ranks. On one thread all
    24 rows are one block, so a parent's rows hold more dots than one 32-bit comparison mask (with
    P = 5, a row's dots straddle two masks)."""
    B, D, N, fanout, T = 24, 12, 48, 8, 3
    probes = torch.randint(-2, 3, (B, num_probes, D), generator=gen).to(F32)
    keys = torch.randint(-2, 3, (N, D), generator=gen).to(F32)
    keys[3, 0] = torch.inf
    keys[10, 5] = -torch.inf
    keys[17] = torch.nan
    keys[22, 2] = torch.nan
    keys[30] = torch.inf
    keys[41] = -torch.inf
    parents = torch.randint(0, N // fanout, (B, T), generator=gen)
    for num_threads in (1, 2):
        for t in (1, 3, 9):
            with torch_threads(num_threads):
                ids, scores = mk.descend(probes, keys, parents, fanout, t, "max", backend="cpu")
            ref_ids, ref_scores = reference.descend(probes, keys, parents, fanout, t, "max")
            assert torch.equal(ids, ref_ids), (num_threads, t)
            assert torch.equal(scores, ref_scores), (num_threads, t)


@pytest.mark.parametrize("op", ["descend", "descend_tree"])
@pytest.mark.parametrize("B", [33, 200])  # 200: more row blocks (64 rows at most) than threads
def test_same_result_for_any_thread_count(op, B, gen):
    """The C++ kernels split work across threads; the result must not depend on how."""
    N, fanout = 2000, 16
    probes = make_probes(B, 3, 24, F32, gen)
    keys = make_keys(N, 24, F32, gen)
    parents = make_parents(B, 12, num_parents(N, fanout), gen)
    results = []
    for n in (1, 2, 3):
        with torch_threads(n):
            if op == "descend":
                results.append(mk.descend(probes, keys, parents, fanout, 20, "lse", backend="cpu"))
            else:
                sizes = [num_parents(num_parents(N, fanout), fanout), num_parents(N, fanout), N]
                level_keys = [
                    make_keys(sizes[0], 24, F32, torch.Generator().manual_seed(1)),
                    make_keys(sizes[1], 24, F32, torch.Generator().manual_seed(2)),
                    keys,
                ]
                out = mk.descend_tree([probes] * 3, level_keys, fanout, [4, 9, 20], "lse", backend="cpu")
                results.append(tuple(x for level in out for x in level))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["descend", "descend_tree"])
@pytest.mark.parametrize("int8", [False, True])
def test_small_batch_split_across_threads(op, int8, gen):
    """With fewer queries than threads, the C++ kernels split a row's parents among the threads
    (above ~1e5 child elements) and merge their top t: the same result as one thread, and as the
    reference; repeated and empty parents included."""
    B, D, N, fanout, T = 2, 64, 8192, 64, 40  # 40 * 64 children * 64 dims: split
    probes = make_probes(B, 2, D, F32, gen)
    keys = make_keys(N, D, F32, gen)
    scales = None
    if int8:
        keys, scales = mk.quantize_keys(keys)
    parents = make_parents(B, T, num_parents(N, fanout), gen, p_empty=0.1, p_dup=0.2)
    top = make_keys(num_parents(N, fanout), D, F32, gen)

    def run(backend):
        if op == "descend":
            return mk.descend(probes, keys, parents, fanout, 30, "lse", None, scales, backend=backend)
        level_scales = None if scales is None else [None, scales]
        out = mk.descend_tree(
            [probes] * 2, [top, keys], fanout, [T, 30], "lse", key_scales=level_scales, backend=backend
        )
        return out[-1]

    results = []
    for n in (1, 3):
        with torch_threads(n):
            results.append(run("cpu"))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref_ids, ref_scores = run("reference")
    assert_topk_equal(*results[1], ref_ids, ref_scores, **score_tol(probes, probes))
