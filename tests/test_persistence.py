"""Saving and loading memories: round trips, forgetting on disk, damaged files."""

import os

import pytest
import torch
from memory_utils import random_documents, tiny_encoder, tiny_memory

from mllm import HierarchicalMemory, MemoryFileError


def assert_same_memory(a: HierarchicalMemory, b: HierarchicalMemory) -> None:
    assert a.config == b.config and len(a) == len(b) and a.next_doc_id == b.next_doc_id
    assert a.doc_titles == b.doc_titles
    assert a.doc_tokens.keys() == b.doc_tokens.keys()
    assert all(torch.equal(a.doc_tokens[i], b.doc_tokens[i]) for i in a.doc_tokens)
    for name in ("emb", "keys", "live"):
        for x, y in zip(getattr(a.tree, name), getattr(b.tree, name), strict=True):
            assert torch.equal(x, y)
    assert torch.equal(a.leaf_doc, b.leaf_doc) and torch.equal(a.leaf_span, b.leaf_span)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("key_dtype", ["float16", "bfloat16"])
def test_round_trip(tmp_path, gen, mmap, key_dtype):
    memory = tiny_memory(random_documents(gen, 40), key_dtype=key_dtype, layout="semantic")
    memory.remove([3, 4])
    path = tmp_path / "m.mllm"
    memory.save(path)
    loaded = HierarchicalMemory.load(path, mmap=mmap)
    assert_same_memory(memory, loaded)
    query = torch.randn(4, 16, generator=gen)
    for x, y in zip(memory.retrieve(query, t=3).ids, loaded.retrieve(query, t=3).ids):
        assert torch.equal(x, y)
    # a loaded memory keeps working: add, remove, save again
    loaded.add([[1, 2, 3]])
    loaded.remove([0])
    loaded.save(path)
    assert_same_memory(loaded, HierarchicalMemory.load(path))
    assert os.listdir(tmp_path) == ["m.mllm"]


def test_empty_memory_round_trip(tmp_path):
    memory = HierarchicalMemory(tiny_encoder(), tiny_memory([[1]]).config)
    memory.save(tmp_path / "empty.mllm")
    loaded = HierarchicalMemory.load(tmp_path / "empty.mllm")
    assert len(loaded) == 0 and loaded.num_levels == 0
    assert loaded.add([[5, 6]]) == [0]


def test_trained_weights_round_trip(tmp_path, gen):
    memory = tiny_memory(random_documents(gen, 20), level_layers=(1,))
    with torch.no_grad():
        for parameter in memory.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=gen))
    memory.save(tmp_path / "m.mllm")
    assert_same_memory(memory, HierarchicalMemory.load(tmp_path / "m.mllm"))


def test_removed_documents_leave_nothing_on_disk(tmp_path, gen):
    docs = random_documents(gen, 30)
    secret = list(b"the secret passphrase is swordfish, do not keep it")
    docs[12] = secret
    memory = tiny_memory(docs)
    memory.doc_titles[12] = "SECRET-TITLE"
    leaves = torch.nonzero(memory.leaf_doc == 12).flatten()
    traces = [memory.tree.emb[0][i].numpy().tobytes() for i in leaves]
    traces += [memory.tree.keys[0][i].numpy().tobytes() for i in leaves]
    traces += [torch.tensor(secret, dtype=torch.int32).numpy().tobytes()[:64], b"SECRET-TITLE"]
    path = tmp_path / "m.mllm"
    memory.save(path)
    data = path.read_bytes()
    assert all(trace in data for trace in traces)  # the check can see them

    memory.remove([12])
    for trace in traces[:-2]:  # nothing left in memory either
        assert not any(trace == row.numpy().tobytes() for row in memory.tree.emb[0])
        assert not any(trace == row.numpy().tobytes() for row in memory.tree.keys[0])
    memory.save(path)
    data = path.read_bytes()
    assert not any(trace in data for trace in traces)


def test_damaged_files_raise_memory_file_error(tmp_path, gen):
    memory = tiny_memory(random_documents(gen, 10))
    path = tmp_path / "m.mllm"
    memory.save(path)
    good = path.read_bytes()
    for cut in (0, 7, 100, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(MemoryFileError, match="m.mllm"):
            HierarchicalMemory.load(path)
    damaged = bytearray(good)
    damaged[-50] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(MemoryFileError, match="checksum"):
        HierarchicalMemory.load(path)
    with pytest.raises(FileNotFoundError):
        HierarchicalMemory.load(tmp_path / "missing.mllm")


def test_structurally_wrong_memory_is_rejected(tmp_path, gen):
    from mllm.storage import load_tensors, save_tensors

    memory = tiny_memory(random_documents(gen, 30))
    path = tmp_path / "m.mllm"
    memory.save(path)
    tensors, meta = load_tensors(path)
    bad = dict(tensors)
    bad["tree.1.emb"] = tensors["tree.1.emb"][:-1]
    save_tensors(path, bad, meta)
    with pytest.raises(MemoryFileError, match="inconsistent"):
        HierarchicalMemory.load(path)
    bad = dict(tensors)
    bad["leaf_span"] = tensors["leaf_span"] + 1000
    save_tensors(path, bad, meta)
    with pytest.raises(MemoryFileError, match="spans"):
        HierarchicalMemory.load(path)
    save_tensors(path, tensors, {**meta, "kind": "something else"})
    with pytest.raises(MemoryFileError, match="does not hold"):
        HierarchicalMemory.load(path)
