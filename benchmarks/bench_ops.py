"""``python -m benchmarks ops``: every op's C++ kernel against the eager reference, side by side."""

from __future__ import annotations

import gc
import sys
import time
import traceback
from pathlib import Path

import torch

from . import report
from .sizes import PRESETS, Sizes
from .timing import ReadProbe, compare, measure_bandwidth, round_settings

NOTES = [
    "descend 'cached': the keys fit in the L3, so GB/s above the DRAM read bandwidth is expected.",
    (
        "descend / score_children read B*T*fanout*D*2 bytes of float16 keys per call (parents "
        "drawn at random per query); descend_tree reads the whole top level and t*fanout children "
        "per query at each lower level."
    ),
    (
        "descend int8: int8 keys with a float32 scale per row (quantize_keys of the float16 keys); "
        "its reference column is the same C++ kernel on the float16 keys, so its speedup is int8 "
        "over float16 at the same shapes, measured side by side."
    ),
    (
        "score_children fwd+bwd computes gradients for probes and keys (a dense [N, D] key "
        "gradient); cls_pool fwd+bwd for x and q. Kernel and reference always run the same N."
    ),
]


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def run_ops(
    sizes: Sizes | str = "full",
    *,
    threads: int | None = None,
    out_dir: str | Path | None = "bench_results",
    only: list[str] | None = None,
    verbose: bool = True,
) -> dict:
    """Run the op benchmarks and return the results dict (also written to ``out_dir``).

    The torch thread count is restored afterwards.

    Args:
        sizes: a :class:`Sizes` or a preset name (``"full"``, ``"quick"``, ``"smoke"``).
        threads: torch intra-op threads (default: torch's current setting).
        out_dir: where ``ops.json``, ``ops.md`` and ``ops_speedup.png`` go; None writes nothing.
        only: run only the cases whose op name starts with one of these strings.
        verbose: progress on stderr.

    Returns:
        ``{"preset", "machine", "bandwidth", "bandwidth_end", "cases", "notes", "files"}``; each
        case has ``op``, ``params``, ``bytes``, ``kernel`` and ``reference`` stats (seconds),
        ``speedup`` (+ ``speedup_min``/``speedup_max`` per round), ``kernel_gbps``, ``read_gbps``
        (a read pass over a ``bandwidth_bytes`` buffer timed in the case's rounds) and
        ``read_bw_fraction`` (kernel over that read bandwidth), or ``error`` when the case failed.
        Cases that read children blocks (descend, score_children forward) on the CPU also have
        ``block_read`` stats (the same blocks read with no scoring, in the same rounds),
        ``block_read_gbps`` (the case's bytes over its median) and ``block_read_fraction``.
    """
    preset = sizes if isinstance(sizes, str) else "custom"
    s = PRESETS[sizes] if isinstance(sizes, str) else sizes
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(s, preset, torch.get_num_threads(), out_dir, only, verbose)
    finally:
        torch.set_num_threads(previous_threads)


def _run(s: Sizes, preset: str, threads: int, out_dir, only, verbose: bool) -> dict:
    from .cases import all_cases  # imports mllm_kernels, which needs the compiled library

    kw = round_settings(s, threads)
    start = time.perf_counter()
    machine = report.machine_info(threads)

    _log(verbose, f"bandwidth: {s.bandwidth_bytes / 2**20:.0f} MiB buffers ...")
    bandwidth = measure_bandwidth(s.bandwidth_bytes, **kw)
    _log(verbose, f"  read {bandwidth['read_gbps']:.1f} GB/s, copy {bandwidth['copy_gbps']:.1f} GB/s")

    # Timed in every case's rounds: the % of read bandwidth compares the kernel with the
    # bandwidth of the same minutes, not of the start or the end of the run.
    read_probe = ReadProbe(s.bandwidth_bytes)
    cases = []
    for op, build in all_cases(s):
        if only and not any(op.startswith(o) for o in only):
            continue
        entry = {"op": op, "params": "", "bytes": 0}
        case_start = time.perf_counter()
        try:
            case = build()
            entry.update(op=case.op, params=case.params, bytes=case.bytes)
            _log(verbose, f"{case.op}: {case.params} ...")
            entry.update(compare(case.kernel, case.reference, read_probe=read_probe, block_read=case.block_read, **kw))
            entry["kernel_gbps"] = case.bytes / entry["kernel"]["median"] / 1e9
            entry["read_bw_fraction"] = entry["kernel_gbps"] / entry["read_gbps"]
            if "block_read" in entry:
                entry["block_read_gbps"] = case.bytes / entry["block_read"]["median"] / 1e9
                entry["block_read_fraction"] = entry["kernel_gbps"] / entry["block_read_gbps"]
            entry["reference_gbps"] = case.bytes / entry["reference"]["median"] / 1e9
            _log(
                verbose,
                f"  kernel {entry['kernel']['median'] * 1e3:.3f} ms, reference "
                f"{entry['reference']['median'] * 1e3:.3f} ms, speedup {entry['speedup']:.1f}x",
            )
        except Exception as error:  # noqa: BLE001  (a failing kernel must not hide the other results)
            entry["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            _log(verbose, traceback.format_exc())
        entry["loadavg"] = report.loadavg()
        entry["wall_s"] = time.perf_counter() - case_start
        cases.append(entry)
        case = None
        gc.collect()

    read_probe = None  # frees its buffer before the end pass allocates two
    bandwidth_end = measure_bandwidth(s.bandwidth_bytes, **kw)
    results = {
        "preset": preset,
        "sizes": s.__dict__,
        "machine": machine,
        "bandwidth": bandwidth,
        "bandwidth_end": bandwidth_end,
        "cases": cases,
        "notes": NOTES,
        "loadavg_end": report.loadavg(),
        "wall_s": time.perf_counter() - start,
    }
    if out_dir is not None:
        results["files"] = report.write(results, out_dir)
    return results
