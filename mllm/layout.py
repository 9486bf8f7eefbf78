"""Leaf layouts: the order in which embeddings are stored as the leaves of the implicit tree.

The tree has no learned partition: the children of node i of a level are nodes
``[i*fanout, min((i+1)*fanout, N))`` of the level below. So the order of the leaves decides what
every parent summarises. ``semantic_order`` puts similar leaves under one parent, similar parents
under one grandparent and so on, which makes untrained parents (e.g. the mean of their children)
meaningful; ``sequential_order`` keeps insertion order. ``sampled_semantic_order`` is the same
layout for millions of leaves: centroids fitted on samples, the leaves read in bounded chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Two levels are split at once only where fanout**2 <= this: bounds the [n, fanout**2] scores.
_MAX_ATOMS = 256
# Dimensions of the random projection that seeding runs in.
_SEED_DIM = 64
# Float32 bytes of leaf rows that sampled_semantic_order converts at once, and of its scores.
_CHUNK_BYTES = 256 << 20


def sequential_order(n: int) -> torch.Tensor:
    """The insertion-order layout: ``arange(n)``, int64 ``[n]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sequential_order: n must be a non-negative int, got {n!r}")
    return torch.arange(n, dtype=torch.int64)


def semantic_order(embeddings: torch.Tensor, fanout: int, *, seed: int = 0, iters: int = 10) -> torch.Tensor:
    """Return ``perm`` (int64 ``[N]``, a permutation of ``range(N)``, on the device of
    ``embeddings``) such that ``embeddings[perm]`` is in semantic layout.

    ``embeddings``: finite floating ``[N, D]``, compared by cosine similarity. The leaves are split
    top down by balanced k-means aligned to the implicit tree: a subtree of capacity ``S`` is cut
    into clusters of exactly ``S / fanout`` leaves (only the right-most, ragged one may hold fewer),
    so cluster boundaries fall exactly on node boundaries at every level and the tree keeps its
    ``ceil(N / fanout)`` parents. Where ``fanout**2 <= 256`` two levels are cut at once (clusters
    of ``S / fanout**2`` first, then packed whole into ``fanout`` groups). ``iters``: refinement
    iterations per split. Deterministic for a given ``seed``; ~0.3 s for 10k x 384 on one core.
    """
    _check_embeddings("semantic_order", embeddings)
    _check_int("semantic_order", "fanout", fanout, 2)
    _check_int("semantic_order", "iters", iters, 0)
    n = embeddings.shape[0]
    perm = torch.arange(n, dtype=torch.int64, device=embeddings.device)
    if n <= fanout:  # one parent: the order under it does not matter
        return perm
    x = F.normalize(embeddings.detach().float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    size = fanout  # the whole tree's subtree capacity: the smallest power of fanout >= n
    while size < n:
        size *= fanout
    # Invariant: the first n // size leaves form full subtrees of `size` leaves each and the rest
    # one ragged subtree, since every level's node boundaries are multiples of its capacity.
    while size > fanout:
        child = size // fanout
        # Two levels at once where affordable: the grandchildren ("atoms") are clustered first and
        # packed whole into children, which keeps natural clusters of about atom size whole (a
        # direct fanout-way split of many small clusters often cuts some of them in two).
        atom = child // fanout if child > fanout and fanout * fanout <= _MAX_ATOMS else None
        n_full, rest = divmod(n, size)
        if n_full:
            head = perm[: n_full * size].view(n_full, size)
            perm[: n_full * size] = _split(x, head, child, atom, gen, iters).flatten()
        tail = perm[n_full * size :].view(1, rest)
        if rest > child:
            perm[n_full * size :] = _split(x, tail, child, atom, gen, iters).flatten()
        elif atom is not None and rest > atom:  # the ragged subtree is itself one ragged child
            perm[n_full * size :] = _split(x, tail, atom, None, gen, iters).flatten()
        size = child if atom is None else atom
    return perm


def sampled_semantic_order(
    embeddings: torch.Tensor,
    fanout: int,
    *,
    seed: int = 0,
    sample_per_label: int = 8,
    iters: int = 8,
    refine: int = 3,
    coarse_refine: int | None = None,
) -> torch.Tensor:
    """``semantic_order`` for millions of leaves: returns ``perm`` (int64 ``[N]``, a permutation of
    ``range(N)``) such that ``embeddings[perm]`` is in semantic layout.

    ``embeddings``: finite floating ``[N, D]`` on the CPU (float16 keeps 1e7 x 384 in 7.7 GB),
    compared by cosine similarity. As in ``semantic_order``, every subtree of capacity ``S`` (a
    power of ``fanout``) is cut top down into consecutive clusters of exactly ``S / fanout`` leaves
    (only the right-most may hold fewer), so cluster boundaries fall on node boundaries at every
    level. But a cut fits its centroids on ``sample_per_label`` sampled points per cluster
    (``iters`` Lloyd steps from farthest-first seeds), assigns all points with exact capacities,
    and ``refine`` times (``coarse_refine`` for cuts above the parents of the leaves, when given)
    re-centres on the balanced clusters and assigns again. The leaves are read in float32 chunks
    of at most 256 MB, and one level is cut at a time, never two: a natural cluster smaller than
    the children of a cut may be split between them (``semantic_order`` keeps those whole where
    it can). Working memory: the float32 scores ``[n, fanout]`` of at most 256 MB of subtrees and
    their assignment, plus ~512 MB of rows. Deterministic for a given ``seed``.
    """
    op = "sampled_semantic_order"
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "cpu":
        raise ValueError(f"{op}: embeddings must be on the CPU, got {embeddings.device}")
    _check_embeddings(op, embeddings)
    _check_int(op, "fanout", fanout, 2)
    _check_int(op, "sample_per_label", sample_per_label, 1)
    _check_int(op, "iters", iters, 0)
    _check_int(op, "refine", refine, 0)
    if coarse_refine is not None:
        _check_int(op, "coarse_refine", coarse_refine, 0)
    n = embeddings.shape[0]
    perm = torch.arange(n, dtype=torch.int64)
    if n <= fanout:
        return perm
    gen = torch.Generator().manual_seed(seed)
    rows = _Rows(embeddings.detach())
    size = fanout
    while size < n:
        size *= fanout
    while size > fanout:
        child = size // fanout
        passes = refine if child == fanout or coarse_refine is None else coarse_refine
        n_full, rest = divmod(n, size)
        per_batch = max(1, _CHUNK_BYTES // (size * 4 * fanout))  # bounds the [G, size, k] scores
        for first in range(0, n_full, per_batch):
            last = min(n_full, first + per_batch)
            head = perm[first * size : last * size].view(last - first, size)
            perm[first * size : last * size] = _split_sampled(
                rows, head, child, gen, sample_per_label, iters, passes
            ).flatten()
        if rest > child:
            tail = perm[n_full * size :].view(1, rest)
            perm[n_full * size :] = _split_sampled(rows, tail, child, gen, sample_per_label, iters, passes).flatten()
        size = child
    return perm


def _check_embeddings(op: str, embeddings) -> None:
    """``embeddings`` must be a finite floating ``[N, D]`` tensor (checked 65,536 rows at a time,
    so that a large one needs no full-size mask)."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"{op}: embeddings must be a 2-D tensor [N, D], got {got}")
    if not embeddings.is_floating_point():
        raise ValueError(f"{op}: embeddings must be floating point, got {embeddings.dtype}")
    for start in range(0, embeddings.shape[0], 1 << 16):
        if not bool(torch.isfinite(embeddings[start : start + (1 << 16)]).all()):
            raise ValueError(f"{op}: embeddings must be finite (no NaN or inf)")


def _check_int(op: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")


def _caps(n: int, size: int) -> torch.Tensor:
    """Sizes (int64 ``[ceil(n / size)]``) of ``n`` items cut into groups of ``size``, last ragged."""
    k = -(-n // size)
    caps = torch.full((k,), size, dtype=torch.int64)
    caps[-1] = n - (k - 1) * size
    return caps


def _split(x: torch.Tensor, idx: torch.Tensor, child: int, atom, gen, iters: int) -> torch.Tensor:
    """Reorder each row of ``idx`` (int64 ``[G, n]``, rows of ``x``, float32 ``[N, D]``) into
    consecutive clusters of ``child`` leaves (the last may be smaller); with ``atom`` set, each
    child is in turn consecutive clusters of ``atom`` leaves. Returns int64 ``[G, n]``."""
    pts = x.index_select(0, idx.flatten()).view(*idx.shape, x.shape[1])
    g, n = idx.shape
    if atom is None:
        labels = _cluster(pts, _caps(n, child), gen, iters)
        return idx.gather(1, torch.sort(labels, dim=1, stable=True).indices)
    caps = _caps(n, atom)
    m, m_full = caps.numel(), n // atom
    labels = _cluster(pts, caps, gen, iters)  # atom m - 1 is the ragged one if n % atom
    # Pack the full atoms into children; a ragged atom is the very last one (alignment).
    packed = _cluster(_means(pts, labels, m)[:, :m_full], _caps(m_full, child // atom), gen, iters)
    rank = torch.arange(m, device=idx.device).repeat(g, 1)
    rank[:, :m_full] = torch.sort(packed, dim=1, stable=True).indices.argsort(dim=1)
    return idx.gather(1, torch.sort(rank.gather(1, labels), dim=1, stable=True).indices)


def _sums(pts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster sums, float32 ``[G, k, D]``, of ``pts`` ``[G, n, D]`` by ``labels`` (int64 ``[G, n]``
    in ``[0, k)``): a batched matmul with the one-hot labels, far faster than ``index_add_``."""
    g, n, _ = pts.shape
    onehot = torch.zeros(g, k, n, device=pts.device).scatter_(1, labels[:, None, :], 1.0)
    return torch.bmm(onehot, pts)


def _means(pts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised cluster means, float32 ``[G, k, D]``, of ``pts`` ``[G, n, D]`` by ``labels``."""
    return F.normalize(_sums(pts, labels, k), dim=2)


def _cluster(pts: torch.Tensor, caps: torch.Tensor, gen, iters: int) -> torch.Tensor:
    """Balanced k-means of each of ``G`` groups of unit vectors (float32 ``[G, n, D]``) into
    ``k = len(caps)`` clusters of exactly ``caps`` points (int64 ``[k]``, only the last may be
    smaller, summing to ``n``). Returns the labels, int64 ``[G, n]`` in ``[0, k)``."""
    g, n, _ = pts.shape
    k = caps.numel()
    if k == 1:
        return torch.zeros(g, n, dtype=torch.int64, device=pts.device)
    cent = _seeds(pts, k, gen)
    ragged = bool(caps[-1] < caps[0])
    labels = None
    for it in range(iters + 1):
        scores = torch.bmm(pts, cent.transpose(1, 2))  # [G, n, k] cosine similarities
        if ragged:
            scores = scores.gather(2, _most_preferred_first(scores)[:, None, :].expand(g, n, k))
        new = _assign(scores, caps.to(pts.device))
        if it == iters or (labels is not None and torch.equal(new, labels)):
            break
        labels = new
        cent = _means(pts, labels, k)
    return new


def _most_preferred_first(scores: torch.Tensor) -> torch.Tensor:
    """The ``k`` clusters of each group (int64 ``[G, k]``), ordered by how many points of ``scores``
    (``[G, n, k]``) prefer them, most first, ties in index order. Where the last capacity is the
    small (ragged) one, reordering the clusters so gives it to the centroid fewest points prefer;
    else a whole natural cluster squeezed into it stays split between two labels for good."""
    g, _, k = scores.shape
    key = scores.argmax(2) + torch.arange(g, device=scores.device)[:, None] * k
    counts = torch.bincount(key.flatten(), minlength=g * k).view(g, k)
    return counts.argsort(dim=1, descending=True, stable=True)


def _seeds(pts: torch.Tensor, k: int, gen) -> torch.Tensor:
    """Farthest-first seeds, float32 ``[G, k, D]``, for each group of ``pts`` (float32 ``[G, n, D]``):
    after a random first one, each seed is the point least similar to all seeds so far. So every
    well separated cluster gets a seed; k-means++ sampling often seeds one cluster twice and misses
    another, a trap that balanced refinement seldom leaves."""
    g, n, d = pts.shape
    dev = pts.device
    # The k sequential passes are bound by memory bandwidth, so they run on a random pool of 10
    # points per seed (it misses a cluster of n/k points with odds ~e^-10), projected to _SEED_DIM.
    pool = min(n, 10 * k)
    ids = torch.rand(g, n, generator=gen).argsort(1)[:, :pool].to(dev)  # [G, pool]
    sub = pts.gather(1, ids[..., None].expand(g, pool, d))
    if d > _SEED_DIM:
        sub = F.normalize(sub @ torch.randn(d, _SEED_DIM, generator=gen).to(dev), dim=2)
    picks = [torch.zeros(g, dtype=torch.int64, device=dev)]  # pool order is random already
    best = torch.bmm(sub, sub[:, :1].transpose(1, 2))[..., 0]  # [G, pool] sim. to nearest seed
    for _ in range(1, k):
        picks.append(best.argmin(1))
        seed = sub.gather(1, picks[-1][:, None, None].expand(g, 1, sub.shape[2]))
        best = torch.maximum(best, torch.bmm(sub, seed.transpose(1, 2))[..., 0])
    chosen = ids.gather(1, torch.stack(picks, 1))  # [G, k] rows of pts
    return pts.gather(1, chosen[..., None].expand(g, k, d))


def _assign(scores: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Capacity-constrained assignment: int64 ``[G, n]`` labels from ``scores`` (float ``[G, n, k]``)
    with exactly ``caps[j]`` points per label in every group.

    Rounds of proposals: every unplaced point proposes to its best open cluster, and a cluster takes
    the proposals with the largest margin over the point's next-best open cluster (those lose most
    elsewhere) up to its remaining capacity. Per group, each round either places every proposer or
    fills a cluster, so ``k`` rounds always suffice."""
    g, n, k = scores.shape
    dev = scores.device
    labels = torch.empty(g * n, dtype=torch.int64, device=dev)
    rem = caps.repeat(g)  # [G*k] places left per (group, cluster)
    free = torch.arange(g * n, device=dev)  # unplaced points, and their rows of s
    s = scores.reshape(g * n, k)
    for _ in range(k):
        grp = free // n
        top = s.topk(min(2, k), dim=1)
        margin = top.values[:, 0] - top.values[:, -1]  # +inf when a single cluster is open
        key = grp * k + top.indices[:, 0]
        o = torch.argsort(margin, descending=True, stable=True)
        o = o.index_select(0, torch.argsort(key.index_select(0, o), stable=True))
        ks = key.index_select(0, o)  # proposals by cluster, then by margin
        counts = torch.bincount(ks, minlength=g * k)
        rank = torch.arange(ks.numel(), device=dev) - (counts.cumsum(0) - counts).index_select(0, ks)
        ok = rank < rem.index_select(0, ks)
        won, ks = o.index_select(0, ok.nonzero()[:, 0]), ks.index_select(0, ok.nonzero()[:, 0])
        labels.index_copy_(0, free.index_select(0, won), ks % k)
        rem -= torch.bincount(ks, minlength=g * k)
        left = o.index_select(0, (~ok).nonzero()[:, 0])
        if left.numel() == 0:
            break
        free, s = free.index_select(0, left), s.index_select(0, left)
        s.masked_fill_((rem == 0).view(g, k).index_select(0, free // n), float("-inf"))
    return labels.view(g, n)


class _Rows:
    """Unit float32 rows of ``x`` gathered into reused buffers: a fresh multi-MB tensor per chunk
    costs more in page faults than the copy itself on small virtual machines."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.gathered = torch.empty(0, dtype=x.dtype)
        self.full = torch.empty(0)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """``normalise(x[idx])`` as float32 ``[*idx.shape, D]``; valid until the next call."""
        count, d = idx.numel(), self.x.shape[1]
        if self.full.numel() < count * d:
            self.gathered = torch.empty(count * d, dtype=self.x.dtype)
            self.full = torch.empty(count * d)
        gathered = self.gathered[: count * d].view(count, d)
        torch.index_select(self.x, 0, idx.reshape(-1), out=gathered)
        full = self.full[: count * d].view(count, d).copy_(gathered)
        full.div_(full.norm(dim=1, keepdim=True).clamp_min_(1e-12))
        return full.view(*idx.shape, d)


def _split_sampled(rows: _Rows, idx, child, gen, sample_per_label, iters, refine) -> torch.Tensor:
    """Reorder every row of ``idx`` (``[G, n]`` leaf ids) into consecutive clusters of ``child``
    leaves (the last may hold fewer), with centroids fitted on a sample; returns ``[G, n]``."""
    g, n = idx.shape
    caps = _caps(n, child)
    k = caps.numel()
    if k == 1:
        return idx
    d = rows.x.shape[1]
    chunk = max(1, _CHUNK_BYTES // (4 * d * g))  # rows per group read at once
    m = min(n, k * sample_per_label)
    pick = torch.rand(g, n, generator=gen).argsort(1)[:, :m] if m < n else None
    sample = rows(idx if pick is None else idx.gather(1, pick)).clone()
    cent = _seeds(sample, k, gen)
    for _ in range(iters):
        sums = _sums(sample, torch.bmm(sample, cent.transpose(1, 2)).argmax(2), k)
        empty = sums.norm(dim=2, keepdim=True) == 0  # a seed that lost all its points stays put
        cent = torch.where(empty, cent, F.normalize(sums, dim=2))
    del sample
    scores = torch.empty(g, n, k)
    for step in range(refine + 1):
        for start in range(0, n, chunk):
            torch.bmm(rows(idx[:, start : start + chunk]), cent.transpose(1, 2), out=scores[:, start : start + chunk])
        if caps[-1] < caps[0]:
            order = _most_preferred_first(scores)
            cent = cent.gather(1, order[..., None].expand(g, k, d))
            scores = scores.gather(2, order[:, None, :].expand(g, n, k))
        order = torch.sort(_assign(scores, caps), dim=1, stable=True).indices
        idx = idx.gather(1, order)  # now label j holds positions [j * child, (j + 1) * child)
        if step < refine:  # centroids of the balanced clusters, then assign again
            sums = torch.zeros(g, k, d)
            for start in range(0, n, chunk):
                pts = rows(idx[:, start : start + chunk])
                stop = start + pts.shape[1]
                for label in range(start // child, (stop - 1) // child + 1):
                    a, b = max(start, label * child), min(stop, (label + 1) * child)
                    sums[:, label] += pts[:, a - start : b - start].sum(1)
            cent = F.normalize(sums, dim=2)
    return idx
