"""HierarchicalMemory: structure, incremental add, remove, masking, retrieval and backtracking."""

import itertools

import pytest
import torch
from memory_utils import check_tree, exhaustive_search, random_documents, tiny_encoder, tiny_memory

from mllm import HierarchicalMemory, LevelEncoder, MemoryConfig


def test_untrained_encoders_pool_as_a_mean():
    encoder = tiny_encoder()
    ids = torch.randint(0, 256, (3, 7))
    lengths = torch.tensor([7, 2, 5])
    hidden, _ = encoder.backbone(ids, lengths)
    expected = torch.stack([hidden[c, : int(n)].mean(0) for c, n in enumerate(lengths)])
    torch.testing.assert_close(encoder(ids, lengths), torch.nn.functional.normalize(expected, dim=-1))

    level = LevelEncoder(16, fanout=4, num_layers=2)  # identity-initialised layers
    children = torch.randn(7, 16)
    offsets = torch.tensor([0, 4, 7])
    expected = torch.stack([children[:4].mean(0), children[4:].mean(0)])
    torch.testing.assert_close(level(children, offsets), torch.nn.functional.normalize(expected, dim=-1))


@pytest.mark.parametrize("count", [1, 3, 17, 60])
@pytest.mark.parametrize("layout", ["sequential", "semantic"])
def test_build_structure(gen, count, layout):
    docs = random_documents(gen, count)
    memory = tiny_memory(docs, layout=layout)
    check_tree(memory)
    assert len(memory) == count
    chunks = sum(-(-len(d) // 8) for d in docs)
    assert memory.num_leaves == chunks
    # provenance: every chunk of every document is a leaf exactly once, whatever the layout
    spans = sorted(zip(memory.leaf_doc.tolist(), map(tuple, memory.leaf_span.tolist())))
    expected = sorted((i, (s, min(s + 8, len(d)))) for i, d in enumerate(docs) for s in range(0, len(d), 8))
    assert spans == expected


def test_layouts_hold_the_same_leaves(gen):
    docs = random_documents(gen, 50)
    sequential, semantic = tiny_memory(docs), tiny_memory(docs, layout="semantic")
    key = lambda m: {(d, s): e for d, s, e in zip(m.leaf_doc.tolist(), m.leaf_span[:, 0].tolist(), m.tree.emb[0])}
    a, b = key(sequential), key(semantic)
    assert a.keys() == b.keys()
    for chunk in a:
        torch.testing.assert_close(a[chunk], b[chunk])


def test_add_reencodes_only_the_right_edge(gen):
    docs = random_documents(gen, 400)
    memory = tiny_memory(docs, fanout=4)
    assert memory.num_levels >= 5
    for extra in ([[1, 2, 3]], [[5] * 30], random_documents(gen, 3)):
        memory.add(extra)
        chunks = sum(-(-len(d) // 8) for d in extra)
        assert memory.last_update.chunks_encoded == chunks
        # each level re-encodes at most the ancestors of the new leaves: one partial parent + the new ones
        assert memory.last_update.nodes_reencoded <= (chunks // 4 + 2) * memory.num_levels
        assert memory.last_update.nodes_reencoded <= memory.config.fanout * memory.num_levels
        check_tree(memory)
    rebuilt = tiny_memory(docs + [[1, 2, 3], [5] * 30] + [list(d) for d in memory.doc_tokens.values()][-3:], fanout=4)
    for a, b in zip(memory.tree.emb, rebuilt.tree.emb):
        torch.testing.assert_close(a, b)


def test_add_grows_a_new_top_level(gen):
    memory = tiny_memory(random_documents(gen, 1, max_tokens=8), fanout=4)
    assert memory.num_levels == 1
    levels = [memory.num_levels]
    for _ in range(20):
        memory.add([[7] * 8])
        check_tree(memory)
        levels.append(memory.num_levels)
    assert levels == sorted(levels) and levels[-1] == 3  # 21 leaves -> 6 -> 2


def test_remove_repairs_the_tree_and_forgets(gen):
    docs = random_documents(gen, 80)
    memory = tiny_memory(docs, fanout=4)
    removed = [0, 5, 6, 7, 40, 79]
    memory.remove(removed)
    check_tree(memory)
    assert len(memory) == 80 - len(removed)
    assert not set(removed) & set(memory.doc_tokens) and not set(removed) & set(memory.doc_titles)
    assert not torch.isin(memory.leaf_doc[memory.tree.live[0]], torch.tensor(removed)).any()
    query = memory.tree.emb[0][:, None][memory.tree.live[0]]
    result = memory.retrieve(query, t=10_000, k=20)
    assert not set(removed) & {c.doc_id for chunks in result.chunks for c in chunks}
    with pytest.raises(KeyError, match="unknown doc_ids"):
        memory.remove([5])


def test_remove_everything_then_add(gen):
    docs = random_documents(gen, 30)
    memory = tiny_memory(docs)
    memory.remove(range(30))
    assert len(memory) == 0 and memory.num_levels == 0 and memory.num_leaves == 0
    result = memory.retrieve(torch.randn(2, 16))
    assert result.chunks == [[], []]
    ids = memory.add(docs[:3])
    assert ids == [30, 31, 32]
    check_tree(memory)


def test_compact_drops_tombstones(gen):
    docs = random_documents(gen, 60)
    for layout in ("sequential", "semantic"):
        memory = tiny_memory(docs, layout=layout)
        memory.remove(range(0, 60, 3))
        before = {(d, s) for d, s in zip(memory.leaf_doc.tolist(), memory.leaf_span[:, 0].tolist()) if d >= 0}
        memory.compact()
        check_tree(memory)
        assert bool(memory.tree.live[0].all())
        assert before == set(zip(memory.leaf_doc.tolist(), memory.leaf_span[:, 0].tolist()))


def test_masked_hides_documents_and_their_parents(gen):
    docs = random_documents(gen, 60, max_tokens=16)
    memory = tiny_memory(docs, fanout=4)
    hidden = list(range(30))
    queries = memory.tree.emb[0][:, None]
    with memory.masked(hidden):
        masks = memory.visible_masks()
        leaves = masks[-1]
        assert not leaves[torch.isin(memory.leaf_doc, torch.tensor(hidden))].any()
        for above, below in itertools.pairwise(masks):  # a parent is visible iff a child is
            padded = torch.nn.functional.pad(below, (0, (-below.numel()) % 4)).view(-1, 4)
            assert torch.equal(above, padded.any(1))
        for t in (1, 2, 4, 10_000):
            result = memory.retrieve(queries, t=t, k=4)
            assert not set(hidden) & {c.doc_id for chunks in result.chunks for c in chunks}
            # masked subtrees take no beam: every selected node has visible content under it
            for ids, mask in zip(result.ids, masks):
                assert bool(mask[ids[ids >= 0]].all())
            assert all(len(chunks) == (4 if t > 60 else len(chunks)) and chunks for chunks in result.chunks)
        full = memory.retrieve(queries, t=10_000, k=5)
        _, exact_scores = exhaustive_search(memory, queries, 5, leaves)
        torch.testing.assert_close(full.scores[-1], exact_scores)
    assert memory.visible_masks() is None
    assert {c.doc_id for c in memory.retrieve(queries[:20], t=10_000, k=1).chunks[0]} <= set(range(60))


def test_masked_nests_and_checks_ids(gen):
    memory = tiny_memory(random_documents(gen, 10))
    with memory.masked([1, 2]):
        with memory.masked([2, 3]):
            assert set(memory._masked) == {1, 2, 3}
        assert set(memory._masked) == {1, 2}
    assert not memory._masked
    with pytest.raises(KeyError, match="masked: unknown doc_ids"), memory.masked([99]):
        pass


@pytest.mark.parametrize("key_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["sequential", "semantic"])
def test_full_beam_equals_exhaustive_search(gen, key_dtype, layout):
    memory = tiny_memory(random_documents(gen, 70), key_dtype=key_dtype, layout=layout, fanout=3)
    query = torch.nn.functional.normalize(torch.randn(9, 2, 16, generator=gen), dim=-1)
    result = memory.retrieve(query, t=10_000, k=7)
    ids, scores = exhaustive_search(memory, query, 7)
    torch.testing.assert_close(result.scores[-1], scores)
    assert torch.equal(result.leaf_ids, ids)  # kernel and reference break ties by smaller id alike


def test_retrieve_backtracks_chunks(gen):
    docs = random_documents(gen, 25)
    memory = tiny_memory(docs)
    result = memory.retrieve([docs[3][:8], docs[10]], t=4, k=6, profile=True)
    assert len(result.level_seconds) == memory.num_levels and len(result.ids) == memory.num_levels
    assert [i.shape for i in result.ids] == [(2, 4)] * (memory.num_levels - 1) + [(2, 6)]
    for chunks in result.chunks:
        assert [c.score for c in chunks] == sorted((c.score for c in chunks), reverse=True)
        for chunk in chunks:
            tokens = docs[chunk.doc_id][chunk.token_start : chunk.token_end]
            assert 0 < len(tokens) <= 8
            assert memory.chunk_text(chunk) == memory.encoder.tokenizer.decode(tokens)
    # the first query is exactly chunk 0 of document 3: a full beam finds it first, with score 1
    result = memory.retrieve([docs[3][:8]], t=10_000, k=1)
    assert result.chunks[0][0][:3] == (3, 0, 8) and result.chunks[0][0].score == pytest.approx(1, abs=1e-4)


def test_profile_and_descend_tree_agree(gen):
    memory = tiny_memory(random_documents(gen, 60))
    query = torch.randn(5, 16, generator=gen)
    a, b = memory.retrieve(query, t=3, k=5), memory.retrieve(query, t=3, k=5, profile=True)
    for x, y in zip(a.ids, b.ids):
        assert torch.equal(x, y)


def test_long_queries_become_several_probes(gen):
    memory = tiny_memory(random_documents(gen, 30))
    query = memory.encode_queries([list(range(20)), [1, 2]])
    assert query.shape == (2, 3, 16)  # 20 tokens = 3 chunks of 8; the short query repeats its chunk
    assert torch.equal(query[1, 0], query[1, 2])
    chunks = memory.encode_chunks(torch.arange(20), torch.tensor([0, 8, 16, 20]))
    torch.testing.assert_close(query[0], chunks)


def test_text_documents_and_titles():
    memory = HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=16, chunk_size=8, fanout=4))
    ids = memory.add(["hello world", "naïve café"], titles=["a", "b"])
    assert memory.doc_titles == {ids[0]: "a", ids[1]: "b"}
    result = memory.retrieve("hello wo", t=8, k=1)
    assert result.chunks[0][0].doc_id == ids[0]
    assert memory.chunk_text(result.chunks[0][0]) == "hello wo"


def test_bad_input_is_named():
    memory = HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=16, chunk_size=8, fanout=4))
    with pytest.raises(ValueError, match=r"documents\[1\] has token ids outside"):
        memory.add([[1, 2], [300]])
    with pytest.raises(ValueError, match="titles"):
        memory.add([[1]], titles=["a", "b"])
    memory.add([[1, 2, 3]] * 20)
    with pytest.raises(ValueError, match="query embeddings must be"):
        memory.retrieve(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"t\[0\] must be >= 1"):
        memory.retrieve(torch.randn(2, 16), t=0)
    with pytest.raises(ValueError, match="t has 1 values"):
        memory.retrieve(torch.randn(2, 16), t=[3])
    with pytest.raises(ValueError, match="at least one token"):
        memory.retrieve([[]])
    with pytest.raises(ValueError, match="d_model"):
        HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=32))
    with pytest.raises(ValueError, match="chunk_size"):
        HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=16, chunk_size=100))
    with pytest.raises(ValueError, match="fanout"):
        MemoryConfig(fanout=1)
    with pytest.raises(ValueError, match="layout"):
        MemoryConfig(layout="random")


def test_ranker_scores_through_score_children_with_gradients(gen):
    memory = tiny_memory(random_documents(gen, 40), fanout=4)
    height = memory.num_levels - 1  # the level below the top
    embeddings = memory.tree.emb[height - 1].clone().requires_grad_(True)
    query = torch.randn(3, 2, 16, generator=gen)
    parents = torch.tensor([[0, 1], [1, -1], [0, 0]])  # ids of the top level (at least 2 nodes)
    scores, child_ids = memory.ranker.score(query, embeddings, height, parents, fanout=4)
    assert scores.shape == child_ids.shape == (3, 8)
    expected = torch.einsum("bpd,bcd->bpc", query, embeddings[child_ids.clamp(min=0)]).amax(1)
    valid = child_ids >= 0
    torch.testing.assert_close(scores[valid], expected[valid])
    torch.nn.functional.log_softmax(scores.masked_fill(~valid, -1e4), dim=1)[:, 0].sum().backward()
    assert embeddings.grad.abs().sum() > 0
    assert memory.ranker.query_proj[height - 1].weight.grad.abs().sum() > 0
    assert memory.ranker.key_proj[height - 1].weight.grad.abs().sum() > 0


def test_small_adds_grow_in_place_and_cuts_leave_no_trace(gen):
    memory = tiny_memory(random_documents(gen, 50))
    pointers = set()
    for _ in range(40):
        memory.add([[1, 2, 3]])
        pointers.add(memory.tree.emb[0].data_ptr())
    assert len(pointers) <= 2  # spare capacity grows by half: no copy of the levels per add
    check_tree(memory)
    memory.remove(range(60, 90))  # cuts leaves and parents at the right end
    check_tree(memory)
    for (name, height), buffer in memory.tree._buffers.items():
        used = getattr(memory.tree, name)[height].shape[0]
        assert not buffer[used:].any(), f"rows cut from {name} at height {height} are not erased"


def test_masking_spends_no_beam_on_hidden_subtrees():
    """Recall of the visible documents under a mask beats retrieving unmasked and filtering after."""
    from mllm.evaluation import FlatIndex, recall_at_k

    gen = torch.Generator().manual_seed(0)
    memory = tiny_memory(random_documents(gen, 300), fanout=4, layout="semantic")
    hidden = torch.arange(0, 300, 2)
    leaves = memory.tree.emb[0][torch.randint(0, memory.num_leaves, (200,), generator=gen)]
    query = torch.nn.functional.normalize(leaves + 0.3 * torch.randn(200, 16, generator=gen), dim=-1)[:, None]
    for t in (2, 4, 8):
        unmasked = memory.retrieve(query, t=t, k=10)
        filtered = unmasked.leaf_ids.masked_fill(torch.isin(unmasked.leaf_doc, hidden), -1)
        with memory.masked(hidden.tolist()):
            flat = FlatIndex(memory)
            _, exact = flat.search(query, 10)
            masked = recall_at_k(flat.scores_of(query, memory.retrieve(query, t=t, k=10).leaf_ids), exact)
            assert masked >= recall_at_k(flat.scores_of(query, filtered), exact)


def test_cutting_a_level_re_encodes_the_grandparent():
    """Found by the property test: a removal that cuts the last node of a level must reach its parent above."""
    memory = tiny_memory([[1] * 8] * 12 + [[7]], fanout=3)  # 13 leaves -> 5 -> 2
    memory.remove([12])  # the last leaf: level 1 shrinks to 4 nodes, so node 1 at level 2 loses a child
    assert memory.tree.sizes() == [12, 4, 2]
    check_tree(memory)


def test_reindex_follows_changed_weights(gen):
    memory = tiny_memory(random_documents(gen, 50), fanout=4)
    memory.remove([3])
    with torch.no_grad():
        memory.ranker.key_proj[0].weight.mul_(2)
    stale = memory.tree.keys[0].clone()
    memory.reindex()
    check_tree(memory)  # keys agree with the new key projection
    assert not torch.equal(stale, memory.tree.keys[0])
    assert not memory.tree.live[0][memory.leaf_doc == -1].any()

    with torch.no_grad():
        memory.level_encoders[0].readout.query.add_(torch.randn(1, 16, generator=gen))
    memory.reindex()
    leaves, live = memory.tree.emb[0], memory.tree.live[0]
    full = [p for p in range(memory.tree.sizes()[1]) if live[p * 4 : p * 4 + 4].all() and p * 4 + 4 <= len(live)]
    children = torch.cat([leaves[p * 4 : p * 4 + 4] for p in full])
    expected = memory.level_encoders[0](children, torch.arange(len(full) + 1) * 4)
    torch.testing.assert_close(memory.tree.emb[1][full], expected.detach())
