"""Small memories for the module-layer tests: a tiny from-scratch encoder, so no model is loaded."""

from __future__ import annotations

import itertools

import torch

from mllm import ChunkEncoder, HierarchicalMemory, MemoryConfig


def tiny_encoder(d_model: int = 16, seed: int = 0) -> ChunkEncoder:
    torch.manual_seed(seed)
    return ChunkEncoder.from_scratch(d_model=d_model, num_layers=1, heads=2, max_len=64).eval()


def random_documents(generator: torch.Generator, count: int, max_tokens: int = 40) -> list[list[int]]:
    """Token-id documents of 1..max_tokens byte tokens."""
    lengths = torch.randint(1, max_tokens + 1, (count,), generator=generator)
    return [torch.randint(0, 256, (int(n),), generator=generator).tolist() for n in lengths]


def tiny_memory(
    documents,
    *,
    fanout: int = 4,
    chunk_size: int = 8,
    layout: str = "sequential",
    key_dtype: str = "float32",
    d_model: int = 16,
    **config,
) -> HierarchicalMemory:
    config = MemoryConfig(
        d_model=d_model, chunk_size=chunk_size, fanout=fanout, key_dtype=key_dtype, layout=layout, **config
    )
    return HierarchicalMemory.build(documents, tiny_encoder(d_model), config, progress=False)


def normalized_mean_parents(
    children: torch.Tensor, live: torch.Tensor, fanout: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The untrained level encoder, written out: each parent is the normalised mean of its live children."""
    pad = (-children.shape[0]) % fanout
    groups = torch.nn.functional.pad(children * live[:, None], (0, 0, 0, pad)).view(-1, fanout, children.shape[1])
    counts = torch.nn.functional.pad(live, (0, pad)).view(-1, fanout).sum(1)
    mean = groups.sum(1) / counts.clamp(min=1)[:, None]
    return torch.nn.functional.normalize(mean, dim=-1) * (counts > 0)[:, None], counts > 0


def exhaustive_search(memory: HierarchicalMemory, query: torch.Tensor, k: int, visible=None):
    """Top-k visible leaves by the leaf keys as stored (the result a full-beam descent must equal)."""
    scores = torch.einsum("bpd,nd->bpn", query.float(), memory.tree.keys[0].float()).amax(1)
    visible = memory.tree.live[0] if visible is None else visible
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    ids = torch.where(torch.isinf(top.values), -1, top.indices)
    return ids, top.values


def check_tree(memory: HierarchicalMemory) -> None:
    """Every invariant of the implicit tree: sizes, top, dead nodes, parents = normalised means, keys."""
    tree, fanout = memory.tree, memory.config.fanout
    sizes = tree.sizes()
    for below, above in itertools.pairwise(sizes):
        assert above == -(-below // fanout)
    assert sizes[-1] <= fanout and (len(sizes) == 1 or sizes[-2] > fanout)
    if tree.num_leaves:
        assert bool(tree.live[0][-1]), "dead leaves at the right end are cut off"
    for height in range(1, len(sizes)):
        expected, live = normalized_mean_parents(tree.emb[height - 1], tree.live[height - 1], fanout)
        torch.testing.assert_close(tree.emb[height], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(tree.live[height], live)
    for height in range(len(sizes)):
        assert not (tree.emb[height].requires_grad or tree.keys[height].requires_grad)
        keys = memory.ranker.keys(tree.emb[height], height + 1).to(tree.keys[height].dtype)
        keys[~tree.live[height]] = 0
        torch.testing.assert_close(tree.keys[height], keys)
        assert not tree.emb[height][~tree.live[height]].any()
    assert memory.leaf_doc.shape == (tree.num_leaves,)
    assert set(memory.leaf_doc[tree.live[0]].tolist()) <= set(memory.doc_tokens)


# Filler for the needle tasks without parsing the standard library: 64 letter-only words
# (so key words split into train and test shares of a dozen or more) in 4096 sentences.
FILLER_WORDS = [f"word{a}{b}" for a in "abcdefgh" for b in "abcdefgh"]
FILLER_SENTENCES = tuple(
    f"Filler sentence about the {a} and the {b} without digits." for a in FILLER_WORDS for b in FILLER_WORDS
)
