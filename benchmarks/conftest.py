"""Keep the micro-benchmarks out of ordinary test runs.

They run with ``python -m pytest benchmarks --benchmark-only`` (or ``--benchmark-enable``);
collected any other way (say ``pytest benchmarks``), they are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Skip the benchmarks of this folder unless benchmarking was asked for."""
    asked = config.getoption("benchmark_only", default=False) or config.getoption("benchmark_enable", default=False)
    if asked:
        return
    skip = pytest.mark.skip(reason="benchmarks: run with python -m pytest benchmarks --benchmark-only")
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)
