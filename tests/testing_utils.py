"""Shared helpers of the test suite: data makers, tolerances and comparisons.

The oracle of every test is :mod:`mllm_kernels.reference`; the compared implementations are the
backends in :data:`BACKENDS`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

BACKENDS = ["cpu", "triton"]
ALL_BACKENDS = ["cpu", "triton", "reference"]

#: Where the suite runs the Triton kernels: "cpu" (under ``TRITON_INTERPRET=1``, the default) or
#: a GPU, ``MLLM_TEST_TRITON_DEVICE=cuda``. On a GPU, every ``backend="triton"`` call of the
#: suite gets its CPU inputs moved to the GPU and its outputs moved back
#: (:func:`route_triton_calls`), so each Triton case compiles and runs as real GPU code.
TRITON_DEVICE = os.environ.get("MLLM_TEST_TRITON_DEVICE", "cpu")

#: The public ops that take ``backend``.
PUBLIC_OPS = ("chunk_offsets", "cls_pool", "score_children", "descend", "descend_tree")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
LOW_PRECISION = (F16, BF16)


def dtypes_for(backend: str):
    """Input dtypes each backend supports on CPU tensors (float64 only for the C++ kernels)."""
    return [F32, F16, BF16, F64] if backend in ("cpu", "reference") else [F32, F16, BF16]


# Tolerances of float32-accumulated scores (score_children, descend), for data whose scores are
# O(1). The inputs of every dtype convert exactly to float32, so only the summation order differs
# from the reference; float64 inputs give float64 scores.
SCORE_TOL = {
    F64: {"atol": 1e-9, "rtol": 1e-9},
    F32: {"atol": 2e-5, "rtol": 2e-5},
    F16: {"atol": 2e-5, "rtol": 2e-5},
    BF16: {"atol": 2e-5, "rtol": 2e-5},
}

# Tolerances of outputs in the input dtype (cls_pool) when compared with the reference on the
# same inputs. fp16/bf16 outputs are also held to the error-budget rule (assert_error_budget).
OUT_TOL = {
    F64: {"atol": 1e-10, "rtol": 1e-10},
    F32: {"atol": 1e-5, "rtol": 1e-5},
    F16: {"atol": 2e-3, "rtol": 2e-3},
    BF16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def score_tol(*tensors):
    return SCORE_TOL[F64] if any(t.dtype == F64 for t in tensors) else SCORE_TOL[F32]


# --------------------------------------------------------------------------------------------
# Data


def randn(shape, dtype=F32, gen=None, scale=1.0):
    """Standard normal values (times ``scale``) rounded to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with torch's intra-op thread count set to n, and restores it after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_probes(B, P, D, dtype, gen):
    """Probes whose dot products with standard-normal keys are O(1)."""
    return randn((B, P, D), dtype, gen, scale=1.0 / math.sqrt(max(D, 1)))


def make_keys(N, D, dtype, gen):
    return randn((N, D), dtype, gen)


def make_parents(B, T, num_parents, gen, p_empty=0.2, p_dup=0.2):
    """int64 ``[B, T]`` parent ids in ``[0, num_parents)`` with some ``-1`` and duplicated slots."""
    if num_parents == 0:
        return torch.full((B, T), -1, dtype=torch.int64)
    parents = torch.randint(0, num_parents, (B, T), generator=gen)
    dup = (torch.rand((B, T), generator=gen) < p_dup) & (torch.arange(T) > 0)
    if T > 1:
        earlier = torch.randint(0, T, (B, T), generator=gen) % torch.arange(1, T + 1)
        parents = torch.where(dup, parents.gather(1, earlier), parents)
    empty = torch.rand((B, T), generator=gen) < p_empty
    return torch.where(empty, torch.full_like(parents, -1), parents)


def make_mask(N, gen, p_keep=0.7):
    return torch.rand(N, generator=gen) < p_keep


def num_parents(N, fanout):
    return -(-N // fanout)


def make_offsets(lengths, start=0):
    """int64 offsets ``[len(lengths) + 1]`` starting at ``start``."""
    out = [start]
    for length in lengths:
        out.append(out[-1] + length)
    return torch.tensor(out, dtype=torch.int64)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with the values of ``t`` (every other element of a wider buffer)."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    view = wide[..., 0]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` (rank >= 2) with its last two dims stored transposed (column-major)."""
    view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(view, t)
    return view


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to each of its tensors, also inside lists and tuples."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def to_device(value, device):
    """``value`` with its CPU tensors moved to ``device``; tensors elsewhere (the meta tensor of
    an error test) stay. The copy is differentiable: a gradient reaches the CPU leaf."""
    return map_tensors(value, lambda t: t.to(device) if t.device.type == "cpu" else t)


def route_triton_calls(device: str) -> None:
    """Run every ``mllm_kernels.<op>(..., backend="triton")`` call on ``device``.

    Inputs on the CPU move to ``device`` and the outputs come back to the CPU, so the tests
    written for the interpreter compare the GPU kernels with the same CPU reference.
    """
    import mllm_kernels as mk
    from mllm_kernels import ops

    for name in PUBLIC_OPS:
        original = getattr(ops, name)

        @functools.wraps(original)
        def routed(*args, _original=original, **kwargs):
            if kwargs.get("backend") != "triton":
                return _original(*args, **kwargs)
            out = _original(*to_device(args, device), **{k: to_device(v, device) for k, v in kwargs.items()})
            return map_tensors(out, torch.Tensor.cpu)

        setattr(ops, name, routed)
        setattr(mk, name, routed)


# --------------------------------------------------------------------------------------------
# Comparisons


def assert_no_poison(t: torch.Tensor, name="output"):
    """No NaN (float) / int64 min (int) left behind by a kernel that skipped part of its output."""
    if t.dtype.is_floating_point:
        assert not torch.isnan(t).any(), f"{name} holds NaN (an unwritten poisoned element?)"
    else:
        assert not (t == torch.iinfo(t.dtype).min).any(), f"{name} holds int64 min (unwritten)"


def assert_error_budget(out, ref_low, ref_exact, factor=2.0, name="output"):
    """The flash-attention rule for low-precision outputs.

    ``max|out - exact| <= factor * max|ref_low - exact| + ulp``: the kernel may be at most
    ``factor`` times as wrong as the reference computed on the same low-precision inputs (which
    rounds its result to the output dtype), plus one ulp of the largest value (when the reference
    happens to round exactly, a kernel may still round to the neighbouring value).
    """
    exact = ref_exact.double()
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == ref_low.dtype, f"{name}: dtype {out.dtype} != {ref_low.dtype}"
    if out.numel() == 0:
        return
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref_low.double() - exact).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * exact.abs().max().item() + 1e-12
    budget = factor * ref_err + ulp
    assert err <= budget, (
        f"{name}: max error {err:.3g} exceeds the budget {budget:.3g} "
        f"({factor} x reference error {ref_err:.3g} + ulp {ulp:.3g})"
    )


def assert_scores_close(scores, ref_scores, atol, rtol, name="scores"):
    """Close values, with -inf and NaN in exactly the same places."""
    assert scores.shape == ref_scores.shape, f"{name}: shape {tuple(scores.shape)} != {tuple(ref_scores.shape)}"
    assert scores.dtype == ref_scores.dtype, f"{name}: dtype {scores.dtype} != {ref_scores.dtype}"
    s, r = scores.double(), ref_scores.double()
    assert torch.equal(torch.isnan(s), torch.isnan(r)), f"{name}: NaN in different places"
    for inf in (math.inf, -math.inf):
        assert torch.equal(s == inf, r == inf), f"{name}: {inf} in different places"
    finite = torch.isfinite(r)
    torch.testing.assert_close(s[finite], r[finite], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _candidate_table(candidates, b):
    cand_ids, cand_scores = candidates
    table = {}
    for i, s in zip(cand_ids[b].tolist(), cand_scores[b].double().tolist()):
        if i >= 0:
            table[i] = s
    return table


def assert_topk_equal(ids, scores, ref_ids, ref_scores, atol=2e-5, rtol=2e-5, candidates=None):
    """Compare top-t results ``[B, t]`` with the reference's.

    * shapes and dtypes match; ids are int64 and each row is unique apart from ``-1``;
    * the valid entries come first, the ``-1`` padding count equals the reference's and the
      padding scores are ``-inf``;
    * the scores are sorted descending, never NaN, and equal (exactly equal) scores list the
      smaller id first;
    * the scores match the reference's position by position within ``atol + rtol * |s|``;
    * the ids match the reference's exactly where scores are well separated, and as sets within
      each run of near-tied reference scores (the run cut off by ``t`` may hold other near-tied
      candidates);
    * with ``candidates=(cand_ids, cand_scores)`` (every candidate of each row and its exact
      score, e.g. float64 ``reference.score_children``), every returned id must be a candidate
      of its row, not NaN, and its returned score must match its exact score.
    """
    assert ids.dtype == torch.int64, f"ids dtype {ids.dtype}"
    assert ids.shape == ref_ids.shape, f"ids shape {tuple(ids.shape)} != {tuple(ref_ids.shape)}"
    assert scores.shape == ref_scores.shape, f"scores shape {tuple(scores.shape)} != {tuple(ref_scores.shape)}"
    assert scores.dtype == ref_scores.dtype, f"scores dtype {scores.dtype} != {ref_scores.dtype}"
    B, t = ids.shape
    ids_l, ref_ids_l = ids.tolist(), ref_ids.tolist()
    s_l, ref_s_l = scores.double().tolist(), ref_scores.double().tolist()
    for b in range(B):
        row, ref_row, s, rs = ids_l[b], ref_ids_l[b], s_l[b], ref_s_l[b]
        where = f"row {b}: ids {row} scores {s}; reference ids {ref_row} scores {rs}"
        n = sum(i != -1 for i in row)
        n_ref = sum(i != -1 for i in ref_row)
        assert all(i >= -1 for i in row), f"invalid (poisoned?) id in {where}"
        assert n == n_ref, f"{n} valid ids instead of {n_ref} in {where}"
        assert all(i >= 0 for i in row[:n]) and all(i == -1 for i in row[n:]), f"padding not at the end in {where}"
        assert all(x == -math.inf for x in s[n:]), f"padding scores must be -inf in {where}"
        assert len(set(row[:n])) == n, f"duplicate ids in {where}"
        assert not any(math.isnan(x) for x in s[:n]), f"NaN score selected in {where}"
        for j in range(n - 1):
            assert s[j] >= s[j + 1], f"scores not sorted descending in {where}"
            if s[j] == s[j + 1]:
                assert row[j] < row[j + 1], f"equal scores must list the smaller id first in {where}"
        for j in range(n):
            assert abs(s[j] - rs[j]) <= atol + rtol * abs(rs[j]), f"score {j} differs in {where}"
        # Runs of near-tied reference scores.
        start = 0
        for j in range(1, n + 1):
            if j == n or rs[j - 1] - rs[j] > 2 * (atol + rtol * abs(rs[j - 1])):
                cut_by_t = j == n and n == t
                if not cut_by_t:
                    assert set(row[start:j]) == set(ref_row[start:j]), f"ids {start}:{j} differ in {where}"
                start = j
        if candidates is not None:
            table = _candidate_table(candidates, b)
            for j in range(n):
                assert row[j] in table, f"id {row[j]} is not a candidate in {where}"
                exact = table[row[j]]
                assert not math.isnan(exact), f"id {row[j]} has a NaN score but was selected in {where}"
                assert abs(s[j] - exact) <= atol + rtol * abs(exact), (
                    f"id {row[j]} reported score {s[j]} but its score is {exact} in {where}"
                )


# --------------------------------------------------------------------------------------------
# Parametrization


def fmt(value) -> str:
    """A short readable id: float32, 3x4x5, max."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return "x".join(fmt(v) for v in value)
    return str(value)


def param(*values, **kwargs):
    """``pytest.param`` with a readable id made of every value."""
    import pytest

    return pytest.param(*values, id="-".join(fmt(v) for v in values), **kwargs)
