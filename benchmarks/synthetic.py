"""Synthetic data of the end-to-end benchmark: clustered unit vectors, a tree layout that scales
to 1e7 leaves, and the upper levels of an untrained tree.

* :func:`clustered_vectors`: ``n`` points ``normalise(centre + noise)`` around a fixed set of
  cluster centres grouped in topics (:class:`DataSpec`), generated block by block straight into a float16 ``[n, d]`` tensor (which
  may be backed by a file, see :func:`float16_buffer`), so 1e7 x 384 needs 7.7 GB and no float32
  copy.
* :func:`tree_layout`: the permutation that puts the leaves in semantic layout: top-down balanced
  k-means aligned to the implicit tree, like :func:`mllm.layout.semantic_order`, but with the
  centroids fitted on a sample of each group and the points read in bounded float32 chunks, so it
  runs on 1e7 x 384 float16 leaves in minutes and a few GB (``semantic_order`` normalises a float32
  copy of all leaves and refines every split on all points: about 30 s for 262,144 leaves here).
* :func:`upper_levels`: the levels above the leaves, each node the normalised mean of its
  ``fanout`` children (what an untrained memory holds), float16.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mllm.layout import _caps  # group sizes, the same cut as the memory's own layout

# Float32 bytes of leaf rows converted at once (bounds the working memory of the layout and of
# the level means).
_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class DataSpec:
    """The distribution of the synthetic leaves and queries: a two-level Gaussian mixture on the
    unit sphere, topics and clusters within topics (the structure of real embeddings at two scales).

    ``topics`` random unit vectors (isotropic in ``d`` dimensions, so almost orthogonal); every
    topic has ``clusters // topics`` cluster centres ``normalise(topic + g)`` with ``|g|`` about
    ``topic_noise``; a point is ``normalise(centre + h)`` with ``|h|`` about ``rel_noise``
    (``g`` isotropic Gaussian; ``h`` too by default, or with ``noise_decay > 0`` standard
    deviations ``~ i**-noise_decay`` along the axes of one random rotation shared by all clusters:
    a lower intrinsic dimension, a participation ratio of about 26 dimensions at 0.5). So two
    points of one cluster have a cosine of about ``1 / (1 + rel_noise**2)``, of one topic about
    ``1 / ((1 + topic_noise**2) (1 + rel_noise**2))``, of different topics about 0. With few
    points per cluster (small N) a query's 10 nearest neighbours come from sibling clusters of its
    topic; with many, from its own cluster.
    """

    d: int = 384
    topics: int = 64
    clusters: int = 4096
    topic_noise: float = 1.0
    rel_noise: float = 0.75
    noise_decay: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        same = 1.0 / (1.0 + self.rel_noise**2)
        topic = same / (1.0 + self.topic_noise**2)
        noise = "isotropic" if self.noise_decay == 0 else f"std ~ i^-{self.noise_decay:g} in a random basis"
        return (
            f"{self.topics} topics x {self.clusters // self.topics} clusters in d={self.d} "
            f"(point = normalise(centre + noise), noise {noise}, |noise| ~ {self.rel_noise:g}; "
            f"centre = normalise(topic + noise), |noise| ~ {self.topic_noise:g}): cosine ~{same:.2f} "
            f"within a cluster, ~{topic:.2f} within a topic, ~0 across topics; queries: held-out points "
            "of the same distribution (another seed)"
        )


def centres(spec: DataSpec) -> torch.Tensor:
    """The ``[clusters, d]`` float32 unit cluster centres of ``spec`` (cluster ``c`` belongs to
    topic ``c % topics``)."""
    gen = torch.Generator().manual_seed(spec.seed)
    topics = F.normalize(torch.randn(spec.topics, spec.d, generator=gen), dim=1)
    noise = torch.randn(spec.clusters, spec.d, generator=gen) * (spec.topic_noise / math.sqrt(spec.d))
    return F.normalize(topics[torch.arange(spec.clusters) % spec.topics] + noise, dim=1)


def float16_buffer(n: int, d: int, path: str | None = None) -> torch.Tensor:
    """An uninitialised float16 ``[n, d]`` tensor; with ``path``, backed by that file (a numpy
    memmap, deleted from the directory at once so it never outlives the process): its pages are
    page cache the kernel can write back and drop under memory pressure, not anonymous memory."""
    if path is None:
        return torch.empty(n, d, dtype=torch.float16)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    os.unlink(path)
    return torch.from_numpy(array)


def clustered_vectors(
    spec: DataSpec, n: int, stream: int, out: torch.Tensor | None = None, block: int = 1 << 16
) -> torch.Tensor:
    """``n`` unit vectors of ``spec`` as float16 ``[n, d]`` (written into ``out`` when given).

    ``stream`` seeds the points (leaves and queries use different streams, so the queries are
    held out: drawn from the same distribution, never among the leaves).
    """
    cent = centres(spec)
    shape = noise_shape(spec)  # [d, d]: isotropic unit noise -> the spectrum of DataSpec
    out = torch.empty(n, spec.d, dtype=torch.float16) if out is None else out
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7919 * (stream + 1))
    for start in range(0, n, block):
        stop = min(n, start + block)
        labels = torch.randint(0, spec.clusters, (stop - start,), generator=gen)
        x = torch.randn(stop - start, spec.d, generator=gen)
        x = (
            torch.addmm(cent[labels], x, shape)
            if shape is not None
            else x.mul_(spec.rel_noise / math.sqrt(spec.d)).add_(cent[labels])
        )
        out[start:stop] = F.normalize(x, dim=1)
    return out


def noise_shape(spec: DataSpec) -> torch.Tensor | None:
    """The ``[d, d]`` matrix that turns standard Gaussian rows into the within-cluster noise:
    standard deviations ``~ i**-noise_decay`` along the axes of a random rotation (shared by all
    clusters), scaled so that the noise norm is about ``rel_noise``. None when isotropic."""
    if spec.noise_decay == 0:
        return None
    gen = torch.Generator().manual_seed(spec.seed + 12_345)
    rotation, _ = torch.linalg.qr(torch.randn(spec.d, spec.d, generator=gen))
    std = torch.arange(1, spec.d + 1, dtype=torch.float32) ** -spec.noise_decay
    std *= spec.rel_noise / std.norm()
    return std[:, None] * rotation.T


def scratch_path(directory: str | None, stem: str) -> str:
    """A fresh file name in ``directory`` (default: the system's temporary directory)."""
    fd, path = tempfile.mkstemp(prefix=f"mllm_e2e_{stem}_", suffix=".npy", dir=directory)
    os.close(fd)
    return path


# ---------------------------------------------------------------------------------------------
# Layout


class _Rows:
    """Float32 rows of ``x`` gathered into reused buffers: a fresh multi-MB tensor per chunk costs
    more in page faults than the copy itself on the virtual machines this runs on."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.half = torch.empty(0, dtype=x.dtype)
        self.full = torch.empty(0)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """``x[idx]`` as float32 ``[*idx.shape, D]``; valid until the next call."""
        count, d = idx.numel(), self.x.shape[1]
        if self.full.numel() < count * d:
            self.half = torch.empty(count * d, dtype=self.x.dtype)
            self.full = torch.empty(count * d)
        half = self.half[: count * d].view(count, d)
        torch.index_select(self.x, 0, idx.reshape(-1), out=half)
        return self.full[: count * d].view(*idx.shape, d).copy_(half.view(*idx.shape, d))


def _farthest_first(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[G, k, D]`` seeds: a random first point, then each the sample point least similar to the
    seeds so far (on a random 64-dim projection), so well separated clusters each get one."""
    g, _, d = sample.shape
    proj = F.normalize(sample @ torch.randn(d, min(d, 64), generator=gen), dim=2) if d > 64 else sample
    picks = [torch.zeros(g, dtype=torch.int64)]
    best = torch.bmm(proj, proj[:, :1].transpose(1, 2))[..., 0]
    for _ in range(1, k):
        picks.append(best.argmin(1))
        seed = proj.gather(1, picks[-1][:, None, None].expand(g, 1, proj.shape[2]))
        best = torch.maximum(best, torch.bmm(proj, seed.transpose(1, 2))[..., 0])
    chosen = torch.stack(picks, 1)
    return sample.gather(1, chosen[..., None].expand(g, k, d))


def _label_sums(pts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group sums of the points of every label, float32 ``[G, k, D]`` (a one-hot batched
    matmul: far faster than ``index_add_`` here)."""
    g, m, _ = pts.shape
    onehot = torch.zeros(g, k, m).scatter_(1, labels[:, None, :], 1.0)
    return torch.bmm(onehot, pts)


def balanced_assign(scores: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Labels ``[G, n]`` with exactly ``caps[j]`` points on label ``j`` in every group, from
    ``scores [G, n, k]`` (higher is better; overwritten).

    Rounds of proposals: every unplaced point proposes to its best open label, and a label accepts
    the proposals with the largest margin over the point's second-best open label, up to its
    remaining capacity. Each round places every proposer or fills a label: at most ``k`` rounds.
    """
    g, n, k = scores.shape
    labels = torch.empty(g * n, dtype=torch.int64)
    if k == 1:
        return labels.zero_().view(g, n)
    remaining = caps.repeat(g)
    free = torch.arange(g * n)
    s = scores.view(g * n, k)
    for _ in range(k):
        top = s.topk(2, dim=1)
        margin = top.values[:, 0] - top.values[:, 1]
        key = (free // n) * k + top.indices[:, 0]
        del top
        # By label, then by margin, largest first: one sort of label + (1 - margin / 4) in
        # float64 (cosine margins lie in [0, 2]; a point with a single open label gets +inf).
        composite = key.double().add_(1.0 - margin.double().clamp_(0.0, 2.0).div_(4.0))
        order = torch.sort(composite, stable=True).indices
        del composite
        keys = key[order]
        counts = torch.bincount(keys, minlength=g * k)
        rank = torch.arange(keys.numel()) - (counts.cumsum(0) - counts)[keys]
        ok = rank < remaining[keys]
        labels[free[order[ok]]] = keys[ok] % k
        remaining -= torch.bincount(keys[ok], minlength=g * k)
        left = order[~ok]
        if left.numel() == 0:
            break
        free, s = free[left], s[left]
        s.masked_fill_((remaining == 0).view(g, k)[free // n], float("-inf"))
    return labels.view(g, n)


def _split(rows: _Rows, idx, child, gen, sample_per_label, iters, refine) -> torch.Tensor:
    """Reorder every row of ``idx`` (``[G, n]`` leaf ids) into consecutive clusters of ``child``
    leaves (the last may hold fewer); returns the reordered ``[G, n]``."""
    g, n = idx.shape
    caps = _caps(n, child)
    k = caps.numel()
    if k == 1:
        return idx
    d = rows.x.shape[1]
    chunk = max(1, _CHUNK_BYTES // (4 * d * g))  # rows per group read at once
    # Centroids: farthest-first seeds and Lloyd iterations on a sample of each group.
    m = min(n, k * sample_per_label)
    pick = torch.rand(g, n, generator=gen).argsort(1)[:, :m] if m < n else None
    sample = rows(idx if pick is None else idx.gather(1, pick)).clone()
    cent = _farthest_first(sample, k, gen)
    for _ in range(iters):
        sums = _label_sums(sample, torch.bmm(sample, cent.transpose(1, 2)).argmax(2), k)
        empty = sums.norm(dim=2, keepdim=True) == 0  # a seed that lost all its points stays put
        cent = torch.where(empty, cent, F.normalize(sums, dim=2))
    del sample
    scores = torch.empty(g, n, k)
    for step in range(refine + 1):
        for start in range(0, n, chunk):
            pts = rows(idx[:, start : start + chunk])
            torch.bmm(pts, cent.transpose(1, 2), out=scores[:, start : start + chunk])
        if caps[-1] < caps[0]:
            # The small (ragged) capacity goes to the centroid fewest points prefer, so that no
            # natural cluster is squeezed into it and split for good.
            key = scores.argmax(2) + torch.arange(g)[:, None] * k
            popular = torch.bincount(key.reshape(-1), minlength=g * k).view(g, k).argsort(1, descending=True)
            cent = cent.gather(1, popular[..., None].expand(g, k, d))
            scores = scores.gather(2, popular[:, None, :].expand(g, n, k))
        order = torch.sort(balanced_assign(scores, caps), dim=1, stable=True).indices
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


def tree_layout(
    x: torch.Tensor,
    fanout: int,
    *,
    seed: int = 0,
    sample_per_label: int = 8,
    iters: int = 8,
    refine: int = 3,
    coarse_refine: int | None = None,
    log=None,
) -> torch.Tensor:
    """The permutation (int64 ``[N]``) that puts the rows of ``x`` (float ``[N, D]``, unit rows)
    in semantic layout for the implicit tree of ``fanout``.

    Top down, every subtree of capacity ``S`` (a power of ``fanout``) is cut into consecutive
    clusters of exactly ``S / fanout`` leaves (only the right-most may hold fewer), so cluster
    boundaries fall on node boundaries at every level, as in :func:`mllm.layout.semantic_order`.
    A cut fits cosine centroids by k-means on ``sample_per_label`` points per cluster (``iters``
    Lloyd steps from farthest-first seeds), then assigns all points with exact capacities, and
    ``refine`` times re-centres on the balanced clusters and assigns again. Deterministic for a
    given ``seed``. Working memory: the scores ``[n, fanout]`` of the largest group (4 bytes each)
    and its balanced assignment, plus ~512 MB of rows.
    """
    n = x.shape[0]
    perm = torch.arange(n, dtype=torch.int64)
    if n <= fanout:
        return perm
    gen = torch.Generator().manual_seed(seed)
    rows = _Rows(x)
    size = fanout
    while size < n:
        size *= fanout
    while size > fanout:
        started = time.perf_counter()
        child = size // fanout
        passes = refine if child == fanout or coarse_refine is None else coarse_refine
        n_full, rest = divmod(n, size)
        per_batch = max(1, _CHUNK_BYTES // (size * 4 * fanout))  # bounds the [G, size, k] scores
        for first in range(0, n_full, per_batch):
            last = min(n_full, first + per_batch)
            head = perm[first * size : last * size].view(last - first, size)
            perm[first * size : last * size] = _split(rows, head, child, gen, sample_per_label, iters, passes).flatten()
        if rest > child:
            tail = perm[n_full * size :].view(1, rest)
            perm[n_full * size :] = _split(rows, tail, child, gen, sample_per_label, iters, passes).flatten()
        if log is not None:
            log(f"    layout: subtrees of {size:,} -> {child:,} leaves, {time.perf_counter() - started:.1f} s")
        size = child
    return perm


def permute_rows(x: torch.Tensor, perm: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """``x[perm]`` as a new float16 tensor, gathered block by block (sorted reads per block)."""
    out = torch.empty(perm.numel(), x.shape[1], dtype=x.dtype)
    for start in range(0, perm.numel(), block):
        ids = perm[start : start + block]
        order = torch.argsort(ids)
        rows = x.index_select(0, ids[order])
        out[start : start + block][order] = rows
    return out


def upper_levels(leaves: torch.Tensor, fanout: int) -> list[torch.Tensor]:
    """The keys of every level, top to bottom, ending with ``leaves``: each parent is the
    normalised mean of its (up to ``fanout``) children, in float32, stored as ``leaves.dtype``.
    ``N_parent = ceil(N_child / fanout)``; the top level has at most ``fanout`` nodes."""
    levels = [leaves]
    while levels[-1].shape[0] > fanout:
        child = levels[-1]
        n, d = child.shape
        parents = torch.empty(-(-n // fanout), d, dtype=leaves.dtype)
        rows = max(fanout, (_CHUNK_BYTES // (4 * d)) // fanout * fanout)
        for start in range(0, n, rows):
            block = child[start : start + rows].float()
            full = block.shape[0] // fanout
            out = parents[start // fanout : start // fanout + -(-block.shape[0] // fanout)]
            if full:
                out[:full] = F.normalize(block[: full * fanout].view(full, fanout, d).sum(1), dim=1)
            if block.shape[0] > full * fanout:
                out[full:] = F.normalize(block[full * fanout :].sum(0, keepdim=True), dim=1)
        levels.append(parents)
    return levels[::-1]
