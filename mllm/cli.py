"""The ``mllm`` command line: build, add, remove, query, bench, train, demo.

mllm build memory.mllm --stdlib                  # or: FILES... / --jsonl docs.jsonl
mllm add memory.mllm notes/*.txt
mllm remove memory.mllm 12 13
mllm query memory.mllm "how do I parse arguments" --t 8 --k 5
mllm bench memory.mllm                           # recall and latency vs exact flat search
mllm demo                                        # the README's main job
mllm train autoencoder | needles | lm            # the training experiments (checkpointed, resumable)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import demo


def _read_documents(args) -> tuple[list[str], list[str]]:
    """(texts, titles) from --stdlib, --jsonl (objects with "text" and optional "title") or files."""
    texts, titles = [], []
    if getattr(args, "stdlib", False):
        from .corpus import stdlib_docstrings

        docs = stdlib_docstrings(max_docs=args.max_docs)
        texts += [d.text for d in docs]
        titles += [d.title for d in docs]
    if args.jsonl:
        with open(args.jsonl, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise SystemExit(f"mllm: {args.jsonl}:{number}: expected an object with a string 'text'")
                    texts.append(record["text"])
                    titles.append(str(record.get("title", f"{args.jsonl}:{number}")))
    for file in args.files:
        texts.append(Path(file).read_text(encoding="utf-8"))
        titles.append(str(file))
    if not texts:
        raise SystemExit("mllm: no documents given (FILES, --jsonl or --stdlib)")
    return texts, titles


def _encoder(name: str):
    from .encoders import ChunkEncoder
    from .pretrained import MINILM, pretrained_encoder

    if name == "scratch":
        return ChunkEncoder.from_scratch()
    return pretrained_encoder(MINILM if name == "minilm" else name)


def _load(path: str):
    from .memory import HierarchicalMemory

    start = time.perf_counter()
    memory = HierarchicalMemory.load(path, mmap=True)  # mapped, not read into fresh buffers
    print(
        f"loaded {path}: {len(memory)} documents, {memory.num_leaves} leaves, {memory.num_levels} levels "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return memory


def cmd_build(args) -> None:
    from .config import MemoryConfig
    from .memory import HierarchicalMemory

    texts, titles = _read_documents(args)
    encoder = _encoder(args.encoder)
    config = MemoryConfig(
        d_model=encoder.d_model,
        chunk_size=args.chunk_size,
        fanout=args.fanout,
        t=args.t,
        key_dtype=args.key_dtype,
        layout=args.layout,
    )
    memory = HierarchicalMemory.build(texts, encoder, config, titles=titles, progress=True)
    memory.save(args.memory)
    print(f"built {args.memory}: {len(memory)} documents, {memory.num_leaves} chunks, {memory.num_levels} levels")


def cmd_add(args) -> None:
    memory = _load(args.memory)
    texts, titles = _read_documents(args)
    ids = memory.add(texts, titles=titles, progress=True)
    memory.save(args.memory)
    print(
        f"added documents {ids[0]}..{ids[-1]} ({memory.last_update.chunks_encoded} chunks encoded, "
        f"{memory.last_update.nodes_reencoded} tree nodes re-encoded)"
    )


def cmd_remove(args) -> None:
    memory = _load(args.memory)
    try:
        memory.remove(args.doc_ids)
    except KeyError as error:
        raise SystemExit(f"mllm remove: {error.args[0]}") from None
    if args.compact:
        memory.compact()
    memory.save(args.memory)
    print(f"removed {len(args.doc_ids)} documents; {len(memory)} remain")


def cmd_query(args) -> None:
    import contextlib

    memory = _load(args.memory)
    context = memory.masked(args.mask) if args.mask else contextlib.nullcontext()
    query = memory.encode_queries(args.query)
    with context:
        memory.retrieve(query, t=args.t, k=args.k, profile=True)  # warm-up: the first call pays one-time set-up
        result = memory.retrieve(query, t=args.t, k=args.k, profile=True)
    for question, chunks in zip(args.query, result.chunks):
        print(f"Q: {question}")
        for chunk in chunks:
            snippet = " ".join(memory.chunk_text(chunk).split())[:100]
            print(
                f"  {chunk.score:6.3f}  doc {chunk.doc_id:<6} tokens {chunk.token_start}:{chunk.token_end:<5} "
                f"{memory.doc_titles[chunk.doc_id][:40]:<40}  {snippet}"
            )
    print("latency per level (top to bottom): " + ", ".join(f"{s * 1e6:.0f} us" for s in result.level_seconds))


def cmd_bench(args) -> None:
    import torch

    from .evaluation import evaluate

    memory = _load(args.memory)
    generator = torch.Generator().manual_seed(args.seed)
    live = torch.nonzero(memory.tree.live[0]).flatten()
    picked = live[torch.randint(0, live.numel(), (args.queries,), generator=generator)]
    # Queries near stored chunks: a leaf embedding plus noise of the same norm.
    noise = torch.nn.functional.normalize(torch.randn(args.queries, memory.config.d_model, generator=generator), dim=-1)
    query = torch.nn.functional.normalize(memory.tree.emb[0][picked] + args.noise * noise, dim=-1)
    rows, flat_us = evaluate(memory, query[:, None], args.beams, k=args.k)
    print(
        f"{memory.num_leaves} leaves, {memory.num_levels} levels, fanout {memory.config.fanout}, "
        f"{args.queries} queries, batch 1, layout {memory.config.layout}"
    )
    print(f"{'t':>4} {f'recall@{args.k}':>10} {'us/query':>9}")
    for row in rows:
        print(f"{row.t:>4} {row.recall:>10.3f} {row.us_per_query:>9.1f}")
    print(f"{'flat':>4} {1.0:>10.3f} {flat_us:>9.1f}")


def _training_module(name: str):
    import importlib

    return importlib.import_module(f".training.{name}", __package__)


def _training_command(name: str):
    return lambda args: _training_module(name).run(args)


def _add_document_arguments(parser) -> None:
    parser.add_argument("files", nargs="*", help="text files, one document each")
    parser.add_argument("--jsonl", help="a JSON-lines file of {'text': ..., 'title': ...}")
    parser.add_argument("--stdlib", action="store_true", help="the docstrings of the Python standard library")
    parser.add_argument("--max-docs", type=int, default=None, help="with --stdlib: the first N docstrings only")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = main_parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a memory from documents and save it")
    build.add_argument("memory", help="output file")
    _add_document_arguments(build)
    build.add_argument("--encoder", default="minilm", help="minilm, scratch, or a local Hugging Face model directory")
    build.add_argument("--chunk-size", type=int, default=128)
    build.add_argument("--fanout", type=int, default=16)
    build.add_argument("--t", type=int, default=8)
    build.add_argument("--key-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    build.add_argument("--layout", default="semantic", choices=["sequential", "semantic"])
    build.set_defaults(run=cmd_build)

    add = commands.add_parser("add", help="add documents to a saved memory")
    add.add_argument("memory")
    _add_document_arguments(add)
    add.set_defaults(run=cmd_add)

    remove = commands.add_parser("remove", help="remove documents for good")
    remove.add_argument("memory")
    remove.add_argument("doc_ids", nargs="+", type=int)
    remove.add_argument("--compact", action="store_true", help="also drop the tombstones (leaf ids change)")
    remove.set_defaults(run=cmd_remove)

    query = commands.add_parser("query", help="retrieve chunks for one or more questions")
    query.add_argument("memory")
    query.add_argument("query", nargs="+")
    query.add_argument("--t", type=int, default=None, help="beam per level (default: the memory's)")
    query.add_argument("--k", type=int, default=5, help="chunks returned per question")
    query.add_argument("--mask", type=int, nargs="*", help="documents to hide")
    query.set_defaults(run=cmd_query)

    bench = commands.add_parser("bench", help="recall and latency of a saved memory vs exact flat search")
    bench.add_argument("memory")
    bench.add_argument("--queries", type=int, default=200)
    bench.add_argument("--beams", type=int, nargs="+", default=[4, 8, 16, 32])
    bench.add_argument("--k", type=int, default=10)
    bench.add_argument("--noise", type=float, default=0.5, help="query = normalise(chunk + noise * random unit)")
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(run=cmd_bench)

    train = commands.add_parser("train", help="training experiments, with progress, checkpoints and resume")
    experiments = train.add_subparsers(dest="experiment", required=True)
    for name, module, help_text in (
        ("autoencoder", "convergence", "the seed's convergence experiment: reconstruct chunks from their embedding"),
        (
            "needles",
            "needles",
            "rankers trained on key-value haystacks; passkey and key-value retrieval by size and depth",
        ),
        ("lm", "passkey_lm", "a small LM answering passkey questions from memory, against one without"),
    ):
        experiment = experiments.add_parser(name, help=help_text)
        experiment.set_defaults(run=_training_command(module), experiment_module=module)
        _training_module(module).add_arguments(experiment)

    demo_parser = commands.add_parser("demo", help="a memory over the standard library's docs with MiniLM")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return main_parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
