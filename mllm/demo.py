"""``mllm demo``: a memory over the Python standard library's documentation, with MiniLM.

1. Reads the docstrings of the installed standard library (``mllm.corpus``).
2. Encodes every chunk once with the offline all-MiniLM-L6-v2 encoder (mean pooling through
   ``cls_pool``) and builds the tree with the sequential layout.
3. Answers a few example questions, printing the documents found and the latency of each level.
4. Measures recall@10 of the descent against exact flat search over the leaves, and the latency
   per query of both, at several beams ``t``; then re-orders the leaves into the semantic layout
   (balanced k-means; no chunk is re-encoded) and measures again.
"""

from __future__ import annotations

import random
import time

import torch

from .config import MemoryConfig
from .corpus import stdlib_docstrings
from .evaluation import FlatIndex, evaluate
from .memory import HierarchicalMemory

EXAMPLE_QUESTIONS = [
    "How do I parse command line arguments?",
    "serialize a Python object to a JSON string",
    "compute a message digest with a secret key",
    "run a shell command and capture its output",
    "temporary directory that is deleted automatically",
]


def add_arguments(parser) -> None:
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N docstrings (default: all)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--fanout", type=int, default=16)
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 8, 16, 32], help="beams t to evaluate")
    parser.add_argument("--eval-queries", type=int, default=200, help="sampled docstring summaries used as queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="also save the (semantic) memory to this file")
    parser.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="encode in bfloat16 (auto: when the CPU has native bf16)",
    )


def _summary(text: str) -> str:
    """A docstring's first sentence or line: a natural query whose answer is in the corpus."""
    first = text.strip().split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0][:200]


def _print_answers(memory: HierarchicalMemory, questions: list[str], texts: list[str]) -> None:
    """The top 3 chunks of each question, with the text of the document (doc ids are corpus indices)."""
    query = memory.encode_queries(questions)
    memory.retrieve(query, t=8, k=5, profile=True)  # warm-up: the first call pays one-time set-up
    result = memory.retrieve(query, t=8, k=5, profile=True)
    exact, _ = FlatIndex(memory).search(query, 3)
    levels = " + ".join(f"{s * 1e6:.0f}" for s in result.level_seconds)
    for b, (question, chunks) in enumerate(zip(questions, result.chunks)):
        agree = len(set(result.leaf_ids[b, :3].tolist()) & set(exact[b].tolist()))
        print(f"\n  Q: {question}   (exact flat search: {agree} of its top 3 found)")
        for chunk in chunks[:3]:
            snippet = " ".join(texts[chunk.doc_id].split())[:80]
            print(f"    {chunk.score:5.3f}  {memory.doc_titles[chunk.doc_id]:<40.40}  {snippet}")
    print(f"\n  latency per level, top to bottom, batch of {len(questions)}: {levels} us")


def run(args) -> None:
    from .encoders import cpu_has_native_bf16
    from .pretrained import minilm_encoder

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    docs = stdlib_docstrings(max_docs=args.max_docs)
    print(
        f"corpus: {len(docs)} docstrings of the Python {'.'.join(map(str, __import__('sys').version_info[:3]))} "
        f"standard library ({sum(len(d.text) for d in docs) / 1e6:.2f} M characters, {time.perf_counter() - start:.1f} s)"
    )
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_native_bf16())
    encoder = minilm_encoder(autocast_dtype=torch.bfloat16 if bf16 else None)
    print(f"encoder: all-MiniLM-L6-v2 (offline), {'bfloat16' if bf16 else 'float32'} compute")
    config = MemoryConfig(
        d_model=encoder.d_model, chunk_size=args.chunk_size, fanout=args.fanout, layout="sequential", seed=args.seed
    )
    start = time.perf_counter()
    memory = HierarchicalMemory.build([d.text for d in docs], encoder, config, titles=[d.title for d in docs])
    sizes = " -> ".join(str(n) for n in reversed(memory.tree.sizes()))
    print(
        f"built: {memory.num_leaves} chunks of <= {args.chunk_size} tokens, {memory.num_levels} levels "
        f"({sizes} nodes, top to leaves), in {time.perf_counter() - start:.1f} s"
    )

    print("\nexample questions (sequential layout, t=8):")
    texts = [d.text for d in docs]
    _print_answers(memory, EXAMPLE_QUESTIONS, texts)

    picked = random.Random(args.seed).sample(range(len(docs)), min(args.eval_queries, len(docs)))
    questions = EXAMPLE_QUESTIONS + [_summary(docs[i].text) for i in picked]
    query = memory.encode_queries(questions)
    rows, flat_us = evaluate(memory, query, args.beams)
    start = time.perf_counter()
    memory.config.layout = "semantic"
    memory.compact()
    print(f"\nre-ordered the leaves into the semantic layout in {time.perf_counter() - start:.1f} s")
    semantic_rows, semantic_flat_us = evaluate(memory, query, args.beams)
    print("\nexample questions (semantic layout, t=8):")
    _print_answers(memory, EXAMPLE_QUESTIONS[:2], texts)

    print(f"\nrecall@10 against exact flat search over {memory.num_leaves} leaves, {len(questions)} queries, batch 1:")
    print(f"  {'layout':<11} {'t':>3} {'recall@10':>9} {'us/query':>9}")
    for layout_rows, flat in ((rows, flat_us), (semantic_rows, semantic_flat_us)):
        for row in layout_rows:
            print(f"  {row.layout:<11} {row.t:>3} {row.recall:>9.3f} {row.us_per_query:>9.1f}")
        print(f"  {'flat':<11} {'':>3} {1.0:>9.3f} {flat:>9.1f}   (exact search, same run)")
    if args.save:
        memory.save(args.save)
        print(f"\nsaved to {args.save}")
