"""The embedded stdlib corpus and the recall / flat-search helpers of the demo."""

import pytest
import torch
from memory_utils import random_documents, tiny_memory

from mllm.corpus import stdlib_docstrings
from mllm.evaluation import FlatIndex, evaluate, recall_at_k


def test_stdlib_docstrings_are_read_without_importing(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""The package docstring, long enough to be kept."""\n')
    (package / "mod.py").write_text(
        'raise SystemExit("never executed")\n'
        'def f():\n    """Function f does something useful with its arguments."""\n'
        'class C:\n    """A class."""\n    def m(self):\n        """Method m of class C, documented at length."""\n'
    )
    (package / "broken.py").write_text("def (:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x.py").write_text('"""A test module docstring that is long enough to count."""\n')
    docs = stdlib_docstrings(root=str(tmp_path), min_chars=20)
    assert [d.title for d in docs] == ["pkg", "pkg.mod.f", "pkg.mod.C.m"]
    assert docs[2].text == "Method m of class C, documented at length."
    assert stdlib_docstrings(root=str(tmp_path), min_chars=20, max_docs=1) == docs[:1]


def test_stdlib_corpus_is_real_and_stable():
    docs = stdlib_docstrings(max_docs=300)
    assert len(docs) == 300 and docs == stdlib_docstrings(max_docs=300)
    assert all(len(d.text) >= 40 and d.title for d in docs)
    assert not any(".test." in d.title or d.title.startswith("test.") for d in docs)


def test_recall_counts_ties_as_hits():
    exact = torch.tensor([[3.0, 2.0, 2.0], [1.0, 0.5, float("-inf")]])
    assert recall_at_k(torch.tensor([[3.0, 2.0, 2.0], [1.0, 0.5, float("-inf")]]), exact) == 1.0
    found = torch.tensor([[2.0, 2.0, 1.0], [1.0, 0.25, float("-inf")]])
    assert recall_at_k(found, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_flat_index_and_evaluate(gen):
    memory = tiny_memory(random_documents(gen, 60), fanout=3)
    query = torch.nn.functional.normalize(torch.randn(6, 1, 16, generator=gen), dim=-1)
    ids, scores = FlatIndex(memory).search(query, 5)
    torch.testing.assert_close(FlatIndex(memory).scores_of(query, ids), scores)
    rows, flat_us = evaluate(memory, query, [1, 10_000], k=5, rounds=1)
    assert rows[-1].recall == 1.0 and 0 <= rows[0].recall <= 1 and flat_us > 0
