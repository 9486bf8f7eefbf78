"""A demo of the fused ops on a synthetic embedding tree.

Builds a tree over clustered unit vectors (leaves ordered by cluster, so siblings are similar;
each parent key is the normalised mean of its children, i.e. an untrained hierarchy), then
answers noisy queries with ``descend_tree`` and compares with exact flat search over the leaves:
recall@10 and latency per query. The memory system on real text arrives with the module layer.
"""

from __future__ import annotations

import time

import torch

import mllm_kernels as mk


def add_arguments(parser) -> None:
    parser.add_argument("--leaves", type=int, default=262_144, help="number of leaf embeddings")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--fanout", type=int, default=64)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def build_tree(leaves: torch.Tensor, fanout: int) -> list[torch.Tensor]:
    """Level keys, top to bottom: each parent is the normalised mean of its children."""
    levels = [leaves]
    while levels[0].shape[0] > fanout:
        child = levels[0].float()
        pad = (-child.shape[0]) % fanout
        groups = torch.nn.functional.pad(child, (0, 0, 0, pad)).view(-1, fanout, child.shape[1])
        counts = torch.full((groups.shape[0], 1), float(fanout))
        counts[-1] = fanout - pad
        parent = torch.nn.functional.normalize(groups.sum(1) / counts, dim=-1)
        levels.insert(0, parent.to(leaves.dtype))
    return levels


def clustered_vectors(n: int, dim: int, generator: torch.Generator, clusters: int = 4096) -> torch.Tensor:
    """Unit vectors around random centres, ordered by centre (the 'semantic' leaf layout)."""
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    owner = torch.sort(torch.randint(0, clusters, (n,), generator=generator)).values
    noise = torch.randn(n, dim, generator=generator) * (0.6 / dim**0.5)
    return torch.nn.functional.normalize(centres[owner] + noise, dim=-1)


def _time(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def run(args) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    leaves = clustered_vectors(args.leaves, args.dim, generator).half()
    keys = build_tree(leaves, args.fanout)
    picked = torch.randint(0, args.leaves, (args.queries,), generator=generator)
    queries = torch.nn.functional.normalize(
        leaves[picked].float() + torch.randn(args.queries, args.dim, generator=generator) * (0.8 / args.dim**0.5),
        dim=-1,
    )
    probes = [queries[:, None, :]] * len(keys)
    print(f"tree: {args.leaves:,} leaves of D={args.dim} (float16), fanout {args.fanout}, "
          f"levels {[k.shape[0] for k in keys]}; {args.queries} queries; {torch.get_num_threads()} threads")

    leaves32 = leaves.float()
    exact = torch.topk(queries @ leaves32.T, 10, dim=1).indices
    flat_seconds = _time(lambda: torch.topk(queries @ leaves32.T, 10, dim=1))
    print(f"flat exact search (float32 matmul + topk): {1e6 * flat_seconds / args.queries:8.1f} us/query")
    for t in (4, 8, 16, 32):
        beams = [t] * (len(keys) - 1) + [max(t, 10)]
        result = mk.descend_tree(probes, keys, args.fanout, beams)
        found = result[-1][0][:, :10]
        recall = (found[:, :, None] == exact[:, None, :]).any(-1).float().mean().item()
        seconds = _time(lambda: mk.descend_tree(probes, keys, args.fanout, beams))
        ref_seconds = _time(lambda: mk.descend_tree(probes, keys, args.fanout, beams, backend="reference"), 2)
        print(f"descend_tree t={t:>2}: {1e6 * seconds / args.queries:8.1f} us/query "
              f"(reference {1e6 * ref_seconds / args.queries:8.1f}), recall@10 vs flat {recall:.3f}, "
              f"{flat_seconds / seconds:5.1f}x faster than flat")
    top_ids, top_scores = mk.descend_tree(probes, keys, args.fanout, 8)[-1]
    print(f"query 0 -> leaves {top_ids[0, :5].tolist()} scores {[round(s, 3) for s in top_scores[0, :5].tolist()]}"
          f" (it was made from leaf {picked[0].item()})")
