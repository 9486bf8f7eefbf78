"""The op cases on a GPU (SPEC 7): ``python -m benchmarks gpu [--quick] [--out DIR]``.

The cases are those of ``python -m benchmarks ops`` (:mod:`benchmarks.cases`), made on CUDA
tensors: the kernel side is ``backend="auto"``, which dispatches CUDA tensors to the CUDA C++
kernels when built and else to the Triton kernels; the reference side is the eager PyTorch
reference on the same tensors (for ``descend int8``: the same kernels on the float16 keys).

Each side is timed twice:

* cold L2: :func:`triton.testing.do_bench`, which clears the L2 before every call (by writing a
  buffer larger than it) and times each call between CUDA events;
* warm L2: back-to-back calls between two CUDA events, so the data the last call read may still
  be in the L2; for short kernels this includes the host's launch time.

The effective bandwidth of a case is the bytes it must move (:mod:`benchmarks.cases`) over its
cold median, against the device's copy bandwidth measured in the same run (a device-to-device
copy of ``bandwidth_bytes``, counting the bytes read and written).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from . import report
from .sizes import PRESETS, Sizes

#: Calls per warm timing block and the blocks of a warm timing.
WARM_CALLS, WARM_BLOCKS = 20, 5


def _cold_ms(fn) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms per call with the L2 cleared before each call."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))


def _warm_ms(fn) -> float:
    """Median over blocks of the ms per call of back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    blocks = []
    for _ in range(WARM_BLOCKS):
        start.record()
        for _ in range(WARM_CALLS):
            fn()
        end.record()
        end.synchronize()
        blocks.append(start.elapsed_time(end) / WARM_CALLS)
    return statistics.median(blocks)


def copy_bandwidth(n_bytes: int) -> float:
    """GB/s of a device-to-device copy (bytes read plus bytes written), cold L2."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    median_ms = _cold_ms(lambda: dst.copy_(src))[0]
    return 2 * n_bytes / (median_ms * 1e-3) / 1e9


def device_info() -> dict:
    """The GPU and software the numbers were measured on."""
    props = torch.cuda.get_device_properties(0)
    info = report.machine_info(torch.get_num_threads())
    info.update(
        gpu=props.name,
        multiprocessors=props.multi_processor_count,
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        cuda=torch.version.cuda,
    )
    return info


def run_gpu(
    sizes: Sizes | str = "full",
    *,
    out_dir: str | Path | None = "bench_results",
    only: list[str] | None = None,
    verbose: bool = True,
) -> dict:
    """Run the op cases on the GPU and return the results (also written to ``out_dir``).

    Returns:
        ``{"preset", "machine", "copy_gbps", "cases", "files"}``; each case has ``op``,
        ``params``, ``bytes``, ``kernel`` and ``reference`` timings (``cold_ms`` with its 20th
        and 80th percentiles, ``warm_ms``), ``speedup`` (cold medians), ``kernel_gbps`` and
        ``copy_bw_fraction``, or ``error`` when the case failed.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("python -m benchmarks gpu needs a GPU that torch can see")
    from .cases import all_cases  # imports mllm_kernels, which needs the compiled library

    preset = sizes if isinstance(sizes, str) else "custom"
    s = PRESETS[sizes] if isinstance(sizes, str) else sizes
    start = time.perf_counter()
    copy_gbps = copy_bandwidth(s.bandwidth_bytes)
    if verbose:
        print(f"copy bandwidth {copy_gbps:,.0f} GB/s", file=sys.stderr, flush=True)
    cases = []
    for op, build in all_cases(s, device="cuda"):
        if only and not any(op.startswith(o) for o in only):
            continue
        entry = {"op": op, "params": "", "bytes": 0}
        try:
            case = build()
            entry.update(op=case.op, params=case.params, bytes=case.bytes)
            for side, fn in (("kernel", case.kernel), ("reference", case.reference)):
                cold = _cold_ms(fn)
                entry[side] = {
                    "cold_ms": cold[0],
                    "cold_p20_ms": cold[1],
                    "cold_p80_ms": cold[2],
                    "warm_ms": _warm_ms(fn),
                }
            entry["speedup"] = entry["reference"]["cold_ms"] / entry["kernel"]["cold_ms"]
            entry["kernel_gbps"] = case.bytes / (entry["kernel"]["cold_ms"] * 1e-3) / 1e9
            entry["copy_bw_fraction"] = entry["kernel_gbps"] / copy_gbps
            if verbose:
                print(
                    f"{case.op} {case.params}: kernel {entry['kernel']['cold_ms']:.4f} ms cold, "
                    f"{entry['kernel']['warm_ms']:.4f} warm; x{entry['speedup']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception as error:  # noqa: BLE001  (a failing case must not hide the others)
            entry["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            if verbose:
                print(traceback.format_exc(), file=sys.stderr, flush=True)
        cases.append(entry)
        case = None
        gc.collect()
        torch.cuda.empty_cache()
    results = {
        "preset": preset,
        "sizes": s.__dict__,
        "machine": device_info(),
        "copy_gbps": copy_gbps,
        "cases": cases,
        "wall_s": time.perf_counter() - start,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "gpu.json", "markdown": out / "gpu.md"}
        paths["json"].write_text(json.dumps(report._json_safe(results), indent=2, allow_nan=False) + "\n")
        paths["markdown"].write_text(markdown(results))
        results["files"] = {k: str(v) for k, v in paths.items()}
    return results


def markdown(results: dict) -> str:
    """Header (GPU, versions, copy bandwidth) and one row per case."""
    m = results["machine"]
    lines = [
        f"# mllm_kernels on a GPU ({results['preset']})",
        "",
        (
            f"- GPU: {m['gpu']}, {m['multiprocessors']} SMs, {m['gpu_memory_gib']} GiB, L2 {m['l2_mib']} MiB; "
            f"CUDA {m['cuda']}"
        ),
        (
            f"- host: {m['cpu']} ({m['cores']} cores); torch {m['torch']}, triton {m['triton']}, "
            f"python {m['python']}; {m['date']}"
        ),
        f"- device copy bandwidth (read + write): {results['copy_gbps']:,.0f} GB/s",
        (
            "- cold: L2 cleared before each call (`triton.testing.do_bench`, median [p20, p80]); warm: "
            "back-to-back calls. Speed-up and GB/s from the cold medians. Kernel: `backend='auto'` (the Triton "
            "kernels in a build without CUDA C++); reference: eager PyTorch (descend int8: the same kernels on "
            "float16 keys)."
        ),
        "",
        (
            "| op | params | kernel cold ms | kernel warm ms | reference cold ms | reference warm ms | speed-up | "
            "kernel GB/s | % copy BW |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        if "error" in c:
            lines.append(f"| {c['op']} | {c['params']} | error: {c['error']} | | | | | | |")
            continue
        k, r = c["kernel"], c["reference"]
        lines.append(
            f"| {c['op']} | {c['params']} | {k['cold_ms']:.4f} [{k['cold_p20_ms']:.4f}, {k['cold_p80_ms']:.4f}] | "
            f"{k['warm_ms']:.4f} | {r['cold_ms']:.4f} | {r['warm_ms']:.4f} | {c['speedup']:.2f}x | "
            f"{c['kernel_gbps']:,.0f} | {c['copy_bw_fraction']:.0%} |"
        )
    return "\n".join(lines) + "\n"
