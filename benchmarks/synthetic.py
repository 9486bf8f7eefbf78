"""Synthetic data of the end-to-end benchmark: clustered unit vectors, their leaves permuted into
the memory's semantic layout (``mllm.layout.sampled_semantic_order``, which scales to 1e7 leaves),
and the upper levels of an untrained tree.

* :func:`clustered_vectors`: ``n`` points ``normalise(centre + noise)`` around a fixed set of
  cluster centres grouped in topics (:class:`DataSpec`), generated block by block straight into a float16 ``[n, d]`` tensor (which
  may be backed by a file, see :func:`float16_buffer`), so 1e7 x 384 needs 7.7 GB and no float32
  copy.
* :func:`permute_rows`: ``x[perm]`` gathered block by block.
* :func:`upper_levels`: the levels above the leaves, each node the normalised mean of its
  ``fanout`` children (what an untrained memory holds), float16.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Float32 bytes of leaf rows converted at once (bounds the working memory of the level means).
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


def prepare_scratch(directory: str) -> str:
    """Creates ``directory`` if missing and checks that it can hold a file: at the start of a run,
    not when the first size that needs a scratch file (1e7 leaves) is reached half an hour in."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"scratch={directory!r} cannot hold the scratch file: {e}") from e
    return directory


def scratch_path(directory: str | None, stem: str) -> str:
    """A fresh file name in ``directory`` (default: the system's temporary directory)."""
    fd, path = tempfile.mkstemp(prefix=f"mllm_e2e_{stem}_", suffix=".npy", dir=directory)
    os.close(fd)
    return path


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
