"""Synthetic long-context tasks: passkey retrieval and key-value recall.

A haystack of real filler text (sentences of the standard library's docstrings) holds needles: a
pass key, or many key-value pairs. Documents are built as token ids of the memory's tokenizer, so
each needle's token span is known exactly; a query is answered from memory when a retrieved chunk
overlaps its needle.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from .corpus import stdlib_docstrings


@dataclasses.dataclass(frozen=True)
class Needle:
    """Tokens ``[token_start, token_end)`` of document ``doc_index`` hold the answer."""

    doc_index: int
    token_start: int
    token_end: int


@dataclasses.dataclass
class TaskSample:
    """Documents (token ids), queries (texts) with their answers and needles, and each needle's depth in [0, 1]."""

    documents: list[list[int]]
    queries: list[str]
    answers: list[str]
    needles: list[Needle]
    depths: list[float]


def filler_sentences(min_words: int = 6) -> list[str]:
    """Sentences of the standard library's docstrings: varied, real text with no pass keys in it."""
    sentences = []
    for doc in stdlib_docstrings():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.text.split())):
            if len(sentence.split()) >= min_words and not any(ch.isdigit() for ch in sentence):
                sentences.append(sentence)
    return sentences


def _haystack(tokenizer, sentences: list[str], n_tokens: int, rng: random.Random) -> list[list[int]]:
    """Token ids of filler sentences, one list per sentence, about ``n_tokens`` in total."""
    out, total = [], 0
    while total < n_tokens:
        batch = tokenizer.encode([rng.choice(sentences) for _ in range(64)])
        for ids in batch:
            out.append(ids)
            total += len(ids)
            if total >= n_tokens:
                break
    return out


def _insert(
    tokenizer, pieces: list[list[int]], needles: list[tuple[float, str]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Join filler ``pieces`` with each needle text inserted at its relative depth; returns ids and needle spans."""
    cuts = sorted((round(depth * len(pieces)), i) for i, (depth, _) in enumerate(needles))
    texts = tokenizer.encode([text for _, text in needles])
    ids, spans, cut = [], [None] * len(needles), 0
    for position, piece in enumerate(pieces + [[]]):
        while cut < len(cuts) and cuts[cut][0] == position:
            index = cuts[cut][1]
            spans[index] = (len(ids), len(ids) + len(texts[index]))
            ids += texts[index]
            cut += 1
        ids += piece
    return ids, spans


def passkey_task(
    tokenizer, memory_tokens: int, depths: list[float], *, seed: int = 0, sentences: list[str] | None = None
) -> TaskSample:
    """One haystack document per depth, each of about ``memory_tokens`` tokens, with a pass key at that depth.

    The query is the same question for every document ("What is the pass key?"), so each
    document is meant to be its own memory (see ``needle_hits``).
    """
    rng = random.Random(seed)
    sentences = sentences or filler_sentences()
    documents, answers, needles = [], [], []
    for index, depth in enumerate(depths):
        key = f"{rng.randrange(10_000, 100_000)}"
        pieces = _haystack(tokenizer, sentences, memory_tokens, rng)
        ids, [(start, end)] = _insert(
            tokenizer, pieces, [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        )
        documents.append(ids)
        answers.append(key)
        needles.append(Needle(index, start, end))
    return TaskSample(documents, ["What is the pass key?"] * len(depths), answers, needles, list(depths))


def kv_task(
    tokenizer, memory_tokens: int, num_pairs: int, *, seed: int = 0, sentences: list[str] | None = None
) -> TaskSample:
    """One haystack of about ``memory_tokens`` tokens with ``num_pairs`` key-value pairs spread over all depths."""
    rng = random.Random(seed)
    sentences = sentences or filler_sentences()
    words = sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]{5,}", s)})
    keys = rng.sample(words, num_pairs)
    values = [f"{rng.randrange(100_000, 1_000_000)}" for _ in keys]
    depths = [(i + rng.random()) / num_pairs for i in range(num_pairs)]
    pieces = _haystack(tokenizer, sentences, memory_tokens, rng)
    ids, spans = _insert(
        tokenizer, pieces, [(d, f"The value of key {k} is {v}.") for d, k, v in zip(depths, keys, values)]
    )
    queries = [f"What is the value of key {k}?" for k in keys]
    return TaskSample([ids], queries, values, [Needle(0, s, e) for s, e in spans], depths)


def needle_hits(result, needles: list[Needle], doc_ids: list[int]) -> torch.Tensor:
    """bool ``[B]``: whether any retrieved chunk of query b overlaps its needle.

    ``result`` is a ``RetrievalResult`` of B queries; ``doc_ids`` maps a needle's ``doc_index``
    to the memory's document id.
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
