"""Passkey and key-value retrieval by memory size and needle depth, before and after ranker training.

The experiment of SPEC section 8 ("synthetic long-context tasks after training"):

1. ``train_task_rankers`` builds one training memory of many key-value haystacks (keys from the
   ``"train"`` share of the key words, filler of other seeds than the evaluation's) and trains
   every level pair on it with :func:`~mllm.training.level_pair.train_hierarchy`, the beam in the
   loop. Each finished pair is checkpointed; a run started again resumes after it.
2. ``evaluate_needles`` builds task memories of growing size (passkey haystacks at fixed depths;
   key-value haystacks with held-out keys), untrained and with the trained weights, and measures
   the fraction of queries whose needle chunk is among the retrieved leaves.

Haystacks of one seed share their filler pages, so a ``chunk_cache`` encodes each page once.
As a command: ``mllm train rankers`` and ``mllm eval needles`` (see ``mllm --help``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..config import MemoryConfig
from ..memory import HierarchicalMemory
from ..tasks import Haystack, filler_sentences, gold_leaves, key_words, kv_task, needle_hits, passkey_task
from .checkpoint import load_checkpoint, save_checkpoint
from .level_pair import LevelPairConfig, train_level_pair

TASKS = ("passkey", "kv")


@dataclasses.dataclass
class NeedleConfig:
    """Sizes of the needle experiment.

    Attributes:
        chunk_size, fanout, layout: of every task memory.
        page_tokens: tokens per memory document (page) of a haystack.
        train_haystacks, train_tokens, train_pairs: the ranker-training memory: this many
            key-value haystacks of ``train_tokens`` tokens with ``train_pairs`` pairs each.
        steps, lr, batch_size, train_t, temperature: per level pair (see ``LevelPairConfig``).
        sizes: memory sizes in tokens to evaluate.
        depths: passkey needle depths.
        ts: beams per level to evaluate (``retrieve(t=...)``, leaves returned: ``t``).
        min_queries: at least this many queries per (task, size): small sizes get more haystacks.
        max_passkey_seeds: at most this many haystacks per passkey depth, and at most
            ``passkey_token_budget`` tokens of filler per size (each seed is new filler to encode,
            which is what costs time at the largest sizes).
        kv_pairs: key-value pairs per haystack (fewer in small haystacks: one per 200 tokens).
        seed: of the evaluation filler; training uses seeds ``seed + 1000 + i``.
    """

    chunk_size: int = 64
    fanout: int = 16
    layout: str = "semantic"
    page_tokens: int = 1024
    train_haystacks: int = 16
    train_tokens: int = 10_000
    train_pairs: int = 64
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 64
    train_t: int = 4
    temperature: float = 0.05
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ts: tuple[int, ...] = (2, 8)
    min_queries: int = 100
    max_passkey_seeds: int = 10
    passkey_token_budget: int = 300_000
    kv_pairs: int = 100
    seed: int = 0

    def memory_config(self, d_model: int) -> MemoryConfig:
        return MemoryConfig(d_model=d_model, chunk_size=self.chunk_size, fanout=self.fanout, layout=self.layout)

    def pair_config(self) -> LevelPairConfig:
        return LevelPairConfig(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, t=self.train_t, temperature=self.temperature
        )


def task_memory(encoder, haystacks: list[Haystack], config: NeedleConfig, cache: dict | None = None):
    """One memory of the pages of ``haystacks``; returns ``(memory, doc_ids per haystack)``."""
    documents = [page for haystack in haystacks for page in haystack.documents]
    memory = HierarchicalMemory.build(
        documents, encoder, config.memory_config(encoder.d_model), progress=False, chunk_cache=cache
    )
    ids, start = [], 0
    for haystack in haystacks:
        ids.append(list(range(start, start + len(haystack.documents))))
        start += len(haystack.documents)
    return memory, ids


def trained_state(memory: HierarchicalMemory) -> dict:
    """The weights that ranker training changes: the level encoders and the ranker."""
    return {"level_encoders": memory.level_encoders.state_dict(), "ranker": memory.ranker.state_dict()}


def load_trained_state(memory: HierarchicalMemory, state: dict) -> None:
    """Put trained level encoders and ranker into ``memory`` and recompute its keys and upper levels."""
    memory.level_encoders.load_state_dict(state["level_encoders"])
    memory.ranker.load_state_dict(state["ranker"])
    memory.reindex()


def train_task_rankers(encoder, config: NeedleConfig, *, out_dir=None, progress: bool = True) -> tuple[dict, dict]:
    """Train the level encoders and rankers on key-value haystacks; returns ``(state, log)``.

    ``log`` holds the hit rates on the training queries before and after, and each pair's rows.
    With ``out_dir``, a checkpoint after every finished pair (``rankers.pt``) lets a new run with
    the same config resume; the finished weights are also written there.
    """
    sentences = filler_sentences()
    words = key_words(sentences, "train")
    haystacks = [
        kv_task(
            encoder.tokenizer,
            config.train_tokens,
            config.train_pairs,
            seed=config.seed + 1000 + i,
            page_tokens=config.page_tokens,
            sentences=sentences,
            words=words,
        )
        for i in range(config.train_haystacks)
    ]
    start = time.perf_counter()
    memory, doc_ids = task_memory(encoder, haystacks, config)
    gold = torch.cat([gold_leaves(memory, ids, h.needles) for h, ids in zip(haystacks, doc_ids)])
    queries = memory.encode_queries([q for h in haystacks for q in h.queries])
    log = {
        "memory": repr(memory),
        "levels": memory.num_levels,
        "queries": int(gold.numel()),
        "build_seconds": time.perf_counter() - start,
    }
    log["before"] = {t: _hits(memory, queries, gold, t) for t in config.ts}

    path = Path(out_dir) / "rankers.pt" if out_dir is not None else None
    saved = load_checkpoint(path) if path is not None else None
    if saved is not None and saved["config"] != dataclasses.asdict(config):
        raise ValueError(f"train_task_rankers: {path} was written with another config; use a new --out")
    pairs = dict(saved["pairs"]) if saved else {}
    if saved:
        load_trained_state(memory, saved["state"])
    for level in range(1, memory.num_levels):
        if level in pairs:
            continue
        pairs[level] = train_level_pair(memory, queries, gold, level, config.pair_config(), progress=progress)
        if path is not None:
            save_checkpoint(
                path, {"config": dataclasses.asdict(config), "pairs": pairs, "state": trained_state(memory)}
            )
    log["after"] = {t: _hits(memory, queries, gold, t) for t in config.ts}
    log["pairs"] = pairs
    log["seconds"] = time.perf_counter() - start
    return trained_state(memory), log


def _hits(memory, queries, gold, t: int) -> float:
    leaves = memory.retrieve(queries, t=t, k=t).leaf_ids
    return float((leaves == gold[:, None]).any(1).float().mean())


def _kv_pairs(config: NeedleConfig, tokens: int) -> int:
    return max(1, min(config.kv_pairs, tokens // 200))


def evaluate_needles(encoder, config: NeedleConfig, state: dict | None = None, *, progress: bool = True) -> list[dict]:
    """Needle hit rates by task, memory size, depth and beam; untrained, and trained when ``state`` is given.

    Returns rows ``{task, tokens, depth, t, weights, hits, queries, leaves, levels}``, one per cell:
    ``depth`` is the passkey's target depth, or for key-value pairs the depth bin (pairs spread
    over all depths, binned to the nearest of ``config.depths``); ``hits`` is the fraction of the
    cell's queries whose needle chunk was among the ``t`` leaves returned.
    """
    from tqdm.auto import tqdm

    sentences = filler_sentences()
    test_words = key_words(sentences, "test")
    weights = [("untrained", None)] + ([("trained", state)] if state is not None else [])
    rows, caches = [], {}
    for tokens in tqdm(config.sizes, desc="needle memories", disable=not progress):
        pairs = _kv_pairs(config, tokens)
        kv_seeds = max(1, math.ceil(config.min_queries / pairs))
        passkey_seeds = max(
            1,
            min(
                config.max_passkey_seeds,
                math.ceil(config.min_queries / len(config.depths)),
                config.passkey_token_budget // tokens,
            ),
        )
        jobs = []
        for seed in range(config.seed, config.seed + max(kv_seeds, passkey_seeds)):
            cache = caches.setdefault(seed, {})  # one seed's haystacks share filler pages, across sizes too
            if seed - config.seed < passkey_seeds:
                haystacks = passkey_task(
                    encoder.tokenizer,
                    tokens,
                    list(config.depths),
                    seed=seed,
                    page_tokens=config.page_tokens,
                    sentences=sentences,
                )
                jobs += [("passkey", haystack, depth, cache) for depth, haystack in zip(config.depths, haystacks)]
            if seed - config.seed < kv_seeds:
                haystack = kv_task(
                    encoder.tokenizer,
                    tokens,
                    pairs,
                    seed=seed,
                    page_tokens=config.page_tokens,
                    sentences=sentences,
                    words=test_words,
                )
                jobs.append(("kv", haystack, None, cache))
        cells: dict = {}
        for task, haystack, depth, cache in jobs:
            memory, [doc_ids] = task_memory(encoder, [haystack], config, cache)
            queries = memory.encode_queries(haystack.queries)
            for name, weight in weights:
                if weight is not None:
                    load_trained_state(memory, weight)
                for t in config.ts:
                    hits = needle_hits(memory.retrieve(queries, t=t, k=t), haystack.needles, doc_ids)
                    for hit, exact in zip(hits.tolist(), haystack.depths):
                        bin_ = depth if depth is not None else min(config.depths, key=lambda d: abs(d - exact))
                        cell = cells.setdefault(
                            (task, bin_, t, name), {"hits": 0, "queries": 0, "leaves": [], "levels": []}
                        )
                        cell["hits"] += hit
                        cell["queries"] += 1
                        cell["leaves"].append(memory.num_leaves)
                        cell["levels"].append(memory.num_levels)
        for (task, depth, t, name), cell in sorted(cells.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1:])):
            rows.append(
                {
                    "task": task,
                    "tokens": tokens,
                    "depth": depth,
                    "t": t,
                    "weights": name,
                    "hits": cell["hits"] / cell["queries"],
                    "queries": cell["queries"],
                    "leaves": max(cell["leaves"]),
                    "levels": max(cell["levels"]),
                }
            )
    return rows


def _tokens_label(tokens: int) -> str:
    exponent = round(math.log10(tokens))
    return f"1e{exponent}" if 10**exponent == tokens else f"{tokens:,}"


def markdown(rows: list[dict], log: dict | None = None) -> str:
    """Tables of hit rates: one per task and beam, rows = memory size x weights, columns = depth."""
    out = []
    if log is not None:
        out.append(
            f"Rankers trained on {log['queries']} key-value queries ({log['memory']}) in {log['seconds']:.0f} s; "
            "hit rate on those training queries, before -> after: "
            + ", ".join(f"t={t}: {log['before'][t]:.3f} -> {log['after'][t]:.3f}" for t in log["before"])
        )
        out.append("")
    for task in TASKS:
        for t in sorted({r["t"] for r in rows}):
            cells = [r for r in rows if r["task"] == task and r["t"] == t]
            if not cells:
                continue
            depths = sorted({r["depth"] for r in cells})
            title = "passkey" if task == "passkey" else "key-value (held-out keys)"
            out.append(f"**{title}, t={t}**: fraction of queries whose needle chunk is among the {t} leaves returned")
            out.append("")
            out.append(
                "| tokens | leaves | weights | " + " | ".join(f"depth {d:g}" for d in depths) + " | all | queries |"
            )
            out.append("|---|---|---|" + "---|" * (len(depths) + 2))
            for tokens in sorted({r["tokens"] for r in cells}):
                for name in ("untrained", "trained"):
                    line = [r for r in cells if r["tokens"] == tokens and r["weights"] == name]
                    if not line:
                        continue
                    by_depth = {r["depth"]: r for r in line}
                    total = sum(r["queries"] for r in line)
                    mean = sum(r["hits"] * r["queries"] for r in line) / total
                    values = [f"{by_depth[d]['hits']:.2f}" if d in by_depth else "-" for d in depths]
                    out.append(
                        f"| {_tokens_label(tokens)} | {line[0]['leaves']:,} | {name} | "
                        + " | ".join(values)
                        + f" | {mean:.3f} | {total} |"
                    )
            out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path) -> None:
    """Hit rate against memory size (log axis), one panel per task, a line per beam and weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(11, 4), sharey=True)
    for axis, task in zip(axes, TASKS):
        for t in sorted({r["t"] for r in rows}):
            for name, style in (("untrained", "--"), ("trained", "-")):
                cells = [r for r in rows if r["task"] == task and r["t"] == t and r["weights"] == name]
                sizes = sorted({r["tokens"] for r in cells})
                if not sizes:
                    continue
                means = []
                for tokens in sizes:
                    line = [r for r in cells if r["tokens"] == tokens]
                    means.append(sum(r["hits"] * r["queries"] for r in line) / sum(r["queries"] for r in line))
                axis.plot(sizes, means, style, marker="o", label=f"t={t}, {name}")
        axis.set_xscale("log")
        axis.set_xlabel("memory size (tokens)")
        axis.set_title("passkey" if task == "passkey" else "key-value (held-out keys)")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("needle chunk retrieved (fraction of queries)")
    axes[0].set_ylim(0, 1.02)
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(rows: list[dict], out_dir, log: dict | None = None, meta: dict | None = None) -> dict:
    """``needles.md``, ``needles.json`` and ``needles.png`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / "needles.md", "json": out_dir / "needles.json", "plot": out_dir / "needles.png"}
    files["markdown"].write_text(markdown(rows, log) + "\n")
    summary = None if log is None else {k: v for k, v in log.items() if k != "pairs"}
    files["json"].write_text(json.dumps({"meta": meta or {}, "training": summary, "rows": rows}, indent=1) + "\n")
    plot(rows, files["plot"])
    return {k: str(v) for k, v in files.items()}


def add_arguments(parser) -> None:
    defaults = NeedleConfig()
    parser.add_argument("--out", default="bench_results/needles", help="checkpoint and report directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(defaults.sizes), help="memory sizes in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=list(defaults.depths), help="passkey depths")
    parser.add_argument("--ts", type=int, nargs="+", default=list(defaults.ts), help="beams to evaluate")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per level pair")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--train-haystacks", type=int, default=defaults.train_haystacks)
    parser.add_argument("--train-tokens", type=int, default=defaults.train_tokens)
    parser.add_argument("--layout", choices=["sequential", "semantic"], default=defaults.layout)
    parser.add_argument("--no-train", action="store_true", help="evaluate the untrained memory only")
    parser.add_argument("--no-resume", action="store_true", help="retrain even if OUT holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> None:
    """``mllm train needles``: train the rankers on key-value haystacks, then evaluate both tasks."""
    import platform

    from ..pretrained import minilm_encoder

    config = NeedleConfig(
        sizes=tuple(args.sizes),
        depths=tuple(args.depths),
        ts=tuple(args.ts),
        steps=args.steps,
        lr=args.lr,
        train_haystacks=args.train_haystacks,
        train_tokens=args.train_tokens,
        layout=args.layout,
    )
    out = Path(args.out)
    if args.no_resume:
        (out / "rankers.pt").unlink(missing_ok=True)
    encoder = minilm_encoder(autocast_dtype=_bf16_if_native())
    state = log = None
    if not args.no_train:
        try:
            state, log = train_task_rankers(encoder, config, out_dir=out, progress=not args.no_progress)
        except ValueError as error:
            raise SystemExit(f"mllm train needles: {error}") from None
    start = time.perf_counter()
    rows = evaluate_needles(encoder, config, state, progress=not args.no_progress)
    meta = {
        "config": dataclasses.asdict(config),
        "encoder": "all-MiniLM-L6-v2",
        "evaluation_seconds": time.perf_counter() - start,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    files = write_reports(rows, out, log, meta)
    print(Path(files["markdown"]).read_text())
    print("wrote " + ", ".join(files.values()))


def _bf16_if_native():
    from ..encoders import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else None
