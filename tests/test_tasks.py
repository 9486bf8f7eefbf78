"""Synthetic needle tasks: exact needle spans, depths, and the hit test."""

import pytest
import torch
from memory_utils import tiny_encoder

from mllm import HierarchicalMemory, MemoryConfig
from mllm.tasks import gold_leaves, key_words, kv_task, needle_hits, passkey_task
from mllm.tokenizers import ByteTokenizer

WORDS = [
    "apple",
    "bridge",
    "candle",
    "dragon",
    "engine",
    "forest",
    "garden",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lantern",
    "marble",
    "needle",
    "orange",
    "planet",
    "quartz",
    "rocket",
    "silver",
    "tunnel",
]
SENTENCES = [f"Filler sentence about the {a} and the {b} without digits." for a in WORDS for b in WORDS]


def _flat(haystack):
    """The haystack's tokens end to end, and each needle's start in them."""
    offsets = [0]
    for page in haystack.documents:
        offsets.append(offsets[-1] + len(page))
    tokens = [t for page in haystack.documents for t in page]
    return tokens, [offsets[n.doc_index] + n.token_start for n in haystack.needles]


def test_passkey_needles_sit_at_their_depths_and_share_the_filler():
    tokenizer = ByteTokenizer()
    haystacks = passkey_task(tokenizer, 4000, [0.0, 0.5, 1.0], seed=1, page_tokens=500, sentences=SENTENCES)
    for haystack, depth in zip(haystacks, [0.0, 0.5, 1.0]):
        [needle], [answer] = haystack.needles, haystack.answers
        page = haystack.documents[needle.doc_index]
        text = tokenizer.decode(page[needle.token_start : needle.token_end])
        assert text == f"The pass key is {answer}. Remember it. {answer} is the pass key."
        assert len(answer) == 2 and answer.isdigit()
        tokens, [start] = _flat(haystack)
        assert haystack.num_tokens >= 4000 and abs(start / len(tokens) - depth) < 0.02
        assert abs(haystack.depths[0] - depth) < 0.02
        assert haystack.queries == ["What is the pass key?"]
    # Only the needle's page differs between the haystacks of one seed.
    first, last = haystacks[0], haystacks[-1]
    assert len(first.documents) == len(last.documents) > 4
    differ = [i for i, (a, b) in enumerate(zip(first.documents, last.documents)) if a != b]
    assert differ == sorted({first.needles[0].doc_index, last.needles[0].doc_index})


def test_kv_pairs_are_exact_and_spread():
    tokenizer = ByteTokenizer()
    sample = kv_task(tokenizer, 5000, 20, seed=2, page_tokens=300, sentences=SENTENCES)
    for query, answer, needle in zip(sample.queries, sample.answers, sample.needles):
        key = query.removeprefix("What is the value of key ").removesuffix("?")
        page = sample.documents[needle.doc_index]
        assert tokenizer.decode(page[needle.token_start : needle.token_end]) == f"The value of key {key} is {answer}."
    tokens, starts = _flat(sample)
    assert starts == sorted(starts) and starts[-1] > 0.8 * len(tokens) and starts[0] < 0.2 * len(tokens)
    assert max(len(page) for page in sample.documents) < 300 + 200  # a page: >= 300 tokens plus one sentence or needle


def test_key_word_splits_are_disjoint():
    train, test = key_words(SENTENCES, "train"), key_words(SENTENCES, "test")
    assert train and test and not set(train) & set(test)
    assert sorted(train + test) == key_words(SENTENCES)
    with pytest.raises(ValueError, match="split"):
        key_words(SENTENCES, "dev")


def test_needle_hits_and_gold_leaves():
    tokenizer = ByteTokenizer()
    sample = kv_task(tokenizer, 3000, 8, seed=3, page_tokens=400, sentences=SENTENCES)
    memory = HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=16, chunk_size=16, fanout=4))
    doc_ids = memory.add(sample.documents)
    full = memory.retrieve(sample.queries, t=10_000, k=memory.num_leaves)
    assert needle_hits(full, sample.needles, doc_ids).all()  # every chunk returned: every needle is hit
    none = memory.retrieve(sample.queries, t=1, k=1)
    hits = needle_hits(none, sample.needles, doc_ids)
    for chunks, needle, hit in zip(none.chunks, sample.needles, hits.tolist()):
        c = chunks[0]
        assert c.doc_id in doc_ids
        assert hit == (
            c.doc_id == doc_ids[needle.doc_index]
            and c.token_start < needle.token_end
            and needle.token_start < c.token_end
        )
    gold = gold_leaves(memory, doc_ids, sample.needles)
    for leaf, needle in zip(gold.tolist(), sample.needles):
        start, end = memory.leaf_span[leaf].tolist()
        assert memory.leaf_doc[leaf] == doc_ids[needle.doc_index] and start <= needle.token_start < end
    # The gold leaf is a hit, and a memory returning exactly it hits.
    assert (memory.retrieve(sample.queries, t=10_000, k=memory.num_leaves).leaf_ids == gold[:, None]).any(1).all()


def test_chunk_cache_skips_known_chunks():
    tokenizer = ByteTokenizer()
    haystacks = passkey_task(tokenizer, 3000, [0.2, 0.8], seed=4, page_tokens=400, sentences=SENTENCES)
    config = MemoryConfig(d_model=16, chunk_size=16, fanout=4)
    encoder, cache = tiny_encoder(), {}
    first = HierarchicalMemory.build(haystacks[0].documents, encoder, config, progress=False, chunk_cache=cache)
    assert first.last_update.chunks_encoded == first.num_leaves >= len(cache)  # the filler repeats chunks
    second = HierarchicalMemory.build(haystacks[1].documents, encoder, config, progress=False, chunk_cache=cache)
    plain = HierarchicalMemory.build(haystacks[1].documents, encoder, config, progress=False)
    assert 0 < second.last_update.chunks_encoded < 0.5 * second.num_leaves  # only the two needle pages are new
    for a, b in zip(second.tree.emb, plain.tree.emb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_filler_sentences_have_no_digits():
    pytest.importorskip("ast")
    from mllm.tasks import filler_sentences

    sentences = filler_sentences()
    assert len(sentences) > 1000 and not any(ch.isdigit() for s in sentences[:2000] for ch in s)
