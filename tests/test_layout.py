"""Leaf layouts (mllm.layout): semantic_order and sampled_semantic_order are permutations,
deterministic, aligned to the implicit tree (children of node i are nodes [i*fanout, (i+1)*fanout)
of the level below) and group similar leaves under one parent, which is what makes untrained
mean-pooled parents useful.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mllm.layout import _assign, _caps, sampled_semantic_order, semantic_order, sequential_order

# Every semantic layout must pass the tests that take `order`. Whole small clusters under one
# parent at every level (test_clusters_become_sibling_groups, test_ragged_tree_stays_aligned)
# need semantic_order's two-level cuts; sampled_semantic_order cuts one level at a time.
SEMANTIC_ORDERS = pytest.mark.parametrize("order", [semantic_order, sampled_semantic_order], ids=["exact", "sampled"])


def _clustered(sizes, dim, noise, seed):
    """Shuffled points around one random centre per cluster: (x float32 [N, dim], label int64 [N])."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.as_tensor(sizes)
    centres = torch.randn(len(sizes), dim, generator=g)
    label = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    x = centres[label] + noise * torch.randn(len(label), dim, generator=g)
    shuffle = torch.randperm(len(label), generator=g)
    return x[shuffle], label[shuffle]


def _sibling_similarity(x, perm, fanout):
    """Mean cosine similarity between distinct siblings (full parent groups only)."""
    y = F.normalize(x[perm], dim=1)
    n = len(y) // fanout * fanout
    y = y[:n].view(-1, fanout, y.shape[1])
    sims = y @ y.transpose(1, 2)
    return ((sims.sum((1, 2)) - fanout) / (fanout * (fanout - 1))).mean().item()


def _assert_permutation(perm, n):
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))


@pytest.mark.parametrize("fanout", [2, 3, 4, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 64, 65, 100, 257, 1000])
@SEMANTIC_ORDERS
def test_permutation(order, n, fanout):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n * 31 + fanout))
    _assert_permutation(order(x, fanout), n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@SEMANTIC_ORDERS
def test_permutation_dtypes(order, dtype):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    _assert_permutation(order(x, 4), 300)


@pytest.mark.parametrize("fanout", [2, 4, 16])
@SEMANTIC_ORDERS
def test_degenerate_inputs(order, fanout):
    """Duplicates (all equal, or two distinct vectors repeated) and zero vectors."""
    g = torch.Generator().manual_seed(2)
    same = torch.ones(500, 8)
    two = torch.randn(2, 8, generator=g)[torch.randint(0, 2, (500,), generator=g)]
    zeros = torch.randn(500, 8, generator=g)
    zeros[::3] = 0
    for x in (same, two, zeros, torch.zeros(500, 8)):
        _assert_permutation(order(x, fanout), 500)


@SEMANTIC_ORDERS
def test_deterministic(order):
    x, _ = _clustered(torch.randint(1, 40, (50,), generator=torch.Generator().manual_seed(3)), 32, 0.5, 3)
    a = order(x, 8, seed=7)
    assert torch.equal(a, order(x.clone(), 8, seed=7))
    _assert_permutation(order(x, 8, seed=8), len(x))
    _assert_permutation(order(x, 8, iters=0), len(x))


def test_sequential_order():
    assert torch.equal(sequential_order(5), torch.arange(5))
    assert sequential_order(0).shape == (0,) and sequential_order(0).dtype == torch.int64
    with pytest.raises(ValueError, match="n"):
        sequential_order(-1)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(10), 4), {}, "embeddings"),
        ((torch.randn(2, 10, 4), 4), {}, "embeddings"),
        (([[1.0, 2.0]], 4), {}, "embeddings"),
        ((torch.ones(10, 4, dtype=torch.int64), 4), {}, "embeddings"),
        ((torch.full((10, 4), float("nan")), 4), {}, "embeddings"),
        ((torch.randn(10, 4), 1), {}, "fanout"),
        ((torch.randn(10, 4), 0), {}, "fanout"),
        ((torch.randn(10, 4), 2.5), {}, "fanout"),
        ((torch.randn(10, 4), True), {}, "fanout"),
        ((torch.randn(10, 4), 4), {"iters": -1}, "iters"),
    ],
)
@SEMANTIC_ORDERS
def test_invalid_arguments(order, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        order(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_per_label": 0}, "sample_per_label"),
        ({"sample_per_label": 2.0}, "sample_per_label"),
        ({"refine": -1}, "refine"),
        ({"coarse_refine": -1}, "coarse_refine"),
        ({"coarse_refine": True}, "coarse_refine"),
    ],
)
def test_sampled_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampled_semantic_order(torch.randn(10, 4), 4, **kwargs)


def test_sampled_needs_cpu_embeddings():
    with pytest.raises(ValueError, match="embeddings must be on the CPU"):
        sampled_semantic_order(torch.empty(10, 4, device="meta"), 4)


def test_sampled_float16_clusters_fill_whole_parents():
    """8 separated clusters of 64 float16 points (fanout 64), shuffled, with the sampled fit
    (8 points per cluster): every parent gets one whole cluster."""
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 32, generator=gen), dim=1)
    labels = torch.arange(8).repeat_interleave(64)[torch.randperm(8 * 64, generator=gen)]
    x = F.normalize(centres[labels] + 0.05 * torch.randn(8 * 64, 32, generator=gen), dim=1).half()
    perm = sampled_semantic_order(x, 64)
    _assert_permutation(perm, len(x))
    groups = labels[perm].view(8, 64)
    assert (groups == groups[:, :1]).all() and groups[:, 0].unique().numel() == 8


@pytest.mark.parametrize("fanout", [4, 16, 64])
def test_sampled_ragged_sizes_are_permutations(fanout):
    """4,200 float16 leaves, ragged at every level for these fanouts, with the default refinement
    and with none above the parents of the leaves (coarse_refine=0)."""
    x, _ = _clustered([70] * 60, 16, 0.5, 10)
    x = x.half()
    _assert_permutation(sampled_semantic_order(x, fanout), 4_200)
    _assert_permutation(sampled_semantic_order(x, fanout, coarse_refine=0), 4_200)


def test_balanced_assignment_meets_capacities_exactly():
    scores = torch.randn(3, 100, 7, generator=torch.Generator().manual_seed(1))
    caps = _caps(100, 16)  # 6 x 16 + 4
    for row in _assign(scores, caps):
        assert torch.equal(torch.bincount(row, minlength=7), caps)


@pytest.mark.parametrize("dim", [64, 128])  # 128 > the seeding projection's 64 dimensions
@pytest.mark.parametrize("seed", [0, 1])
def test_clusters_become_sibling_groups(dim, seed):
    """64 separated clusters of exactly 16 points, fanout 16: every parent holds one cluster."""
    x, label = _clustered([16] * 64, dim, 0.3, seed)
    groups = label[semantic_order(x, 16, seed=seed)].view(-1, 16)
    assert (groups == groups[:, :1]).all(1).float().mean().item() == 1.0


@SEMANTIC_ORDERS
def test_sibling_similarity_on_uneven_clusters(order):
    sizes = torch.randint(1, 60, (150,), generator=torch.Generator().manual_seed(4))
    x, _ = _clustered(sizes, 48, 0.8, 4)
    semantic = _sibling_similarity(x, order(x, 8), 8)
    sequential = _sibling_similarity(x, sequential_order(len(x)), 8)
    shuffled = _sibling_similarity(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(5)), 8)
    assert semantic > 0.3
    assert semantic > 2 * max(sequential, shuffled, 0.05)


@pytest.mark.parametrize(
    "sizes, fanout, block",
    [
        ([16, 16, 16, 7], 4, 16),  # 55 leaves: 14 parents, 4 grandparents (the last ragged)
        ([4] * 10 + [3], 4, 4),  # 43 leaves: 11 parents, the last one ragged
        ([9] * 7 + [5], 3, 9),  # 68 leaves: 23 parents, 8 grandparents
    ],
)
def test_ragged_tree_stays_aligned(sizes, fanout, block):
    """N not a multiple of fanout: the tree keeps ceil(N / fanout) parents, every full subtree of
    ``block`` leaves is one cluster and the short cluster fills the ragged right edge."""
    x, label = _clustered(sizes, 32, 0.2, 6)
    perm = semantic_order(x, fanout)
    n = sum(sizes)
    _assert_permutation(perm, n)
    assert math.ceil(len(perm) / fanout) == math.ceil(n / fanout)
    ordered = label[perm]
    full = n // block * block
    blocks = ordered[:full].view(-1, block)
    assert (blocks == blocks[:, :1]).all()
    tail = ordered[full:]
    assert len(tail) == sizes[-1] and (tail == tail[0]).all()


def _tree_search_recall(x, perm, queries, fanout, beam, k):
    """Recall@k of a beam search down mean-pooled normalised parents, against flat search."""
    levels = [F.normalize(x[perm], dim=1)]
    while len(levels[-1]) > fanout:
        e = levels[-1]
        padded = torch.cat([e, e.new_zeros(-len(e) % fanout, e.shape[1])])
        levels.append(F.normalize(padded.view(-1, fanout, e.shape[1]).sum(1), dim=1))
    q = F.normalize(queries, dim=1)
    truth = (F.normalize(x, dim=1) @ q.T).topk(k, dim=0).indices.T  # [Q, k] original ids
    hits = 0
    for i in range(len(q)):
        cand = torch.arange(len(levels[-1]))
        for h in range(len(levels) - 1, 0, -1):
            keep = cand[(levels[h][cand] @ q[i]).topk(min(beam, len(cand))).indices]
            cand = (keep[:, None] * fanout + torch.arange(fanout)).flatten()
            cand = cand[cand < len(levels[h - 1])]
        found = perm[cand[(levels[0][cand] @ q[i]).topk(k).indices]]
        hits += len(set(found.tolist()) & set(truth[i].tolist()))
    return hits / (len(q) * k)


@SEMANTIC_ORDERS
def test_tree_search_recall(order):
    """On shuffled clustered data a narrow beam finds the true neighbours with the semantic
    layout, and mostly misses them with the sequential one."""
    g = torch.Generator().manual_seed(9)
    centres = torch.randn(20, 32, generator=g).repeat_interleave(10, 0) + 0.7 * torch.randn(200, 32, generator=g)
    x = centres[torch.randint(0, 200, (4000,), generator=g)] + 0.5 * torch.randn(4000, 32, generator=g)
    queries = centres[torch.randint(0, 200, (40,), generator=g)] + 0.5 * torch.randn(40, 32, generator=g)
    semantic = _tree_search_recall(x, order(x, 8), queries, 8, 4, 10)
    sequential = _tree_search_recall(x, sequential_order(len(x)), queries, 8, 4, 10)
    assert semantic > 0.8
    assert semantic > sequential + 0.5
