"""Machine description, markdown tables, JSON and the optional speedup plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _caches() -> list[tuple[str, str, str]]:
    """``(level, type, size)`` of CPU 0's data and unified caches from sysfs, e.g. ``("3", "Unified", "32768K")``."""
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append((level, kind, size))
    return caches


def _cache_sizes() -> str:
    """Cache sizes of CPU 0 from sysfs, e.g. ``L1d 32K, L2 1024K, L3 32768K``."""
    parts = [f"L{level}{'d' if kind == 'Data' else ''} {size}" for level, kind, size in _caches()]
    return ", ".join(parts) or "unknown"


def largest_cache_bytes() -> int | None:
    """Size of CPU 0's largest data or unified cache (its L3 on most machines), or None."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for _, _, size in _caches():
        try:
            sizes.append(int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size))
        except ValueError:
            continue
    return max(sizes, default=None)


def _version(dist: str) -> str:
    """Installed version of ``dist``; for this project's own package, the in-tree version."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if dist == "mllm-kernels" and pyproject.exists():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if found:
            return f"{found.group(1)} (in-tree, not installed)"
    return "not installed"


def loadavg() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    """The machine and software the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "caches": _cache_sizes(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mllm_kernels": _version("mllm-kernels"),
        "loadavg_start": loadavg(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.1f} kB"


def header_markdown(results: dict) -> str:
    """The lines above the table: machine, versions, date, measured bandwidth."""
    m = results["machine"]
    bw, end = results["bandwidth"], results.get("bandwidth_end", results["bandwidth"])
    lines = [
        f"# mllm_kernels op benchmarks ({results['preset']})",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), caches {m['caches']}",
        f"- torch threads: {m['torch_threads']}; {m['platform']}, Python {m['python']}",
        f"- torch {m['torch']}, triton {m['triton']}, mllm_kernels {m['mllm_kernels']}",
        (
            f"- date: {m['date']}; load average (1 min) at start {m['loadavg_start']}, "
            f"at end {results.get('loadavg_end', '?')}"
        ),
        (
            f"- memory bandwidth over {bw['buffer_bytes'] / 2**20:,.0f} MiB buffers (same run): "
            f"read (sum) {bw['read_gbps']:.1f} GB/s before the cases, {end['read_gbps']:.1f} after; "
            f"copy (read+write) {bw['copy_gbps']:.1f} / {end['copy_gbps']:.1f} GB/s"
        ),
        (
            "- times: median per call in ms (IQR/median in brackets); kernel = `backend='cpu'` "
            "(C++), reference = `backend='reference'` (eager PyTorch), timed in alternating rounds; "
            "speedup = reference median / kernel median (min-max of the per-round ratios); "
            "GB/s = bytes the op must move / kernel median; read GB/s = a read pass (sum) over "
            f"a {bw['buffer_bytes'] / 2**20:,.0f} MiB buffer timed in the same rounds as the case; "
            "% read BW = kernel GB/s / that read GB/s; block read GB/s = the same bytes over the time "
            "of a read of the very blocks the kernel reads (same order, prefetch stream and threads, "
            "no scoring: `benchmarks/block_read.cpp`), timed in the same rounds: the bandwidth of the "
            "access pattern (random blocks of fanout rows); % block read = kernel GB/s / block read GB/s."
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def table_markdown(cases: list[dict]) -> str:
    """One row per case."""
    rows = [
        (
            "| op | case | kernel ms | reference ms | speedup (round min-max) | bytes | kernel GB/s | read GB/s "
            "| % read BW | block read GB/s | % block read |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        if "error" in c:
            rows.append(f"| {c['op']} | {c['params']} | error: {c['error']} | | | | | | | | |")
            continue
        k, r = c["kernel"], c["reference"]
        block = f"{c['block_read_gbps']:.1f} | {c['block_read_fraction']:.0%}" if "block_read_gbps" in c else "- | -"
        rows.append(
            f"| {c['op']} | {c['params']} "
            f"| {_ms(k['median'])} ({k['spread']:.0%}) | {_ms(r['median'])} ({r['spread']:.0%}) "
            f"| {c['speedup']:.1f}x ({c['speedup_min']:.1f}-{c['speedup_max']:.1f}) "
            f"| {_size(c['bytes'])} | {c['kernel_gbps']:.1f} | {c['read_gbps']:.1f} | {c['read_bw_fraction']:.0%} "
            f"| {block} |"
        )
    return "\n".join(rows) + "\n"


def markdown(results: dict) -> str:
    """The whole report: header, table and notes."""
    notes = results.get("notes", [])
    tail = "\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""
    return header_markdown(results) + table_markdown(results["cases"]) + tail


def plot_speedups(results: dict, path: Path) -> Path | None:
    """Bar chart of the speedup of every case (log scale), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [c for c in results["cases"] if "error" not in c]
    if not cases:
        return None
    labels = [f"{c['op']}  {c['params'].split(' (N below')[0][:60]}" for c in cases][::-1]
    speed = [c["speedup"] for c in cases][::-1]
    low = [max(0.0, s - c["speedup_min"]) for s, c in zip(speed, cases[::-1])]
    high = [max(0.0, c["speedup_max"] - s) for s, c in zip(speed, cases[::-1])]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(cases)))
    rows = range(len(cases))
    ax.barh(rows, speed, xerr=[low, high], capsize=3, color="tab:blue")
    for row, value, up in zip(rows, speed, high):
        ax.text(value + up, row, f"  {value:.1f}x", va="center", ha="left", fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.set_xlabel("speedup over the eager reference (median ratio; bars: min-max per round)")
    ax.set_yticks(list(rows), labels, fontsize=8)
    m = results["machine"]
    ax.set_title(f"mllm_kernels C++ kernels vs reference - {m['cpu']}, {m['torch_threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_safe(value):
    """NaN and infinities become None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write(results: dict, out_dir: str | Path, stem: str = "ops") -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>_speedup.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    png = plot_speedups(results, out / f"{stem}_speedup.png")
    if png is not None:
        paths["png"] = png
    return {k: str(v) for k, v in paths.items()}
