"""Synthetic long-context tasks: passkey retrieval and key-value recall.

A haystack of real filler text (sentences of the standard library's docstrings) holds needles: a
pass key, or many key-value pairs. Documents are built as token ids of the memory's tokenizer, so
each needle's token span is known exactly; a query is answered from memory when a retrieved chunk
overlaps its needle.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import zlib
from collections.abc import Sequence

import torch

from .corpus import stdlib_docstrings


@dataclasses.dataclass(frozen=True)
class Needle:
    """Tokens ``[token_start, token_end)`` of page ``doc_index`` of a haystack hold the answer."""

    doc_index: int
    token_start: int
    token_end: int


@dataclasses.dataclass
class Haystack:
    """One memory's worth of a task: pages of token ids (one memory document each), and queries
    with their answers, needles and depths (the needle's token position over the haystack's, in [0, 1])."""

    documents: list[list[int]]
    queries: list[str]
    answers: list[str]
    needles: list[Needle]
    depths: list[float]

    @property
    def num_tokens(self) -> int:
        return sum(len(page) for page in self.documents)


@functools.lru_cache(maxsize=4)
def filler_sentences(min_words: int = 6) -> tuple[str, ...]:
    """Sentences of the standard library's docstrings: varied, real text with no pass keys in it.

    Read once per process (parsing the standard library takes seconds)."""
    sentences = []
    for doc in stdlib_docstrings():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.text.split())):
            if len(sentence.split()) >= min_words and not any(ch.isdigit() for ch in sentence):
                sentences.append(sentence)
    return tuple(sentences)


def key_words(sentences: Sequence[str], split: str | None = None) -> list[str]:
    """Words of five or more letters in ``sentences``, sorted; ``split="train"`` / ``"test"`` keeps a
    fixed, disjoint 80 / 20 share of them (by a hash of the word), so held-out keys are never trained on."""
    words = sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]{5,}", s)})
    if split is None:
        return words
    if split not in ("train", "test"):
        raise ValueError(f"key_words: split must be 'train', 'test' or None, got {split!r}")
    return [w for w in words if (zlib.crc32(w.encode()) % 5 == 0) == (split == "test")]


def filler_pages(
    tokenizer, sentences: Sequence[str], memory_tokens: int, page_tokens: int, seed: int
) -> list[list[list[int]]]:
    """About ``memory_tokens`` tokens of filler as pages of >= ``page_tokens`` tokens, each page a list
    of sentences (token ids). The same seed gives the same pages, and a smaller haystack is a prefix
    of a larger one, so chunk embeddings can be shared between task memories (``chunk_cache``)."""
    if memory_tokens < 1 or page_tokens < 1:
        raise ValueError(f"filler_pages: need memory_tokens and page_tokens >= 1, got {memory_tokens}, {page_tokens}")
    rng = random.Random(seed)
    pages, page, page_len, total = [], [], 0, 0
    while total < memory_tokens:
        for ids in tokenizer.encode([rng.choice(sentences) for _ in range(64)]):
            page.append(ids)
            page_len += len(ids)
            total += len(ids)
            if page_len >= page_tokens or total >= memory_tokens:
                pages.append(page)
                page, page_len = [], 0
            if total >= memory_tokens:
                break
    return pages


def _with_needles(
    tokenizer, pages: list[list[list[int]]], needles: list[tuple[float, str]]
) -> tuple[list[list[int]], list[Needle], list[float]]:
    """Join each page's sentences, inserting every ``(depth, text)`` needle at the sentence boundary
    nearest to that depth of the haystack; returns pages, needles and their exact depths."""
    starts, total = [], 0
    for page in pages:  # token position of every sentence boundary
        starts.append([])
        for sentence in page:
            starts[-1].append(total)
            total += len(sentence)
    boundaries = [(p, s, pos) for p, page_starts in enumerate(starts) for s, pos in enumerate(page_starts)]
    boundaries.append((len(pages) - 1, len(pages[-1]), total))  # after the last sentence
    texts = tokenizer.encode([text for _, text in needles])
    where = {}
    for index, (depth, _) in enumerate(needles):
        p, s, _ = min(boundaries, key=lambda b: abs(b[2] - depth * total))
        where.setdefault((p, s), []).append(index)
    out_pages, found = [], [None] * len(needles)
    for p, page in enumerate(pages):
        ids = []
        for s, sentence in enumerate(page + [[]]):
            for index in where.get((p, s), []):
                found[index] = (p, len(ids), len(ids) + len(texts[index]))
                ids += texts[index]
            ids += sentence
        out_pages.append(ids)
    needle_list = [Needle(p, a, b) for p, a, b in found]
    depths = [min(1.0, (starts[n.doc_index][0] + n.token_start) / max(total, 1)) for n in needle_list]
    return out_pages, needle_list, depths


def passkey_task(
    tokenizer,
    memory_tokens: int,
    depths: list[float],
    *,
    seed: int = 0,
    page_tokens: int = 1024,
    sentences: Sequence[str] | None = None,
) -> list[Haystack]:
    """One haystack per depth, each about ``memory_tokens`` tokens of filler with a pass key near that depth.

    The query is the same question in every haystack ("What is the pass key?"), so each haystack is
    its own memory. All haystacks share the filler pages of ``seed`` and differ only in the page
    that holds the needle. Pass keys are two-digit numbers: a 384-dim sentence embedding keeps
    those, not five-digit ones, which matters when an LM must read the key off the embedding.
    """
    rng = random.Random(seed)
    sentences = sentences or filler_sentences()
    pages = filler_pages(tokenizer, sentences, memory_tokens, page_tokens, seed)
    out = []
    for depth in depths:
        key = f"{rng.randrange(10, 100)}"
        text = f"The pass key is {key}. Remember it. {key} is the pass key."
        documents, needles, exact = _with_needles(tokenizer, pages, [(depth, text)])
        out.append(Haystack(documents, ["What is the pass key?"], [key], needles, exact))
    return out


def kv_task(
    tokenizer,
    memory_tokens: int,
    num_pairs: int,
    *,
    seed: int = 0,
    page_tokens: int = 1024,
    sentences: Sequence[str] | None = None,
    words: list[str] | None = None,
) -> Haystack:
    """One haystack of about ``memory_tokens`` tokens with ``num_pairs`` key-value pairs spread over all
    depths; keys are drawn from ``words`` (default: ``key_words(sentences)``), values are six digits."""
    rng = random.Random(seed)
    sentences = sentences or filler_sentences()
    words = words or key_words(sentences)
    if num_pairs > len(words):
        raise ValueError(f"kv_task: num_pairs={num_pairs} exceeds the {len(words)} key words")
    keys = rng.sample(words, num_pairs)
    values = [f"{rng.randrange(100_000, 1_000_000)}" for _ in keys]
    depths = [(i + rng.random()) / num_pairs for i in range(num_pairs)]
    pages = filler_pages(tokenizer, sentences, memory_tokens, page_tokens, seed)
    documents, needles, exact = _with_needles(
        tokenizer, pages, [(d, f"The value of key {k} is {v}.") for d, k, v in zip(depths, keys, values)]
    )
    queries = [f"What is the value of key {k}?" for k in keys]
    return Haystack(documents, queries, values, needles, exact)


def needle_hits(result, needles: list[Needle], doc_ids: list[int]) -> torch.Tensor:
    """bool ``[B]``: whether any retrieved chunk of query b overlaps its needle.

    ``result`` is a ``RetrievalResult`` of B queries; ``doc_ids`` maps a needle's ``doc_index``
    (a page of its haystack) to the memory's document id.
    """
    hits = []
    for chunks, needle in zip(result.chunks, needles):
        doc = doc_ids[needle.doc_index]
        hits.append(
            any(
                c.doc_id == doc and c.token_start < needle.token_end and needle.token_start < c.token_end
                for c in chunks
            )
        )
    return torch.tensor(hits, dtype=torch.bool)


def gold_leaves(memory, doc_ids: list[int], needles: list[Needle]) -> torch.Tensor:
    """int64 ``[len(needles)]``: the leaf of ``memory`` that holds each needle's first token.

    ``doc_ids`` maps a needle's ``doc_index`` to the memory's document id (what ``add`` returned).
    """
    doc, span = memory.leaf_doc, memory.leaf_span
    out = []
    for needle in needles:
        leaf = torch.nonzero(
            (doc == doc_ids[needle.doc_index]) & (span[:, 0] <= needle.token_start) & (needle.token_start < span[:, 1])
        ).flatten()
        if leaf.numel() != 1:
            raise ValueError(f"gold_leaves: no live leaf holds {needle}")
        out.append(int(leaf[0]))
    return torch.tensor(out, dtype=torch.int64)
