"""``python -m benchmarks e2e``: the whole descent against flat exact search and FAISS, 1e4..1e7 leaves.

For every N: clustered synthetic unit vectors (:mod:`benchmarks.synthetic`), float16 keys in the
semantic leaf layout, upper levels = normalised mean of the children (an untrained memory) and
keys = embeddings (the identity ranker: one probe per query, the query itself). Methods, all
returning the 10 best leaves of every query:

* ``tree t=..``: ``mllm_kernels.descend_tree`` (fanout 64, beam ``t`` at every upper level and 10
  at the leaves), one call per batch; ``tree t=.. int8``: the same on int8 keys with one float32
  scale per row (``mllm_kernels.quantize_keys``);
* ``flat``: exact search in PyTorch: the float16 keys converted to float32 in chunks of
  ``FLAT_CHUNK`` rows (bounded memory), ``queries @ chunk.T`` and ``topk`` per chunk, then a
  final ``topk``; it also gives the exact answer every recall is measured against;
* ``faiss flat``: ``faiss.IndexFlatIP`` on a float32 copy of the keys (``IndexScalarQuantizer``
  with ``QT_fp16``, also exact, where a float32 copy would not fit in memory);
* ``hnsw ef=..``: ``faiss.IndexHNSWFlat`` (inner product), only up to ``hnsw_max_n`` leaves.

Latencies are medians over blocks of calls timed in alternating rounds
(:func:`benchmarks.timing.measure_interleaved`); B=1 calls cycle over the held-out queries one at
a time, B=64 calls over batches of 64. Recall@10 is tie-aware (:func:`mllm.evaluation.recall_at_k`)
against the exact top 10 over all leaves. HNSW's latency at the tree's recall comes from its
efSearch sweep (log-linear between the two points around it). The issue's targets are printed
as a checklist with the measured values.

Memory: at 1e7 x 384 the float16 leaves take 7.7 GB. The unpermuted leaves are generated into an
unlinked scratch file (page cache, reclaimable), the permuted ones the tree and flat search read
are in RAM, and the faiss flat index (float16 there) is built after those are freed, so at most
one in-RAM copy of the keys exists at a time (plus their int8 copy, 3.8 GB).
"""

from __future__ import annotations

import gc
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mllm.layout import sampled_semantic_order, semantic_order

from . import report
from .synthetic import (
    DataSpec,
    clustered_vectors,
    float16_buffer,
    permute_rows,
    prepare_scratch,
    scratch_path,
    upper_levels,
)
from .timing import compare, measure_interleaved, round_settings

K = 10  # recall@K, and the leaves every method returns
FANOUT = 64
FLAT_CHUNK = 32_768  # rows of keys converted to float32 at once by flat search (48 MiB at D=384)
BATCHES = (1, 64)


@dataclass(frozen=True)
class E2ESizes:
    """What one preset runs."""

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000, 10_000_000)
    data: DataSpec = field(default_factory=DataSpec)
    queries: int = 256  # held-out queries: recall over all of them, timing cycles over them
    main_t: tuple[int, ...] = (8, 16, 32)  # the tree rows of the main table (t=8: the issue's)
    sweep_t: tuple[int, ...] = (4, 8, 16, 32, 64, 128)  # the tree's recall/latency curve
    hnsw_ef: tuple[int, ...] = (16, 32, 64, 128, 256, 512)  # HNSW's curve; 64 is the main row
    hnsw_main_ef: int = 64
    hnsw_m: int = 32
    # faiss's default efConstruction (40) leaves the tight clusters of this data poorly linked:
    # recall@10 then stops near 0.98 (1e5) and 0.8 (1e6) whatever efSearch; 200 reaches 1.0 (1e5).
    hnsw_ef_construction: int = 200
    hnsw_max_n: int = 1_000_000  # HNSW builds take minutes per 1e6 on 2 cores; skipped above
    # The tree of this many leaves and every larger one are timed in alternating rounds (tree t =
    # main_t[0]), so that the growth of the latency is a ratio measured side by side.
    growth_from: int = 100_000
    growth_rounds: int = 12
    float32_copy_max_bytes: int = 6 << 30  # larger: faiss flat stores float16 (IndexScalarQuantizer)
    memmap_min_bytes: int = 2 << 30  # larger unpermuted leaves live in a scratch file, not in RAM
    layout: str = "sampled"  # mllm.layout: "sampled": sampled_semantic_order; "semantic": semantic_order
    int8: bool = True  # also int8 keys (key_scales) at main_t
    # timing (see measure_interleaved)
    min_rounds: int = 3
    max_rounds: int = 12
    min_time_s: float = 0.4
    max_time_s: float = 8.0
    block_s: float = 0.05
    overhead_time_s: float = 2.0


FULL = E2ESizes()
QUICK = replace(FULL, sizes=(10_000, 100_000), max_rounds=8, min_time_s=0.2, max_time_s=3.0, block_s=0.03)
SMOKE = E2ESizes(
    sizes=(1_000, 4_500),
    data=DataSpec(d=64, topics=4, clusters=32),
    queries=64,
    main_t=(2, 4),
    sweep_t=(1, 2, 4, 8),
    hnsw_ef=(8, 16, 32),
    hnsw_main_ef=16,
    hnsw_m=16,
    hnsw_ef_construction=32,
    growth_from=1_000,
    growth_rounds=2,
    min_rounds=1,
    max_rounds=1,
    min_time_s=0.0,
    max_time_s=0.5,
    block_s=0.002,
    overhead_time_s=0.05,
)
PRESETS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (1e9 bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        return None, f"faiss not importable ({error}); pip install faiss-cpu for the FAISS columns"
    return faiss, None


# ---------------------------------------------------------------------------------------------
# Methods: each maps float32 queries [B, D] to leaf ids [B, K]


class FlatSearch:
    """Exact top-``k`` inner product over float16 ``keys`` in float32, ``chunk`` rows at a time.

    Buffers are allocated once and reused (a fresh 50 MB tensor per chunk costs about as much in
    page faults as the matmul on the virtual machines this runs on).
    """

    def __init__(self, keys: torch.Tensor, k: int = K, chunk: int = FLAT_CHUNK):
        self.keys, self.k, self.chunk = keys, k, min(chunk, keys.shape[0])
        self.block = torch.empty(self.chunk, keys.shape[1])
        self.scores = torch.empty(0)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, k], scores [B, k])``, best first."""
        b, n = queries.shape[0], self.keys.shape[0]
        if self.scores.numel() < b * self.chunk:
            self.scores = torch.empty(b * self.chunk)
        values, ids = [], []
        for start in range(0, n, self.chunk):
            rows = min(self.chunk, n - start)
            block = self.block[:rows].copy_(self.keys[start : start + rows])
            scores = torch.mm(queries, block.T, out=self.scores[: b * rows].view(b, rows))
            top = scores.topk(min(self.k, rows), dim=1)
            values.append(top.values)
            ids.append(top.indices + start)
        values, ids = torch.cat(values, 1), torch.cat(ids, 1)
        top = values.topk(min(self.k, n), dim=1)
        return ids.gather(1, top.indices), top.values

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        return self.search(queries)[0]


def tree_search(levels: list[torch.Tensor], t: int, k: int = K):
    """``descend_tree`` with beam ``t`` at the upper levels and ``k`` at the leaves; identity ranker."""
    import mllm_kernels as mk

    beams = [t] * (len(levels) - 1) + [k]

    def search(queries: torch.Tensor) -> torch.Tensor:
        probes = queries[:, None, :]
        return mk.descend_tree([probes] * len(levels), levels, FANOUT, beams)[-1][0]

    return search


def int8_levels(levels: list[torch.Tensor]):
    """``(keys, key_scales)`` per level: int8 with a float32 scale per row."""
    import mllm_kernels as mk

    pairs = [mk.quantize_keys(level) for level in levels]
    return [q for q, _ in pairs], [scale for _, scale in pairs]


def tree_search_int8(quantized, t: int, k: int = K):
    """``tree_search`` on int8 keys (``key_scales``)."""
    import mllm_kernels as mk

    keys, scales = quantized
    beams = [t] * (len(keys) - 1) + [k]

    def search(queries: torch.Tensor) -> torch.Tensor:
        probes = queries[:, None, :]
        return mk.descend_tree([probes] * len(keys), keys, FANOUT, beams, key_scales=scales)[-1][0]

    return search


def faiss_search(index, k: int = K, params=None, ids: np.ndarray | None = None):
    """``index.search``'s labels; with ``ids``, label ``j`` (the j-th vector added) is ``ids[j]``."""

    def search(queries: np.ndarray) -> np.ndarray:
        labels = index.search(queries, k, params=params)[1]
        return labels if ids is None else np.where(labels >= 0, ids[labels], -1)

    return search


def _add_blocks(index, keys: torch.Tensor, order: torch.Tensor | None = None, block: int = 1 << 16) -> None:
    """``index.add`` of float16 ``keys`` (the rows ``order``, if given) as float32, block by block."""
    n = keys.shape[0] if order is None else order.numel()
    buf = torch.empty(min(block, n), keys.shape[1])
    for start in range(0, n, block):
        rows = buf[: min(block, n - start)]
        rows.copy_(keys[start : start + block] if order is None else keys.index_select(0, order[start : start + block]))
        index.add(rows.numpy())


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Method:
    name: str  # row label, e.g. "tree t=8"
    family: str  # "tree", "flat", "faiss flat", "hnsw"
    param: int | None  # t or efSearch
    search: object  # queries -> ids
    numpy_input: bool = False
    recall: float | None = None
    timings: dict = field(default_factory=dict)  # B -> Stats dict (seconds per call)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "param": self.param,
            "recall": self.recall,
            "timings": self.timings,
        }


def _ids_of(method: Method, queries: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = []
    for start in range(0, queries.shape[0], batch):
        q = queries[start : start + batch]
        ids = method.search(q.numpy() if method.numpy_input else q)
        out.append(torch.as_tensor(np.asarray(ids)) if method.numpy_input else ids)
    return torch.cat(out)


def exact_scores(keys: torch.Tensor, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float32 scores ``[B, k]`` of the leaves ``ids`` (``-inf`` where ``-1``)."""
    rows = keys.index_select(0, ids.clamp(min=0).reshape(-1)).float().view(*ids.shape, -1)
    scores = torch.einsum("bd,bkd->bk", queries, rows)
    return scores.masked_fill(ids < 0, float("-inf"))


def _recall(found_scores: torch.Tensor, exact: torch.Tensor) -> float:
    from mllm.evaluation import recall_at_k

    # Scores of one leaf computed by two summation orders differ by ~1e-7.
    return recall_at_k(found_scores, exact, tolerance=1e-5)


def _callables(methods: list[Method], queries: torch.Tensor, batch: int):
    """One zero-argument callable per method that searches the next batch of queries, cycling."""
    batches = [queries[s : s + batch].contiguous() for s in range(0, queries.shape[0] - batch + 1, batch)]
    fns = []
    for m in methods:
        inputs = [b.numpy() for b in batches] if m.numpy_input else batches
        state = {"i": 0}

        def fn(search=m.search, inputs=inputs, state=state):
            i = state["i"]
            state["i"] = (i + 1) % len(inputs)
            return search(inputs[i])

        fns.append(fn)
    return fns


def _time(methods: list[Method], queries: torch.Tensor, s: E2ESizes, threads: int) -> None:
    """Interleaved timing of ``methods`` at every batch size; fills ``method.timings``."""
    for batch in BATCHES:
        if queries.shape[0] < batch:
            continue
        fns = _callables(methods, queries, batch)
        stats, _ = measure_interleaved(fns, names=[m.name for m in methods], **round_settings(s, threads))
        for m, st in zip(methods, stats):
            m.timings[str(batch)] = st.as_dict()


def _growth(
    levels: list[torch.Tensor], base_levels: list[torch.Tensor], queries: torch.Tensor, s: E2ESizes, threads: int
) -> dict:
    """How much slower the tree search (t = ``s.main_t[0]``) is on ``levels`` than on the tree of
    ``s.growth_from`` leaves (``base_levels``), the two timed alone in ``s.growth_rounds``
    alternating rounds: per batch, both medians and the median, smallest and largest of the
    per-round ratios (a burst of machine noise hits both sides of a round). In the rounds of all
    the methods, the 8 s calls of flat search at 1e7 leaves would leave 3 rounds."""
    t = s.main_t[0]
    trees = [Method(f"tree t={t}", "tree", t, tree_search(lv, t)) for lv in (base_levels, levels)]
    out = {"from_n": s.growth_from, "method": trees[1].name, "batches": {}}
    for batch in BATCHES:
        if queries.shape[0] < batch:
            continue
        base, larger = _callables(trees, queries, batch)
        # compare's "speed-up" of the base tree over this size's is the growth.
        r = compare(base, larger, **round_settings(s, threads, s.growth_rounds))
        out["batches"][str(batch)] = {
            "from_median": r["kernel"]["median"],
            "median": r["reference"]["median"],
            "ratio": r["speedup_round_median"],
            "ratio_min": r["speedup_min"],
            "ratio_max": r["speedup_max"],
            "rounds": r["kernel"]["blocks"],
        }
    return out


def _interp_latency(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """Latency at recall ``target`` on a curve of ``(recall, seconds)`` points: log-linear between
    the two points that bracket it (the cheapest point at or above it when none is below).
    Returns ``(seconds or None when the curve never reaches target, how)``."""
    pts = sorted(points, key=lambda p: p[1])  # by latency
    above = [p for p in pts if p[0] >= target - 1e-9]
    if not above:
        return None, "not reached"
    hi = above[0]  # the cheapest point reaching the target
    if hi[0] <= target + 1e-9:
        return hi[1], "at a measured point"
    below = [p for p in pts if p[1] < hi[1]]  # all below the target, as hi is the cheapest above
    if not below:
        return hi[1], "nearest above"
    lo = max(below, key=lambda p: p[0])
    w = (target - lo[0]) / (hi[0] - lo[0])
    return math.exp(math.log(lo[1]) + w * (math.log(hi[1]) - math.log(lo[1]))), "interpolated"


def _matched(methods: list[Method]) -> list[dict]:
    """Tree vs HNSW at equal recall: for every swept ``t``, HNSW's latency at the tree's recall."""
    tree = [m for m in methods if m.family == "tree"]
    hnsw = [m for m in methods if m.family == "hnsw"]
    rows = []
    if not hnsw:
        return rows
    for batch in map(str, BATCHES):
        curve = [(m.recall, m.timings[batch]["median"]) for m in hnsw if batch in m.timings]
        for m in tree:
            if batch not in m.timings:
                continue
            seconds, how = _interp_latency(curve, m.recall)
            tree_s = m.timings[batch]["median"]
            rows.append(
                {
                    "B": int(batch),
                    "t": m.param,
                    "recall": m.recall,
                    "tree_s": tree_s,
                    "hnsw_s": seconds,
                    "hnsw_how": how,
                    "tree_speedup": seconds / tree_s if seconds else None,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# One N


def _layout(x: torch.Tensor, s: E2ESizes) -> torch.Tensor:
    if s.layout == "semantic":
        return semantic_order(x, FANOUT)
    return sampled_semantic_order(x, FANOUT)


def build_tree(n: int, s: E2ESizes, *, scratch: str | None, build: dict, verbose: bool):
    """The data and the tree of ``n`` leaves: ``(source, levels, queries)``. ``levels`` are the
    tree's float16 keys, top to bottom (``levels[-1]`` = the leaves in the semantic layout);
    ``source`` is the unpermuted leaves when they live in a scratch file (large ``n``), else None;
    ``queries`` are the held-out queries (the same for every ``n``). Fills the timings of ``build``."""
    d = s.data.d
    start = time.perf_counter()
    in_file = n * d * 2 >= s.memmap_min_bytes
    source = float16_buffer(n, d, scratch_path(scratch, f"leaves_{n}") if in_file else None)
    clustered_vectors(s.data, n, stream=0, out=source)
    queries = clustered_vectors(s.data, s.queries, stream=1, out=torch.empty(s.queries, d))
    build["data_s"] = time.perf_counter() - start
    _log(verbose, f"N={n:,}: data {build['data_s']:.1f} s; layout ...")

    start = time.perf_counter()
    perm = _layout(source, s)
    build["layout_s"] = time.perf_counter() - start
    _log(verbose, f"  layout {build['layout_s']:.1f} s")
    start = time.perf_counter()
    leaves = permute_rows(source, perm)
    levels = upper_levels(leaves, FANOUT)
    build["levels_s"] = time.perf_counter() - start
    build["tree_s"] = build["layout_s"] + build["levels_s"]
    return (source if in_file else None), levels, queries


def run_size(
    n: int,
    s: E2ESizes,
    *,
    threads: int,
    faiss,
    scratch: str | None,
    verbose: bool,
    growth_from: list[torch.Tensor] | None = None,
) -> dict:
    """Build the data, the tree and the baselines for ``n`` leaves; time and score them.

    ``growth_from``: the levels of the tree of ``s.growth_from`` leaves, timed beside this size's
    tree (``entry["growth"]``, see :func:`_growth`)."""
    entry: dict = {"n": n, "build": {}, "notes": []}
    build = entry["build"]
    source, levels, queries = build_tree(n, s, scratch=scratch, build=build, verbose=verbose)
    leaves = levels[-1]
    in_file = source is not None
    if in_file:
        entry["notes"].append(
            f"the unpermuted leaves ({leaves.numel() * 2 / 1e9:.1f} GB) live in an unlinked scratch file (page cache, "
            "not counted in the process's RSS); the permuted leaves the tree and flat search use are in RAM"
        )
    entry["levels"] = [lv.shape[0] for lv in levels]
    d = s.data.d
    gc.collect()

    flat = FlatSearch(leaves)
    start = time.perf_counter()
    exact = flat.search(queries)[1]
    build["exact_s"] = time.perf_counter() - start
    _log(verbose, f"  levels {entry['levels']}, exact top-{K} of {s.queries} queries {build['exact_s']:.1f} s")

    ts = sorted(set(s.main_t) | set(s.sweep_t))
    methods = [Method(f"tree t={t}", "tree", t, tree_search(levels, t)) for t in ts]
    start = time.perf_counter()
    quantized = int8_levels(levels) if s.int8 else None
    if quantized:
        build["int8_s"] = time.perf_counter() - start
        methods += [Method(f"tree t={t} int8", "tree int8", t, tree_search_int8(quantized, t)) for t in s.main_t]
    methods.append(Method("flat (torch)", "flat", None, flat))

    separate = []  # faiss methods timed after the leaves are freed (large N)
    if faiss is not None:
        f32_fits = n * d * 4 <= s.float32_copy_max_bytes
        if f32_fits or not in_file:
            start = time.perf_counter()
            if f32_fits:
                index = faiss.IndexFlatIP(d)
                label = "faiss flat"
            else:
                index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                label = "faiss flat (fp16 SQ)"
            _add_blocks(index, leaves)
            build["faiss_flat_s"] = time.perf_counter() - start
            methods.append(Method(label, "faiss flat", None, faiss_search(index), numpy_input=True))
        else:
            separate.append("faiss flat (fp16 SQ)")
        if n <= s.hnsw_max_n:
            start = time.perf_counter()
            hnsw = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = s.hnsw_ef_construction
            _log(verbose, f"  HNSW build (M={s.hnsw_m}, efConstruction={s.hnsw_ef_construction}) ...")
            # Inserted in random order (as data arrives), not cluster after cluster in the tree's layout.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(s.data.seed + 1))
            _add_blocks(hnsw, leaves, order)
            build["hnsw_s"] = time.perf_counter() - start
            _log(verbose, f"  HNSW build {build['hnsw_s']:.1f} s")
            ids = order.numpy()
            for ef in s.hnsw_ef:
                search = faiss_search(hnsw, params=faiss.SearchParametersHNSW(efSearch=ef), ids=ids)
                methods.append(Method(f"hnsw ef={ef}", "hnsw", ef, search, numpy_input=True))
        else:
            entry["notes"].append(f"HNSW skipped above {s.hnsw_max_n:,} leaves (its build takes too long here)")

    for m in methods:
        m.recall = _recall(exact_scores(leaves, queries, _ids_of(m, queries)), exact)
    _log(verbose, "  recall@10: " + ", ".join(f"{m.name} {m.recall:.3f}" for m in methods))
    _time(methods, queries, s, threads)
    for m in methods:
        _log(verbose, f"  {m.name}: {_brief(m.timings)}")
    if growth_from is not None:
        g = entry["growth"] = _growth(levels, growth_from, queries, s, threads)
        ratios = ", ".join(f"B={b} {r['ratio']:.2f}x" for b, r in g["batches"].items())
        _log(verbose, f"  growth from {_n(s.growth_from)} leaves: {ratios}")

    entry["methods"] = [m.as_dict() for m in methods]
    entry["matched"] = _matched(methods)

    if separate:
        # One copy of the keys at a time: the tree's leaves go, the scratch file feeds faiss.
        del methods, flat, levels, leaves, quantized
        gc.collect()
        start = time.perf_counter()
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        _add_blocks(index, source)
        build["faiss_flat_s"] = time.perf_counter() - start
        m = Method(separate[0], "faiss flat", None, faiss_search(index), numpy_input=True)
        m.recall = _recall(exact_scores(source, queries, _ids_of(m, queries)), exact)
        _time([m], queries, s, threads)
        _log(verbose, f"  {m.name}: recall {m.recall:.3f}, " + _brief(m.timings))
        entry["notes"].append(
            f"{m.name}: keys stored as float16 (a float32 IndexFlatIP copy would need {n * d * 4 / 1e9:.0f} GB); "
            "built from the unpermuted leaves after the tree's were freed, so timed in rounds of its own, "
            "not interleaved with the other methods"
        )
        entry["methods"].append(m.as_dict())
        del index
    entry["peak_rss_gb"] = _peak_rss_gb()
    entry["loadavg"] = report.loadavg()
    return entry


def _brief(timings: dict) -> str:
    return ", ".join(f"B={b} {v['median'] * 1e3:.3f} ms" for b, v in timings.items())


# ---------------------------------------------------------------------------------------------
# Per-call overhead


def measure_overhead(s: E2ESizes, threads: int) -> dict:
    """``descend`` for B=1 on a 64-node level (float16 keys, t=8) from Python: the public function
    and ``torch.ops.mllm_kernels.descend`` directly, beside a trivial op through the dispatcher
    (``aten.alias``: the dispatcher's own round trip)."""
    import mllm_kernels as mk

    d = s.data.d
    gen = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(FANOUT, d, generator=gen), dim=1).half()
    probes = torch.nn.functional.normalize(torch.randn(1, 1, d, generator=gen), dim=2)
    parents = torch.zeros(1, 1, dtype=torch.int64)
    op = torch.ops.mllm_kernels.descend
    alias = torch.ops.aten.alias.default
    fns = {
        "mllm_kernels.descend (public)": lambda: mk.descend(probes, keys, parents, FANOUT, 8),
        "torch.ops.mllm_kernels.descend": lambda: op(probes, keys, parents, FANOUT, 8, "max", None),
        "torch.ops.aten.alias (dispatcher only)": lambda: alias(probes),
    }
    stats, _ = measure_interleaved(
        list(fns.values()),
        names=list(fns),
        threads=threads,
        min_rounds=max(3, s.min_rounds),
        max_rounds=40,
        min_time_s=s.overhead_time_s,
        max_time_s=2 * s.overhead_time_s + 1,
        block_s=s.block_s,
    )
    return {
        "shape": f"B=1, P=1, D={d}, 64 float16 keys (one parent), t=8",
        "calls": {name: st.as_dict() for name, st in zip(fns, stats)},
    }


# ---------------------------------------------------------------------------------------------
# Targets


def _median(entry: dict | None, name: str, batch: int) -> float | None:
    if entry is None:
        return None
    for m in entry["methods"]:
        if m["name"] == name and str(batch) in m["timings"]:
            return m["timings"][str(batch)]["median"]
    return None


def _status(value, ok: bool | None) -> str:
    return "not measured" if value is None or ok is None else ("met" if ok else "not met")


def targets(results: dict) -> list[dict]:
    """The issue's targets with the measured values: ``{"target", "measured", "status"}``."""
    by_n = {e["n"]: e for e in results["sizes"]}
    big, mid, hnsw_n = by_n.get(10_000_000), by_n.get(100_000), by_n.get(1_000_000)
    tree = "tree t=8"
    rows = []

    flat64, tree64 = _median(big, "flat (torch)", 64), _median(big, tree, 64)
    ratio = flat64 / tree64 if flat64 and tree64 else None
    rows.append(
        {
            "target": "descend_tree (t=8) at 1e7 leaves, B=64: at least 100x faster than flat exact search",
            "measured": None
            if ratio is None
            else f"{ratio:,.0f}x ({flat64 * 1e3:,.0f} ms vs {tree64 * 1e3:.2f} ms per batch)",
            "status": _status(ratio, None if ratio is None else ratio >= 100),
        }
    )
    tree1 = _median(big, tree, 1)
    rows.append(
        {
            "target": "descend_tree (t=8) at 1e7 leaves, B=1: below 1 ms per query",
            "measured": None if tree1 is None else f"{tree1 * 1e3:.3f} ms",
            "status": _status(tree1, None if tree1 is None else tree1 < 1e-3),
        }
    )
    side = big.get("growth") if big else None
    if side is not None and (side["from_n"], side["method"]) != (100_000, tree):
        side = None
    for batch in BATCHES:
        # Side by side (the two trees in alternating rounds) where measured; else the two sizes' own
        # runs, minutes apart on a machine whose speed drifts.
        a, b = _median(mid, tree, batch), _median(big, tree, batch)
        apart = f"{b / a:.2f}x in separate runs ({a * 1e3:.3f} -> {b * 1e3:.3f} ms)" if a and b else None
        g = side["batches"].get(str(batch)) if side else None
        if g is not None:
            growth = g["ratio"]
            measured = (
                f"{growth:.2f}x timed side by side ({g['from_median'] * 1e3:.3f} -> {g['median'] * 1e3:.3f} ms; "
                f"{g['ratio_min']:.2f}x-{g['ratio_max']:.2f}x over {g['rounds']} rounds)"
                + (f"; {apart}" if apart else "")
            )
        else:
            growth, measured = (b / a if a and b else None), apart
        rows.append(
            {
                "target": f"descend_tree (t=8), B={batch}: latency grows at most 2.5x from 1e5 to 1e7 leaves",
                "measured": measured,
                "status": _status(growth, None if growth is None else growth <= 2.5),
            }
        )
    for batch in BATCHES:
        match = None
        if hnsw_n is not None:
            match = next((r for r in hnsw_n.get("matched", []) if r["B"] == batch and r["t"] == 8), None)
        speedup = None if match is None else match["tree_speedup"]
        if match is None:
            measured = None
        elif speedup is None:
            measured = f"HNSW never reaches the tree's recall {match['recall']:.3f} in the efSearch sweep"
        else:
            measured = (
                f"{speedup:.2f}x at recall@10 {match['recall']:.3f} (tree {match['tree_s'] * 1e3:.3f} ms, "
                f"HNSW {match['hnsw_s'] * 1e3:.3f} ms, {match['hnsw_how']})"
            )
        ok = None if match is None else (speedup is None or speedup > 1.0)
        rows.append(
            {
                "target": f"1e6 leaves, B={batch}: at recall@10 matched with FAISS HNSW, the tree (t=8) answers faster",
                "measured": measured,
                "status": _status(match, ok),
            }
        )
    over = results.get("overhead")
    public = None if not over else over["calls"]["mllm_kernels.descend (public)"]["median"]
    rows.append(
        {
            "target": "descend, B=1 on a 64-node level: under 20 us from Python (public function)",
            "measured": None if public is None else f"{public * 1e6:.1f} us",
            "status": _status(public, None if public is None else public < 20e-6),
        }
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f} ms"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1e3:.3g} us"


def _cell(timings: dict, batch: int) -> str:
    st = timings.get(str(batch))
    return "-" if st is None else f"{_fmt_s(st['median'])} ({st['spread']:.0%})"


def _per_query(timings: dict, batch: int) -> str:
    st = timings.get(str(batch))
    return "-" if st is None else _fmt_s(st["median"] / batch)


def _n(n: int) -> str:
    exp = math.log10(n)
    return f"1e{exp:.0f}" if n >= 10_000 and abs(exp - round(exp)) < 1e-9 else f"{n:,}"


def header_markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        f"# mllm end-to-end retrieval benchmark ({results['preset']})",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), caches {m['caches']}",
        f"- threads: {m['torch_threads']} (torch and faiss); {m['platform']}, Python {m['python']}",
        (
            f"- torch {m['torch']}, faiss {m['faiss']}, numpy {m['numpy']}, mllm_kernels {m['mllm_kernels']}, "
            f"matplotlib {m['matplotlib']}"
        ),
        (
            f"- date: {m['date']}; load average (1 min) at start {m['loadavg_start']}, at end "
            f"{results.get('loadavg_end', '?')}; wall time {results.get('wall_s', 0) / 60:.1f} min; "
            f"peak RSS {results.get('peak_rss_gb', 0):.1f} GB"
        ),
        f"- data: {c['data']}; {c['queries']} queries",
        (
            f"- tree: fanout {FANOUT}, float16 keys = embeddings (identity ranker, one probe = the query), "
            f"upper levels = normalised mean of the children, leaves in semantic layout ({c['layout']}); "
            f"`descend_tree` keeps t nodes per upper level and {K} leaves"
        ),
        (
            f"- baselines: flat (torch) = float16 keys converted to float32 in chunks of {FLAT_CHUNK:,} rows, "
            "matmul + topk (the exact answer); faiss flat = IndexFlatIP on a float32 copy; HNSW = "
            f"IndexHNSWFlat (inner product, M={c['hnsw_m']}, efConstruction={c['hnsw_ef_construction']}) up to "
            f"{_n(c['hnsw_max_n'])} leaves"
        ),
        "- tree int8: the same levels quantised by `mllm_kernels.quantize_keys` (int8, one float32 scale per row)",
        (
            "- latency: median per call (IQR/median in brackets) over blocks of calls timed in alternating "
            "rounds; B=1 = one query per call, cycling over the queries; recall@10: tie-aware, against the "
            "exact top 10"
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def main_table(results: dict) -> str:
    rows = [
        "| N | method | recall@10 | B=1 latency | B=64 latency (per batch) | B=64 per query | flat / method (B=1, B=64) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for e in results["sizes"]:
        flat = next((m for m in e["methods"] if m["family"] == "flat"), None)
        shown = [
            m
            for m in e["methods"]
            if (m["family"] in ("tree", "tree int8") and m["param"] in results["config"]["main_t"])
            or m["family"] in ("flat", "faiss flat")
            or (m["family"] == "hnsw" and m["param"] == results["config"]["hnsw_main_ef"])
        ]
        for m in shown:
            ratios = []
            for batch in BATCHES:
                a = flat["timings"].get(str(batch)) if flat else None
                b = m["timings"].get(str(batch))
                ratios.append(f"{a['median'] / b['median']:,.1f}x" if a and b else "-")
            rows.append(
                f"| {_n(e['n'])} | {m['name']} | {m['recall']:.3f} | {_cell(m['timings'], 1)} "
                f"| {_cell(m['timings'], 64)} | {_per_query(m['timings'], 64)} | {', '.join(ratios)} |"
            )
    return "\n".join(rows) + "\n"


def build_table(results: dict) -> str:
    rows = [
        (
            "| N | levels (top to leaves) | data s | tree layout s | upper levels s | int8 keys s | exact top-10 s "
            "| faiss flat add s | HNSW build s | peak RSS GB |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("data_s", "layout_s", "levels_s", "int8_s", "exact_s", "faiss_flat_s", "hnsw_s")
    for e in results["sizes"]:
        cells = " | ".join(f"{e['build'][key]:,.1f}" if key in e["build"] else "-" for key in keys)
        levels = " > ".join(f"{x:,}" for x in e["levels"])
        rows.append(f"| {_n(e['n'])} | {levels} | {cells} | {e['peak_rss_gb']:.1f} |")
    return "\n".join(rows) + "\n"


def sweep_table(results: dict) -> str:
    rows = ["| N | method | recall@10 | B=1 latency | B=64 latency (per batch) |", "|---:|---|---:|---:|---:|"]
    for e in results["sizes"]:
        for m in e["methods"]:
            if m["family"] in ("tree", "hnsw"):
                rows.append(
                    f"| {_n(e['n'])} | {m['name']} | {m['recall']:.3f} | {_cell(m['timings'], 1)} | {_cell(m['timings'], 64)} |"
                )
    return "\n".join(rows) + "\n"


def matched_table(results: dict) -> str:
    rows = [
        "| N | B | tree t | recall@10 | tree latency | HNSW latency at that recall | how | tree speedup |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    any_rows = False
    for e in results["sizes"]:
        for r in e.get("matched", []):
            any_rows = True
            speed = "-" if r["tree_speedup"] is None else f"{r['tree_speedup']:.2f}x"
            rows.append(
                f"| {_n(e['n'])} | {r['B']} | {r['t']} | {r['recall']:.3f} | {_fmt_s(r['tree_s'])} "
                f"| {_fmt_s(r['hnsw_s'])} | {r['hnsw_how']} | {speed} |"
            )
    return "\n".join(rows) + "\n" if any_rows else "(no HNSW runs)\n"


def growth_table(results: dict) -> str:
    rows = [
        "| N | method | B | latency | same method on | its latency | growth (median of rounds) | range over rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results["sizes"]:
        g = e.get("growth")
        for batch, r in (g["batches"].items() if g else ()):
            rows.append(
                f"| {_n(e['n'])} | {g['method']} | {batch} | {_fmt_s(r['median'])} | {_n(g['from_n'])} leaves "
                f"| {_fmt_s(r['from_median'])} | {r['ratio']:.2f}x | {r['ratio_min']:.2f}x-{r['ratio_max']:.2f}x |"
            )
    return "\n".join(rows) + "\n" if len(rows) > 2 else "(no size above the growth base)\n"


def overhead_table(results: dict) -> str:
    over = results.get("overhead")
    if not over:
        return "(not measured)\n"
    rows = [f"{over['shape']}:", "", "| call | median | IQR/median |", "|---|---:|---:|"]
    for name, st in over["calls"].items():
        rows.append(f"| `{name}` | {st['median'] * 1e6:.2f} us | {st['spread']:.0%} |")
    return "\n".join(rows) + "\n"


def targets_markdown(results: dict) -> str:
    marks = {"met": "[x]", "not met": "[ ]", "not measured": "[-]"}
    rows = []
    for t in results["targets"]:
        measured = f": {t['measured']}" if t["measured"] else ""
        rows.append(f"- {marks[t['status']]} **{t['status']}** - {t['target']}{measured}")
    return "\n".join(rows) + "\n"


def markdown(results: dict) -> str:
    notes = results.get("notes", [])
    for e in results["sizes"]:
        notes = notes + [f"N={_n(e['n'])}: {note}" for note in e["notes"]]
    parts = [
        header_markdown(results),
        "## Targets (issue 5)\n\n" + targets_markdown(results),
        "## Latency and recall@10\n\n" + main_table(results),
        "## Growth of the latency, timed side by side\n\n"
        f"The tree of {_n(results['config']['growth_from'])} leaves and each larger one are timed in "
        f"{results['config']['growth_rounds']} alternating rounds of their own, so that the ratio is measured "
        "side by side (the machine's speed drifts over the minutes between sizes).\n\n"
        + growth_table(results),
        "## Build\n\n" + build_table(results),
        "## Recall / latency trade-off (tree t, HNSW efSearch)\n\n" + sweep_table(results),
        "## Tree vs HNSW at matched recall@10\n\n"
        "HNSW's latency at the tree's recall, log-linear between the two efSearch points around it.\n\n"
        + matched_table(results),
        "## Per-call overhead\n\n" + overhead_table(results),
    ]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


def plot(results: dict, out: Path) -> list[Path]:
    """Latency against N (log-log) for B=1 and B=64, and the recall/latency curves; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    c = results["config"]
    series = [
        ("tree t=8", lambda m: m["family"] == "tree" and m["param"] == 8, "tab:blue", "o"),
        ("tree t=8 int8", lambda m: m["family"] == "tree int8" and m["param"] == 8, "tab:purple", "v"),
        ("flat (torch)", lambda m: m["family"] == "flat", "tab:red", "s"),
        ("faiss flat", lambda m: m["family"] == "faiss flat", "tab:orange", "^"),
        (
            f"hnsw ef={c['hnsw_main_ef']}",
            lambda m: m["family"] == "hnsw" and m["param"] == c["hnsw_main_ef"],
            "tab:green",
            "D",
        ),
    ]
    paths = []
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 4.8))
    for ax, batch in zip(axes, BATCHES):
        for label, pick, color, marker in series:
            pts = []
            for e in results["sizes"]:
                m = next((m for m in e["methods"] if pick(m)), None)
                if m is not None and str(batch) in m["timings"]:
                    pts.append((e["n"], m["timings"][str(batch)]["median"] * 1e3, m["recall"]))
            if pts:
                xs, ys, _ = zip(*pts)
                ax.plot(xs, ys, marker=marker, color=color, label=label)
                for x, y, r in pts:
                    ax.annotate(f"{r:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leaves N")
        ax.set_ylabel(f"latency per call, ms (B={batch})")
        ax.set_title(f"B={batch} (labels: recall@10)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"descend_tree vs flat search and FAISS - {m['cpu']}, {m['torch_threads']} threads", fontsize=10)
    fig.tight_layout()
    path = out / "e2e_latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    curves = [e for e in results["sizes"] if any(m["family"] == "hnsw" for m in e["methods"])]
    curves = curves or results["sizes"]
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes, BATCHES):
        for i, e in enumerate(curves):
            for family, style in (("tree", "-o"), ("hnsw", "--D")):
                pts = [
                    (m["param"], m["timings"][str(batch)]["median"] * 1e3, m["recall"])
                    for m in e["methods"]
                    if m["family"] == family and str(batch) in m["timings"]
                ]
                if pts:
                    _, xs, ys = zip(*sorted(pts))  # in the order of t / efSearch
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], label=f"{family} N={_n(e['n'])}", ms=4)
        ax.set_xscale("log")
        ax.set_xlabel(f"latency per call, ms (B={batch})")
        ax.set_ylabel("recall@10")
        ax.set_title(f"recall vs latency, B={batch} (tree: t sweep, hnsw: efSearch sweep)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "e2e_recall.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def write(results: dict, out_dir: str | Path, plots: bool = True) -> dict:
    """``e2e.json``, ``e2e.md`` and (with ``plots`` and matplotlib) ``e2e_latency.png`` /
    ``e2e_recall.png``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "e2e.json", "markdown": out / "e2e.md"}
    paths["json"].write_text(json.dumps(report._json_safe(results), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    for path in plot(results, out) if plots else []:
        paths[path.stem.replace("e2e_", "png_")] = path
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------------------------
# Entry point


def run_e2e(
    preset: str = "full",
    *,
    sizes: list[int] | None = None,
    threads: int | None = None,
    out_dir: str | Path | None = "bench_results",
    use_faiss: bool = True,
    layout: str | None = None,
    scratch: str | None = None,
    int8: bool = True,
    hnsw: tuple[int | None, int | None] = (None, None),
    noise_decay: float | None = None,
    verbose: bool = True,
) -> dict:
    """Run the end-to-end benchmark; returns the results dict (also written to ``out_dir``).

    Args:
        preset: ``"full"`` (1e4..1e7), ``"quick"`` (1e4, 1e5) or ``"smoke"`` (tiny, seconds).
        sizes: leaf counts to run instead of the preset's.
        threads: torch and faiss threads (default: torch's current setting); restored afterwards.
        out_dir: where the files go; None writes nothing.
        use_faiss: False skips the FAISS columns (as when faiss is not installed).
        layout: ``"sampled"`` (default: ``mllm.layout.sampled_semantic_order``, scales to 1e7) or
            ``"semantic"`` (``mllm.layout.semantic_order``, minutes at 1e6).
        scratch: directory of the scratch file holding large unpermuted leaves (default: the
            system's temporary directory); created if missing.
        int8: also time the tree on int8 keys.
        hnsw: ``(M, efConstruction)`` of the HNSW index; None keeps the preset's (32, 200).
        noise_decay: the data's within-cluster noise spectrum (:class:`DataSpec`); None keeps the
            preset's (isotropic).
    """
    if scratch is not None:
        scratch = prepare_scratch(scratch)
    s = PRESETS[preset]
    if sizes:
        s = replace(s, sizes=tuple(int(n) for n in sizes))
    if layout:
        s = replace(s, layout=layout)
    if not int8:
        s = replace(s, int8=False)
    if noise_decay is not None:
        s = replace(s, data=replace(s.data, noise_decay=noise_decay))
    if hnsw[0] is not None:
        s = replace(s, hnsw_m=hnsw[0])
    if hnsw[1] is not None:
        s = replace(s, hnsw_ef_construction=hnsw[1])
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    faiss, why = _import_faiss() if use_faiss else (None, "faiss disabled (--no-faiss)")
    faiss_threads = None
    if faiss is not None:
        faiss_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
    try:
        return _run(s, preset, threads, faiss, why, out_dir, scratch, verbose)
    finally:
        torch.set_num_threads(previous)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)


def _run(s: E2ESizes, preset: str, threads: int, faiss, why: str | None, out_dir, scratch, verbose) -> dict:
    start = time.perf_counter()
    machine = report.machine_info(threads)
    machine.update(
        faiss=faiss.__version__ if faiss is not None else f"not used ({report._version('faiss-cpu')})",
        numpy=np.__version__,
        matplotlib=report._version("matplotlib"),
    )
    config = {k: v for k, v in asdict(s).items() if k != "data"}
    config["data"] = s.data.describe()
    config["data_spec"] = asdict(s.data)
    notes = []
    if why:
        notes.append(why)
    results = {"preset": preset, "machine": machine, "config": config, "sizes": [], "notes": notes}
    _log(verbose, "per-call overhead of descend ...")
    results["overhead"] = measure_overhead(s, threads)
    base_levels = None
    if any(n > s.growth_from for n in s.sizes):
        _log(verbose, f"the tree of {s.growth_from:,} leaves, timed beside every larger one ...")
        base_levels = build_tree(s.growth_from, s, scratch=scratch, build={}, verbose=False)[1]
    for i, n in enumerate(s.sizes):
        growth_from = base_levels if n > s.growth_from else None
        entry = run_size(n, s, threads=threads, faiss=faiss, scratch=scratch, verbose=verbose, growth_from=growth_from)
        results["sizes"].append(entry)
        gc.collect()
        results["targets"] = targets(results)
        results["loadavg_end"] = report.loadavg()
        results["wall_s"] = time.perf_counter() - start
        results["peak_rss_gb"] = _peak_rss_gb()
        if i + 1 < len(s.sizes):
            results["notes"] = [*notes, f"partial results: {i + 1} of {len(s.sizes)} sizes done"]
        else:
            results["notes"] = notes
        if out_dir is not None:  # after every size, so that a long run interrupted keeps what it measured
            results["files"] = write(results, out_dir, plots=i + 1 == len(s.sizes))
    return results
