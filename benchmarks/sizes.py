"""Problem sizes and measurement budgets of the op benchmarks: full, quick and smoke presets."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sizes:
    """Shapes of every benchmark case and how long to measure each.

    The defaults are the full run (the issue's targets on a 2-core CPU with a 32 MiB L3).
    """

    B: int = 64  # queries
    P: int = 4  # probes per query
    T: int = 8  # parents per query
    fanout: int = 64
    D: int = 384
    t: int = 8  # beam kept per level
    n_cached: int = 8_192  # descend level that fits in the caches (6 MiB of float16 keys)
    n_large: int = 2_000_000  # descend level far larger than the caches (1.5 GB)
    n_grad: int = 32_768  # score_children forward+backward level (keys get a dense [N, D] grad)
    tree_leaves: int = 1_000_000  # descend_tree: 1e6 -> 15625 -> 245 -> 4 with fanout 64
    pool_rows: int = 1_000_000  # cls_pool forward rows
    pool_rows_grad: int = 100_000  # cls_pool forward+backward rows (the reference keeps R*H*D floats)
    chunk_size: int = 128
    segments: int = 100_000  # chunk_offsets
    max_segment: int = 1_000  # chunk_offsets: segment lengths uniform in [0, max_segment]
    bandwidth_bytes: int = 1 << 30  # buffer of the read and copy bandwidth passes (>> L3)
    # Measurement: rounds alternate kernel and reference; each round times one block of
    # calls lasting about ``block_s``; a case stops after ``min_rounds`` rounds once each side
    # has run ``min_time_s`` in total; it stops early after ``max_rounds``, or once one side
    # has run ``max_time_s`` (the slow references) and 3 rounds are done.
    min_rounds: int = 5
    max_rounds: int = 40
    min_time_s: float = 1.0
    max_time_s: float = 20.0
    block_s: float = 0.05


FULL = Sizes()

QUICK = replace(
    FULL,
    n_large=1_000_000,  # 768 MB: beyond an L3 of a few hundred MB (300 MiB on the Intel VM)
    n_grad=8_192,
    tree_leaves=65_536,
    pool_rows=32_768,
    pool_rows_grad=8_192,
    segments=10_000,
    bandwidth_bytes=256 << 20,
    min_rounds=3,
    max_rounds=10,
    min_time_s=0.1,
    max_time_s=1.5,
    block_s=0.01,
)

SMOKE = Sizes(
    B=4,
    P=2,
    T=2,
    fanout=8,
    D=32,
    t=3,
    n_cached=256,
    n_large=1_000,
    n_grad=256,
    tree_leaves=1_000,
    pool_rows=1_000,
    pool_rows_grad=500,
    chunk_size=16,
    segments=100,
    max_segment=50,
    bandwidth_bytes=16 << 20,
    min_rounds=2,
    max_rounds=2,
    min_time_s=0.0,
    max_time_s=1.0,
    block_s=0.002,
)

PRESETS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
