"""Random sequences of add / remove / mask / save / load / compact against a brute-force model.

The model keeps, per live document, the embeddings of its chunks (encoded on their own when the
document was added) and the set of masked documents. After every step: the tree invariants hold;
no removed or masked document is ever returned, at any beam; a full beam returns exactly the
exhaustive top-k of the model; and every visible chunk is found by its own embedding.
"""

import shutil
import tempfile

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from memory_utils import check_tree, tiny_encoder

from mllm import HierarchicalMemory, MemoryConfig

documents = st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=30), min_size=1, max_size=4)


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="mllm-prop-")
        config = MemoryConfig(d_model=16, chunk_size=8, fanout=3, key_dtype="float32", layout="semantic")
        self.memory = HierarchicalMemory(tiny_encoder(), config)
        self.chunks: dict[int, dict[tuple[int, int], torch.Tensor]] = {}  # doc -> (start, end) -> embedding
        self.masks: list[object] = []  # open masked() context managers
        self.masked: list[list[int]] = []

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def hidden(self) -> set[int]:
        return {doc for ids in self.masked for doc in ids}

    @rule(docs=documents)
    def add(self, docs):
        ids = self.memory.add(docs)
        for doc_id, tokens in zip(ids, docs):
            spans = [(s, min(s + 8, len(tokens))) for s in range(0, len(tokens), 8)]
            offsets = torch.tensor([s for s, _ in spans] + [len(tokens)])
            emb = self.memory.encode_chunks(torch.tensor(tokens), offsets)
            self.chunks[doc_id] = dict(zip(spans, emb))

    @precondition(lambda self: self.chunks)
    @rule(data=st.data())
    def remove(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.chunks)), min_size=1, max_size=3, unique=True))
        self.memory.remove(ids)
        for doc_id in ids:
            del self.chunks[doc_id]

    @precondition(lambda self: self.chunks)
    @rule(data=st.data())
    def mask(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.chunks)), min_size=1, max_size=3, unique=True))
        context = self.memory.masked(ids)
        context.__enter__()
        self.masks.append(context)
        self.masked.append(ids)

    @precondition(lambda self: self.masks)
    @rule()
    def unmask(self):
        self.masks.pop().__exit__(None, None, None)
        self.masked.pop()

    @precondition(lambda self: not self.masks)  # masking is a view of a live memory, not saved state
    @rule(mmap=st.booleans())
    def save_and_load(self, mmap):
        path = f"{self.directory}/memory.mllm"
        self.memory.save(path)
        self.memory = HierarchicalMemory.load(path, mmap=mmap)

    @rule()
    def compact(self):
        self.memory.compact()

    @invariant()
    def tree_is_consistent(self):
        check_tree(self.memory)
        assert set(self.memory.doc_tokens) == set(self.chunks)

    @invariant()
    def retrieval_matches_the_model(self):
        visible = {
            (d, span): e for d, spans in self.chunks.items() if d not in self.hidden() for span, e in spans.items()
        }
        queries = torch.nn.functional.normalize(
            torch.randn(3, 16, generator=torch.Generator().manual_seed(len(visible))), dim=-1
        )
        if visible:
            queries = torch.cat([queries, torch.stack(list(visible.values()))[:5]])
        excluded = (set(range(self.memory.next_doc_id)) - set(self.chunks)) | self.hidden()
        for t in (1, 2, 10_000):
            result = self.memory.retrieve(queries, t=t, k=4)
            assert not excluded & {c.doc_id for chunks in result.chunks for c in chunks}
        result = self.memory.retrieve(queries, t=10_000, k=4)
        if not visible:
            assert all(not chunks for chunks in result.chunks)
            return
        keys = torch.stack(list(visible.values()))
        exact = (queries @ keys.T).topk(min(4, len(visible)), dim=1).values
        for b, chunks in enumerate(result.chunks):
            torch.testing.assert_close(torch.tensor([c.score for c in chunks]), exact[b], atol=1e-4, rtol=1e-4)
            for chunk in chunks:  # each returned chunk is a visible chunk, with its true score
                embedding = visible[(chunk.doc_id, (chunk.token_start, chunk.token_end))]
                assert abs(float(queries[b] @ embedding) - chunk.score) < 1e-4
        for b, (span, embedding) in enumerate(list(visible.items())[:5], start=3):  # found by itself
            top = result.chunks[b]
            own = [c for c in top if (c.doc_id, (c.token_start, c.token_end)) == span]
            assert own or top[-1].score > 1 - 1e-4, "its own chunk scores 1; only exact duplicates may push it out"


TestMemoryProperties = MemoryMachine.TestCase
TestMemoryProperties.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
