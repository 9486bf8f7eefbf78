"""Interleaved timing with ``torch.utils.benchmark`` and the memory bandwidth of this machine.

The machines are shared and noisy, so callables that are compared are timed in alternating
rounds (A B, B A, A B, ...): a burst of noise hits both sides, and the ratio of their medians is
far steadier than two measurements taken one after the other.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils.benchmark import Measurement, Timer


@dataclass
class Stats:
    """Per-call seconds of one callable: median, inter-quartile range, min and max over blocks."""

    median: float
    iqr: float
    min: float
    max: float
    blocks: int
    calls_per_block: int

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        """JSON-ready fields, plus the relative spread."""
        return {**asdict(self), "spread": self.spread}


def _calls_per_block(timer: Timer, block_s: float) -> int:
    """Warm up, then pick how many calls make a block of about ``block_s`` seconds."""
    per_call = timer.timeit(1).times[0]  # warm-up: first-call allocations, lazy initialisation
    if per_call < block_s:  # a slow callable is not called again just to calibrate
        per_call = min(per_call, timer.timeit(1).times[0])
    return max(1, min(100_000, int(block_s / max(per_call, 1e-9))))


def round_settings(sizes, threads: int, rounds: int | None = None) -> dict:
    """measure_interleaved's keyword arguments from a preset (``min_rounds``, ``max_rounds``,
    ``min_time_s``, ``max_time_s``, ``block_s``) and a thread count; ``rounds``: exactly that many."""
    return {
        "threads": threads,
        "min_rounds": sizes.min_rounds if rounds is None else rounds,
        "max_rounds": sizes.max_rounds if rounds is None else rounds,
        "min_time_s": sizes.min_time_s,
        "max_time_s": sizes.max_time_s,
        "block_s": sizes.block_s,
    }


def measure_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    threads: int,
    min_rounds: int,
    max_rounds: int,
    min_time_s: float,
    max_time_s: float,
    block_s: float,
    names: Sequence[str] | None = None,
) -> tuple[list[Stats], list[list[float]]]:
    """Time ``fns`` in interleaved rounds, one block of calls of each per round.

    The order alternates every round. Rounds go on until every callable has run ``min_time_s``
    seconds in total and ``min_rounds`` rounds are done; they stop early after ``max_rounds``
    rounds, or once one callable has run ``max_time_s`` seconds and at least 3 rounds are done
    (so a slow reference does not take minutes).

    Returns:
        ``(stats, rounds)``: the :class:`Stats` of each callable (over all its blocks), and for
        each callable the per-call time of every round, so that per-round ratios can be taken.
    """
    names = list(names) if names is not None else [f"fn{i}" for i in range(len(fns))]
    timers = [
        Timer("fn()", globals={"fn": fn}, num_threads=threads, label="mllm_kernels", description=name)
        for fn, name in zip(fns, names)
    ]
    numbers = [_calls_per_block(timer, block_s) for timer in timers]
    blocks: list[list[Measurement]] = [[] for _ in fns]
    spent = [0.0] * len(fns)
    rounds = 0

    def done() -> bool:
        if rounds >= max_rounds:
            return True
        if rounds < min(3, min_rounds):
            return False
        if max(spent) >= max_time_s:
            return True
        return rounds >= min_rounds and min(spent) >= min_time_s

    while not done():
        order = range(len(fns)) if rounds % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            measurement = timers[i].timeit(numbers[i])
            blocks[i].append(measurement)
            spent[i] += measurement.times[0] * numbers[i]
        rounds += 1
    stats = []
    for number, measured in zip(numbers, blocks):
        merged = Measurement.merge(measured)[0]
        stats.append(Stats(merged.median, merged.iqr, min(merged.times), max(merged.times), len(measured), number))
    per_round = [[m.times[0] for m in measured] for measured in blocks]
    return stats, per_round


def compare(
    kernel: Callable,
    reference: Callable,
    *,
    read_probe: ReadProbe | None = None,
    block_read: Callable | None = None,
    **kwargs,
) -> dict:
    """Kernel vs reference, interleaved: both stats, the speedup and its per-round range.

    ``speedup = median_reference / median_kernel``; ``speedup_min``/``speedup_max`` are the
    smallest and largest ratio of the two blocks timed in the same round. With ``read_probe``,
    its read pass is timed in the same rounds too, and ``read_gbps`` is the read bandwidth
    measured alongside the kernel (the machine's bandwidth drifts between cases). With
    ``block_read`` (a read of the blocks the kernel reads, see ``block_read.py``), its stats
    are ``block_read`` in the result, timed in the same rounds.
    """
    fns, names = [kernel, reference], ["kernel", "reference"]
    if read_probe is not None:
        fns.append(read_probe)
        names.append("read")
    if block_read is not None:
        fns.append(block_read)
        names.append("block_read")
    stats, rounds = measure_interleaved(fns, names=names, **kwargs)
    (k, r), (k_rounds, r_rounds) = stats[:2], rounds[:2]
    ratios = [rt / kt for kt, rt in zip(k_rounds, r_rounds) if kt > 0]
    result = {
        "kernel": k.as_dict(),
        "reference": r.as_dict(),
        "speedup": r.median / k.median if k.median > 0 else float("nan"),
        "speedup_min": min(ratios) if ratios else float("nan"),
        "speedup_max": max(ratios) if ratios else float("nan"),
        "speedup_round_median": statistics.median(ratios) if ratios else float("nan"),
    }
    extra = dict(zip(names[2:], stats[2:]))
    if read_probe is not None:
        result["read"] = extra["read"].as_dict()
        result["read_gbps"] = read_probe.nbytes / extra["read"].median / 1e9
    if block_read is not None:
        result["block_read"] = extra["block_read"].as_dict()
    return result


class ReadProbe:
    """One read pass (``sum``) over a float32 buffer of about ``n_bytes``: call it to time it."""

    def __init__(self, n_bytes: int):
        self.buffer = torch.rand(max(1, n_bytes // 4))
        self.nbytes = self.buffer.nbytes

    def __call__(self) -> torch.Tensor:
        return self.buffer.sum()


def measure_bandwidth(n_bytes: int, **kwargs) -> dict:
    """Read and copy bandwidth (GB/s, 1e9 bytes) over float32 buffers of ``n_bytes``.

    Read: ``buf.sum()`` (one pass, full bandwidth on 2 threads here). Copy: ``dst.copy_(src)``
    counted as read + write bytes. The buffers should be far larger than the last-level cache.
    """
    read_probe = ReadProbe(n_bytes)
    src = read_probe.buffer
    dst = torch.empty_like(src)
    read_bytes = read_probe.nbytes
    (read, copy), _ = measure_interleaved([read_probe, lambda: dst.copy_(src)], names=["read", "copy"], **kwargs)
    return {
        "buffer_bytes": read_bytes,
        "read_gbps": read_bytes / read.median / 1e9,
        "copy_gbps": 2 * read_bytes / copy.median / 1e9,
        "read": read.as_dict(),
        "copy": copy.as_dict(),
    }
