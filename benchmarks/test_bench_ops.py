"""pytest-benchmark micro-benchmarks of every op, C++ kernel and reference, small and medium.

Run with ``python -m pytest benchmarks --benchmark-only`` (kernel and reference of a case share a
benchmark group, so the comparison table puts them side by side). The project's test run
(``testpaths = ["tests"]``) never collects this file; ``benchmarks/conftest.py`` skips it
without ``--benchmark-only``. These tests measure; they never assert a speed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("mllm_kernels", reason="mllm_kernels (and its compiled library) is not importable")

from . import cases
from .sizes import FULL

SMALL = replace(
    FULL,
    B=8,
    n_cached=2_048,
    n_large=16_384,
    n_grad=2_048,
    tree_leaves=16_384,
    pool_rows=8_192,
    pool_rows_grad=4_096,
    segments=1_000,
)
MEDIUM = replace(
    FULL,
    n_cached=8_192,
    n_large=262_144,
    n_grad=8_192,
    tree_leaves=262_144,
    pool_rows=131_072,
    pool_rows_grad=32_768,
    segments=20_000,
)
SIZES = {"small": SMALL, "medium": MEDIUM}
BACKENDS = ["cpu", "reference"]


def _builders(s):
    """Case name -> builder, for the cases of :func:`benchmarks.cases.all_cases`."""
    inp = cases.Inputs(seed=0)
    return {
        "descend-cached": lambda: cases.descend_case(s, s.n_cached, inp, "cached"),
        "descend-large": lambda: cases.descend_case(s, s.n_large, inp, "large"),
        "descend_int8-large": lambda: cases.descend_int8_case(s, s.n_large, inp, "large"),
        "descend_tree": lambda: cases.descend_tree_case(s, inp),
        "score_children": lambda: cases.score_children_case(s, s.n_large, inp, backward=False),
        "score_children-fwdbwd": lambda: cases.score_children_case(s, s.n_grad, inp, backward=True),
        "cls_pool-H1": lambda: cases.cls_pool_case(s, s.pool_rows, 1, inp, backward=False),
        "cls_pool-H4": lambda: cases.cls_pool_case(s, s.pool_rows, 4, inp, backward=False),
        "cls_pool-fwdbwd-H1": lambda: cases.cls_pool_case(s, s.pool_rows_grad, 1, inp, backward=True),
        "chunk_offsets": lambda: cases.chunk_offsets_case(s, inp),
    }


CASE_NAMES = list(_builders(SMALL))


@pytest.fixture(scope="module")
def built_cases():
    """Cases built once per (size, name) and reused by both backends."""
    cache = {}

    def get(size: str, name: str):
        if (size, name) not in cache:
            cache.clear()  # keep one case (its inputs) alive at a time
            cache[size, name] = _builders(SIZES[size])[name]()
        return cache[size, name]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("size", list(SIZES))
def test_op(benchmark, built_cases, size, name, backend):
    """One op, one size, one backend; grouped with the other backend of the same case."""
    case = built_cases(size, name)
    benchmark.group = f"{name} [{size}] {case.params}"
    benchmark.extra_info.update(op=case.op, params=case.params, bytes=case.bytes)
    fn = case.kernel if backend == "cpu" else case.reference
    benchmark(fn)
