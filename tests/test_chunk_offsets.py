"""chunk_offsets (SPEC 4.1): every backend vs a plain-Python oracle and the reference."""

import itertools

import pytest
import torch
from testing_utils import ALL_BACKENDS, BACKENDS, make_offsets, strided

import mllm_kernels as mk

INT64_MAX = 2**63 - 1


def oracle(seg_offsets, chunk_size):
    """Python integers: no overflow, obviously correct."""
    s = [int(v) for v in seg_offsets]
    offsets, segments = [s[0]], []
    for seg, (start, end) in enumerate(itertools.pairwise(s)):
        while start < end:
            start = end if end - start <= chunk_size else start + chunk_size
            offsets.append(start)
            segments.append(seg)
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(segments, dtype=torch.int64)


CASES = [
    ("docstring", [0, 5, 5, 7], 2),
    ("no_segments", [0], 3),
    ("no_segments_nonzero_start", [9], 3),
    ("one_empty_segment", [4, 4], 1),
    ("all_empty", [3, 3, 3, 3], 2),
    ("exact_multiple", [0, 6, 12], 3),
    ("chunk_size_1", [0, 3, 3, 5], 1),
    ("chunk_larger_than_segments", [0, 2, 9, 10], 100),
    ("nonzero_start", [10, 13, 20, 20, 21], 4),
    ("leading_empty", [0, 0, 0, 7], 3),
    ("huge_chunk_size", [0, 5, 8], INT64_MAX),
    ("large_offsets", [2**40, 2**40 + 7, 2**40 + 7, 2**41], 2**38),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("seg, chunk_size", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cases(backend, seg, chunk_size):
    seg_offsets = torch.tensor(seg, dtype=torch.int64)
    offsets, segments = mk.chunk_offsets(seg_offsets, chunk_size, backend=backend)
    expected_offsets, expected_segments = oracle(seg, chunk_size)
    assert offsets.dtype == torch.int64 and segments.dtype == torch.int64
    assert torch.equal(offsets, expected_offsets), (offsets, expected_offsets)
    assert torch.equal(segments, expected_segments), (segments, expected_segments)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64])
def test_random_ragged(backend, chunk_size, gen):
    S = 40 if backend == "cpu" else 9
    lengths = torch.randint(0, 3 * chunk_size + 2, (S,), generator=gen)
    lengths[torch.rand(S, generator=gen) < 0.3] = 0
    seg_offsets = make_offsets(lengths.tolist(), start=int(torch.randint(0, 50, (1,), generator=gen)))
    offsets, segments = mk.chunk_offsets(seg_offsets, chunk_size, backend=backend)
    ref_offsets, ref_segments = mk.reference.chunk_offsets(seg_offsets, chunk_size)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(segments, ref_segments)
    # Structural properties, independent of any oracle.
    assert offsets[0] == seg_offsets[0] and offsets[-1] == seg_offsets[-1]
    sizes = offsets[1:] - offsets[:-1]
    assert bool(((sizes >= 1) & (sizes <= chunk_size)).all())
    assert bool((seg_offsets[segments] <= offsets[:-1]).all())
    assert bool((offsets[1:] <= seg_offsets[segments + 1]).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous(backend):
    seg = [0, 5, 5, 7, 20]
    seg_offsets = strided(torch.tensor(seg, dtype=torch.int64))
    offsets, segments = mk.chunk_offsets(seg_offsets, 3, backend=backend)
    expected_offsets, expected_segments = oracle(seg, 3)
    assert torch.equal(offsets, expected_offsets)
    assert torch.equal(segments, expected_segments)


def test_many_segments_cpu(gen):
    """Enough segments to exercise the parallel prefix sum of the C++ kernel."""
    lengths = torch.randint(0, 20, (100_000,), generator=gen)
    seg_offsets = make_offsets(lengths.tolist())
    offsets, segments = mk.chunk_offsets(seg_offsets, 7, backend="cpu")
    ref_offsets, ref_segments = mk.reference.chunk_offsets(seg_offsets, 7)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(segments, ref_segments)
