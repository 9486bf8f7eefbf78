"""Benchmark harness of mllm_kernels.

* ``python -m benchmarks ops [--quick] [--out DIR] [--threads N]``: every op's C++ kernel
  against the eager reference, timed side by side in one run, with the machine's measured
  memory bandwidth; prints a markdown table and writes JSON, markdown and a PNG (with
  matplotlib) into ``DIR``.
* ``python -m benchmarks e2e [--quick|--smoke] [--sizes N ...] [--no-faiss]``: ``descend_tree``
  against flat exact search and FAISS (Flat, HNSW) on 1e4..1e7 clustered synthetic leaves, with
  recall@10, matched-recall comparison, per-call overhead and the issue's targets
  (:mod:`benchmarks.e2e`, data and layout in :mod:`benchmarks.synthetic`).
* ``python -m pytest benchmarks --benchmark-only``: pytest-benchmark micro-benchmarks.
* :func:`benchmarks.smoke.run_quick`: a tiny run for the test suite.
"""
