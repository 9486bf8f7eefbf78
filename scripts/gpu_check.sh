#!/usr/bin/env bash
# The checks that need a GPU, for a machine with one and with a CUDA build of PyTorch, Triton,
# pytest and hypothesis already installed (scripts/setup.sh installs the CPU build):
#   1. build mllm_kernels._C in place against that PyTorch (-march=native: the host's own ISA);
#   2. the kernel tests, with every Triton case run on the GPU (MLLM_TEST_TRITON_DEVICE=cuda)
#      and the C++ cases on this host's CPU;
#   3. the GPU benchmark, `python -m benchmarks gpu` (pass --quick as the second argument for
#      the small sizes).
# Usage: bash scripts/gpu_check.sh OUT_DIR [--quick]. Logs and results go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--quick]}
BENCH_ARGS=${2:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

{ nvidia-smi -L; grep -m1 "model name" /proc/cpuinfo; grep -o -w -m1 "avx512_vnni\|avx_vnni" /proc/cpuinfo | sort -u
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/machine.txt"

echo "== build"
# The compiler on PATH, not the one Python was built with (sysconfig's): on the GPU image that one
# is /opt/gcc's g++, which links libstdc++ statically, and a second libstdc++ in _C crashes the
# first TORCH_CHECK message it formats (SIGSEGV in std::ostream, under the dynamic one's locale).
export CC=${CC:-gcc} CXX=${CXX:-g++}
export LDSHARED=${LDSHARED:-"$CXX -shared"} LDCXXSHARED=${LDCXXSHARED:-"$CXX -shared"}
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi

echo "== tests (Triton on the GPU, C++ on the host CPU)"
workers=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
# -v: each result is logged as it comes, so a run cut off by the timeout still names its failures.
MLLM_TEST_TRITON_DEVICE=cuda timeout "${TEST_TIMEOUT_S:-600}" "$PYTHON" -m pytest -v --tb=short -rfE "${workers[@]}" \
  tests/test_triton_gpu.py tests/test_descend.py tests/test_descend_tree.py tests/test_score_children.py \
  tests/test_int8_keys.py tests/test_cls_pool.py tests/test_chunk_offsets.py tests/test_registration.py \
  tests/test_errors.py tests/test_fuzz.py >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "FAILED|ERROR|node down|passed|failed" "$OUT/tests.log" | grep -v PytestBenchmarkWarning | tail -80

echo "== GPU benchmark"
timeout "${BENCH_TIMEOUT_S:-600}" "$PYTHON" -m benchmarks gpu --out "$OUT" $BENCH_ARGS 2>"$OUT/bench_gpu.log" | tail -30
bench_rc=${PIPESTATUS[0]}
tail -5 "$OUT/bench_gpu.log"
echo "tests rc $tests_rc, benchmark rc $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
