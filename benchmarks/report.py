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


def _cache_sizes() -> str:
    """Cache sizes of CPU 0 from sysfs, e.g. ``L1d 32K, L2 1024K, L3 32768K``."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    parts = []
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            parts.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return ", ".join(parts) or "unknown"


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
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


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
        f"- date: {m['date']}",
        f"- memory bandwidth over {bw['buffer_bytes'] / 2**20:,.0f} MiB buffers (same run): "
        f"read (sum) {bw['read_gbps']:.1f} GB/s before the cases, {end['read_gbps']:.1f} after; "
        f"copy (read+write) {bw['copy_gbps']:.1f} / {end['copy_gbps']:.1f} GB/s",
        "- times: median per call in ms (IQR/median in brackets), kernel = `backend=\"cpu\"` "
        "(C++), reference = `backend=\"reference\"` (eager PyTorch), timed in alternating rounds; "
        "speedup = reference median / kernel median (min-max of the per-round ratios); "
        "GB/s = bytes the op must move / kernel median; % read BW = against the larger read "
        "bandwidth.",
        "",
    ]
    return "\n".join(lines)


def table_markdown(cases: list[dict]) -> str:
    """One row per case."""
    rows = [
        "| op | case | kernel ms | reference ms | speedup (round min-max) | bytes | kernel GB/s | % read BW |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        if "error" in c:
            rows.append(f"| {c['op']} | {c['params']} | error: {c['error']} | | | | | |")
            continue
        k, r = c["kernel"], c["reference"]
        rows.append(
            f"| {c['op']} | {c['params']} "
            f"| {_ms(k['median'])} ({k['spread']:.0%}) | {_ms(r['median'])} ({r['spread']:.0%}) "
            f"| {c['speedup']:.1f}x ({c['speedup_min']:.1f}-{c['speedup_max']:.1f}) "
            f"| {c['bytes'] / 1e6:,.1f} MB | {c['kernel_gbps']:.1f} | {c['read_bw_fraction']:.0%} |"
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
    labels = [f"{c['op']}\n{c['params'][:38]}" for c in cases]
    speed = [c["speedup"] for c in cases]
    low = [max(0.0, s - c["speedup_min"]) for s, c in zip(speed, cases)]
    high = [max(0.0, c["speedup_max"] - s) for s, c in zip(speed, cases)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases)), 5.5))
    ax.bar(range(len(cases)), speed, yerr=[low, high], capsize=3, color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over eager reference (x)")
    ax.set_xticks(range(len(cases)), labels, rotation=60, ha="right", fontsize=7)
    m = results["machine"]
    ax.set_title(f"mllm_kernels CPU kernels vs reference - {m['cpu']}, {m['torch_threads']} threads")
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
