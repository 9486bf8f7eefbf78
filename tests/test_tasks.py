"""Synthetic needle tasks: exact needle spans, depths, and the hit test."""

import pytest
from memory_utils import tiny_encoder

from mllm import HierarchicalMemory, MemoryConfig
from mllm.tasks import kv_task, needle_hits, passkey_task
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
SENTENCES = [f"Filler sentence about the {a} and the {b} without digits." for a in WORDS for b in WORDS[:5]]


def test_passkey_needles_sit_at_their_depths():
    tokenizer = ByteTokenizer()
    sample = passkey_task(tokenizer, 2000, [0.0, 0.5, 1.0], seed=1, sentences=SENTENCES)
    for doc, needle, answer, depth in zip(sample.documents, sample.needles, sample.answers, sample.depths):
        text = tokenizer.decode(doc[needle.token_start : needle.token_end])
        assert text == f"The pass key is {answer}. Remember it. {answer} is the pass key."
        assert len(doc) >= 2000 and abs(needle.token_start / len(doc) - depth) < 0.05
    assert sample.queries == ["What is the pass key?"] * 3


def test_kv_pairs_are_exact_and_spread():
    tokenizer = ByteTokenizer()
    sample = kv_task(tokenizer, 5000, 20, seed=2, sentences=SENTENCES)
    doc = sample.documents[0]
    for query, answer, needle in zip(sample.queries, sample.answers, sample.needles):
        key = query.removeprefix("What is the value of key ").removesuffix("?")
        assert tokenizer.decode(doc[needle.token_start : needle.token_end]) == f"The value of key {key} is {answer}."
    starts = [n.token_start for n in sample.needles]
    assert starts == sorted(starts) and starts[-1] > 0.8 * len(doc)


def test_needle_hits_checks_overlap():
    tokenizer = ByteTokenizer()
    sample = kv_task(tokenizer, 3000, 8, seed=3, sentences=SENTENCES)
    memory = HierarchicalMemory(tiny_encoder(), MemoryConfig(d_model=16, chunk_size=16, fanout=4))
    doc_ids = memory.add(sample.documents)
    full = memory.retrieve(sample.queries, t=10_000, k=memory.num_leaves)
    assert needle_hits(full, sample.needles, doc_ids).all()  # every chunk returned: every needle is hit
    none = memory.retrieve(sample.queries, t=1, k=1)
    hits = needle_hits(none, sample.needles, doc_ids)
    for chunks, needle, hit in zip(none.chunks, sample.needles, hits.tolist()):
        c = chunks[0]
        assert hit == (c.token_start < needle.token_end and needle.token_start < c.token_end)


def test_filler_sentences_have_no_digits():
    pytest.importorskip("ast")
    from mllm.tasks import filler_sentences

    sentences = filler_sentences()
    assert len(sentences) > 1000 and not any(ch.isdigit() for s in sentences[:2000] for ch in s)
