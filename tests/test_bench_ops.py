"""The op benchmark (``python -m benchmarks ops``): its smoke run, and the block read it times beside
the kernels that read children blocks (it must read exactly the blocks descend reads)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("benchmarks") is None:  # the harness is not installed, only checked out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testing_utils import torch_threads

from benchmarks.bench_ops import run_ops
from benchmarks.block_read import read_blocks


def _xor_of_blocks(keys: torch.Tensor, parents: torch.Tensor, fanout: int) -> list[int]:
    """Per row, the XOR of every 8-byte word of its parents' blocks (numpy)."""
    n = keys.shape[0]
    words = keys.contiguous().view(torch.uint8).numpy().view(np.uint64).reshape(n, -1)
    sums = []
    for row in parents.tolist():
        acc = np.uint64(0)
        for p in row:
            if p >= 0:
                acc ^= np.bitwise_xor.reduce(words[p * fanout : min(p * fanout + fanout, n)].reshape(-1))
        sums.append(int(acc.view(np.int64)))
    return sums


@pytest.mark.parametrize(
    ("dtype", "n", "dim", "fanout"),
    [(torch.float16, 1_000, 384, 64), (torch.int8, 999, 384, 64), (torch.float32, 130, 8, 7), (torch.int8, 5, 32, 1)],
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_parents", [3, 11])  # 11: groups of 4, 4 and 3 blocks read in turn
def test_block_read_reads_the_blocks_of_every_parent(dtype, n, dim, fanout, threads, num_parents):
    gen = torch.Generator().manual_seed(n)
    keys = torch.randint(-100, 100, (n, dim), generator=gen).to(dtype)
    blocks = -(-n // fanout)
    parents = torch.randint(0, blocks, (7, num_parents), generator=gen)
    parents[1, 2] = -1  # an empty slot
    parents[2] = -1  # a row with no parent
    parents[3, 0] = blocks - 1  # the last block, short when fanout does not divide n
    with torch_threads(threads):
        got = read_blocks(keys, parents, fanout)
    assert got.tolist() == _xor_of_blocks(keys, parents, fanout)
    assert got[2] == 0


def test_block_read_rejects_bad_input():
    keys = torch.zeros(128, 16, dtype=torch.float16)
    parents = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="keys"):
        read_blocks(torch.zeros(128, 15, dtype=torch.float16), parents, 8)
    with pytest.raises(ValueError, match="keys"):
        read_blocks(keys.t(), parents, 8)
    with pytest.raises(ValueError, match="parents"):
        read_blocks(keys, parents.int(), 8)
    with pytest.raises(ValueError, match="parents"):
        read_blocks(keys, torch.full((2, 2), 16), 8)  # block 16 starts at row 128: past the keys
    with pytest.raises(ValueError, match="fanout"):
        read_blocks(keys, parents, 0)


def test_smoke_run_times_the_block_read_beside_the_block_readers(tmp_path):
    results = run_ops("smoke", threads=1, out_dir=tmp_path, verbose=False, only=["descend", "score_children"])
    data = json.loads(Path(results["files"]["json"]).read_text())
    by_op = {}
    for case in data["cases"]:
        assert "error" not in case, case
        by_op.setdefault(case["op"], []).append(case)
    for op in ["descend", "descend int8", "score_children"]:
        for case in by_op[op]:
            assert case["block_read"]["median"] > 0 and case["block_read_gbps"] > 0
            assert case["block_read_fraction"] == pytest.approx(case["kernel_gbps"] / case["block_read_gbps"])
    for case in by_op["descend_tree"] + by_op["score_children fwd+bwd"]:
        assert "block_read" not in case
    table = Path(results["files"]["markdown"]).read_text()
    assert "% block read" in table


def test_parent_sets_touch_four_times_the_largest_cache():
    from benchmarks.cases import MAX_PARENT_SETS, PARENT_SETS, parent_set_count

    set_bytes = 64 * 8 * 64 * 384 * 2  # the full preset's float16 blocks of one call: 25.2 MB
    assert parent_set_count(set_bytes, 32 << 20) == PARENT_SETS  # a 32 MiB L3: the minimum covers it
    assert parent_set_count(set_bytes, 300 << 20) == 50  # a 300 MiB L3: 50 sets, 1.26 GB
    assert parent_set_count(set_bytes, 300 << 20) * set_bytes >= 4 * (300 << 20)
    assert parent_set_count(set_bytes, None) == PARENT_SETS  # no cache sizes in sysfs
    assert parent_set_count(1_000, 300 << 20) == MAX_PARENT_SETS  # a smoke preset's tiny sets
