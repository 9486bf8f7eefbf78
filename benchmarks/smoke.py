"""A tiny run of the op benchmarks, for the test suite (checks the harness, never the speed)."""

from __future__ import annotations

from pathlib import Path

from .bench_ops import run_ops


def run_quick(out_dir: str | Path) -> dict:
    """Run every op case at tiny sizes (a few seconds) and write JSON + markdown to ``out_dir``.

    Runs on one thread (the torch thread count is restored), which keeps it quick on a loaded
    machine. Returns the results dict of :func:`benchmarks.bench_ops.run_ops`; ``results["files"]``
    holds the paths written (``json``, ``markdown`` and, with matplotlib, ``png``).
    """
    return run_ops("smoke", threads=1, out_dir=out_dir, verbose=False)
