"""descend_tree (SPEC 4.5): the whole descent of every backend vs the reference and exact search."""

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
    assert_topk_equal,
    make_keys,
    make_mask,
    make_probes,
    param,
    score_tol,
    strided,
    transposed,
)

import mllm_kernels as mk
from mllm_kernels import reference

REDUCES = ["max", "lse"]


def level_sizes(rng, levels, fanout, max_leaves=None):
    """Sizes top to bottom with N_{k-1} = ceil(N_k / fanout) and a top level of <= fanout nodes."""
    sizes = [rng.randint(1, fanout)]
    for _ in range(levels - 1):
        n = sizes[-1]
        sizes.append(rng.randint((n - 1) * fanout + 1, n * fanout))
    assert max_leaves is None or sizes[-1] <= max_leaves
    return sizes


def make_tree(seed, levels, fanout, B=3, dtype=F32, masked=False, dims=(1, 5, 33, 100)):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = level_sizes(rng, levels, fanout)
    probes, keys, masks = [], [], []
    for n in sizes:
        D, P = rng.choice(dims), rng.randint(1, 3)
        probes.append(make_probes(B, P, D, dtype, gen))
        keys.append(make_keys(n, D, dtype, gen))
        masks.append(make_mask(n, gen, p_keep=0.8) if masked and rng.random() < 0.7 else None)
    t = [rng.randint(1, 2 * fanout) for _ in sizes] if rng.random() < 0.5 else rng.randint(1, 2 * fanout)
    return probes, keys, t, (masks if masked else None)


def check_tree(backend, probes, keys, fanout, t, reduce, masks):
    """Each level equals the reference given the level above (so a near-tie cannot cascade)."""
    out = mk.descend_tree(probes, keys, fanout, t, reduce, masks, backend=backend)
    levels = len(keys)
    assert isinstance(out, list) and len(out) == levels
    ts = [t] * levels if isinstance(t, int) else t
    ms = masks or [None] * levels
    B = probes[0].shape[0]
    for k, (ids, scores) in enumerate(out):
        if k == 0:
            # All top nodes are the children of one parent (the top level holds <= fanout nodes).
            parents = torch.zeros(B, 1, dtype=torch.int64)
        else:
            parents = out[k - 1][0]
        ref_ids, ref_scores = reference.descend(probes[k], keys[k], parents, fanout, ts[k], reduce, ms[k])
        cand = reference.score_children(probes[k].double(), keys[k].double(), parents, fanout, reduce, ms[k])
        try:
            assert_topk_equal(
                ids, scores, ref_ids, ref_scores, candidates=(cand[1], cand[0]), **score_tol(probes[k], keys[k])
            )
        except AssertionError as error:
            raise AssertionError(f"level {k} of {levels}: {error}") from error
    return out


CPU_TREES = [
    (seed, levels, fanout)
    for seed, (levels, fanout) in enumerate(
        [(1, 3), (2, 3), (3, 3), (4, 3), (2, 7), (3, 7), (4, 5), (2, 64), (3, 16), (4, 2), (3, 1), (4, 1)]
    )
]
TRITON_TREES = [(100, 2, 3), (101, 3, 3), (102, 3, 1)]


@pytest.mark.parametrize(
    "backend, seed, levels, fanout",
    [param("cpu", *c) for c in CPU_TREES] + [param("triton", *c) for c in TRITON_TREES],
)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_random_trees(backend, seed, levels, fanout, reduce, masked):
    dims = (1, 5, 33, 100) if backend == "cpu" else (1, 5, 17)
    probes, keys, t, masks = make_tree(seed, levels, fanout, masked=masked, dims=dims)
    check_tree(backend, probes, keys, fanout, t, reduce, masks)


@pytest.mark.parametrize(
    "backend, dtype",
    [param("cpu", F16), param("cpu", BF16), param("cpu", F64), param("triton", F16), param("triton", BF16)],
)
def test_dtypes(backend, dtype):
    probes, keys, t, masks = make_tree(7, 3, 4, dtype=dtype, masked=True, dims=(8, 33))
    check_tree(backend, probes, keys, 4, t, "lse", masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_per_level(backend):
    """Upper levels in float32, leaves in float16 (a memory with compressed leaf keys)."""
    probes, keys, t, masks = make_tree(11, 3, 3, dims=(6,))
    keys[-1] = keys[-1].to(F16)
    check_tree(backend, probes, keys, 3, t, "max", masks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked_leaves", [False, True], ids=["nomask", "leafmask"])
def test_keep_everything_equals_flat_search(backend, masked_leaves):
    """With t >= every level's size above the leaves, the leaves are the exact top-t of all leaves."""
    fanout, sizes = (5, [4, 17, 83, 411]) if backend == "cpu" else (3, [3, 7, 20])
    levels = len(sizes)
    gen = torch.Generator().manual_seed(3)
    B, P, D = 4, 3, 12
    probes = [make_probes(B, P, D, F32, gen) for _ in sizes]
    leaf_probes = probes[-1]
    keys = [make_keys(n, D, F32, gen) for n in sizes]
    masks = None
    leaf_mask = torch.ones(sizes[-1], dtype=torch.bool)
    if masked_leaves:
        leaf_mask = make_mask(sizes[-1], gen, p_keep=0.5)
        masks = [None] * (levels - 1) + [leaf_mask]
    t_leaf = 9
    t = sizes[:-1] + [t_leaf]
    out = mk.descend_tree(probes, keys, fanout, t, "max", masks, backend=backend)
    flat = torch.einsum("bpd,nd->bnp", leaf_probes, keys[-1]).amax(-1)
    flat = torch.where(leaf_mask, flat, torch.full_like(flat, -torch.inf))
    top_scores, top_ids = torch.topk(flat, t_leaf, dim=1)
    top_ids = torch.where(top_scores == -torch.inf, torch.full_like(top_ids, -1), top_ids)
    ids, scores = out[-1]
    assert_topk_equal(ids, scores, top_ids, top_scores)
    # Every node of every upper level was kept.
    for k, n in enumerate(sizes[:-1]):
        assert torch.equal(out[k][0].sort(1).values, torch.arange(n).expand(B, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_parent_hides_subtree(backend):
    fanout = 3
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 8, 22]
    probes = [make_probes(2, 2, 4, F32, gen) for _ in sizes]
    keys = [make_keys(n, 4, F32, gen) for n in sizes]
    masks = [torch.tensor([False, True, True]), None, None]
    out = mk.descend_tree(probes, keys, fanout, [3, 9, 27], "max", masks, backend=backend)
    assert 0 not in out[0][0].tolist()[0] and 0 not in out[0][0].tolist()[1]
    assert ((out[1][0] >= 3) | (out[1][0] == -1)).all()  # children of node 0 are 0..2
    assert ((out[2][0] >= 9) | (out[2][0] == -1)).all()  # grandchildren of node 0 are 0..8
    check_tree(backend, probes, keys, fanout, [3, 9, 27], "max", masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_t_equals_list_t(backend):
    probes, keys, _, _masks = make_tree(21, 3, 4, dims=(7,))
    as_int = mk.descend_tree(probes, keys, 4, 5, backend=backend)
    as_list = mk.descend_tree(probes, keys, 4, [5, 5, 5], backend=backend)
    for (a_ids, a_scores), (b_ids, b_scores) in zip(as_int, as_list):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_scores, b_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_level_and_empty_tree(backend):
    gen = torch.Generator().manual_seed(9)
    probes = [make_probes(2, 2, 5, F32, gen)]
    keys = [make_keys(4, 5, F32, gen)]
    check_tree(backend, probes, keys, 4, 6, "lse", None)
    # A tree without nodes: nothing to select at any level.
    keys = [make_keys(0, 5, F32, gen), make_keys(0, 5, F32, gen)]
    probes = probes * 2
    out = mk.descend_tree(probes, keys, 3, 2, backend=backend)
    for ids, scores in out:
        assert ids.shape == (2, 2) and (ids == -1).all() and (scores == -torch.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_exact(backend):
    """Integer data (exact scores, many ties): identical to the reference, and repeatable."""
    gen = torch.Generator().manual_seed(13)
    fanout, sizes, D = 3, [3, 7, 19], 3
    base = torch.randint(-1, 2, (3, D), generator=gen).to(F32)
    keys = [base[torch.randint(0, 3, (n,), generator=gen)] for n in sizes]
    probes = [torch.randint(-1, 2, (2, 2, D), generator=gen).to(F32) for _ in sizes]
    out = mk.descend_tree(probes, keys, fanout, [2, 4, 5], "max", backend=backend)
    ref = reference.descend_tree(probes, keys, fanout, [2, 4, 5], "max")
    for k, ((ids, scores), (ref_ids, ref_scores)) in enumerate(zip(out, ref)):
        assert torch.equal(ids, ref_ids), f"level {k}: {ids} != {ref_ids}"
        assert torch.equal(scores, ref_scores), f"level {k}"
    again = mk.descend_tree(probes, keys, fanout, [2, 4, 5], "max", backend=backend)
    for (a, b), (c, d) in zip(out, again):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_with_huge_t(backend):
    """B = 0: outputs [0, t] hold no element, whatever t is (nothing may be sized by T * fanout)."""
    probes = [torch.randn(0, 1, 5), torch.randn(0, 2, 5)]
    keys = [torch.randn(4, 5), torch.randn(18, 5)]
    out = mk.descend_tree(probes, keys, 5, 2**62, backend=backend)
    assert [tuple(ids.shape) for ids, _ in out] == [(0, 2**62)] * 2
    assert [tuple(scores.shape) for _, scores in out] == [(0, 2**62)] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_levels(backend):
    probes, keys, t, masks = make_tree(31, 3, 4, masked=True, dims=(6,))
    masks = [m if m is not None else torch.ones(k.shape[0], dtype=torch.bool) for m, k in zip(masks, keys)]
    views_probes = [strided(p) for p in probes]
    views_keys = [transposed(k) for k in keys]
    views_masks = [strided(m) for m in masks]
    out = mk.descend_tree(views_probes, views_keys, 4, t, "lse", views_masks, backend=backend)
    expected = mk.descend_tree(probes, keys, 4, t, "lse", masks, backend=backend)
    for (ids, scores), (e_ids, e_scores) in zip(out, expected):
        assert torch.equal(ids, e_ids)
        torch.testing.assert_close(scores, e_scores, atol=1e-6, rtol=1e-6)
    check_tree(backend, views_probes, views_keys, 4, t, "lse", views_masks)
