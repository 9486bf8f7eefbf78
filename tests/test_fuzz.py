"""Randomised inputs, valid and not (SPEC 4.6: no input may crash, hang or read out of bounds).

Every example runs the reference (validated) path and a compared backend:

* an input the reference's validation rejects (TypeError, ValueError, IndexError) must be
  rejected by the backend too, with one of TypeError, ValueError, IndexError or RuntimeError;
* otherwise the backend either raises one of those (only when the reference also could not
  produce a result) or returns outputs of exactly the documented shapes and dtypes, and, when
  the reference returned, the same values;
* anything else (another exception, a crash) fails.

Sizes stay small: outputs never exceed a few MB, and "huge" values (t, fanout, offsets) are
either harmless or so large that any allocation they imply fails at once.
"""

import itertools
import math
import os
import pickle
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import BACKENDS, assert_scores_close, assert_topk_equal

import mllm_kernels as mk

ALLOWED = (TypeError, ValueError, IndexError, RuntimeError)
VALIDATION = (TypeError, ValueError, IndexError)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
HUGE = [2**48, 2**62, I64_MAX]  # any allocation of this many elements fails immediately

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ODD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.uint8]

# MLLM_FUZZ_SCALE=10 (with HYPOTHESIS_PROFILE=explore) for a longer hunt than CI's.
_SCALE = float(os.environ.get("MLLM_FUZZ_SCALE", "1"))
EXAMPLES = {name: max(1, int(n * _SCALE)) for name, n in {"cpu": 200, "triton": 60, "reference": 100}.items()}
FUZZED = [*BACKENDS, "reference"]


@pytest.fixture(autouse=True)
def _fuzz_watchdog():
    import faulthandler

    faulthandler.dump_traceback_later(300, exit=True)  # a hanging kernel ends the run loudly
    yield
    faulthandler.cancel_dump_traceback_later()


def log_example(args):
    """With MLLM_FUZZ_LOG=path, pickle every example before it runs: after a crash (which no
    test can catch), ``pickle.load(open(path, "rb"))`` is the input that crashed."""
    path = os.environ.get("MLLM_FUZZ_LOG")
    if path:
        with open(path, "wb") as f:
            pickle.dump(args, f)


def run(fn):
    """(result, None) or (None, exception) for the allowed exception types; others propagate."""
    try:
        return fn(), None
    except ALLOWED as error:
        return None, error


def oracle(fn):
    """Like :func:`run` for the reference used as the oracle: any failure only means "no
    oracle" here (the reference backend's own exception types are checked when it is the
    backend under test)."""
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001
        return None, error


class Draw:
    """Sizes come from Hypothesis (which favours 0 and the bounds: good for edge cases); the
    probabilistic switches come from a Random seeded by Hypothesis (whose own integers and
    sampled_from are far from uniform, which made most examples invalid)."""

    def __init__(self, draw):
        self.draw = draw
        self.rng = random.Random(draw(st.integers(0, 2**32 - 1)))

    def size(self, high):
        return self.draw(st.integers(0, high))

    def chance(self, p):
        return self.rng.random() < p

    def choice(self, options):
        return self.rng.choice(list(options))

    def seed(self):
        return self.rng.randrange(2**31)


def float_dtype(d, backend, odd=0.05):
    """A float dtype the backend supports, or (rarely) an unsupported one."""
    if d.chance(odd):
        return d.choice(ODD_DTYPES)
    return d.choice(FLOATS if backend in ("cpu", "reference") else FLOATS[:3])


def index_dtype(d, odd=0.04):
    return d.choice([torch.int32, torch.float32, torch.bool]) if d.chance(odd) else torch.int64


def maybe_bad_shape(d, shape, p=0.03):
    """The shape, or (rarely) one with a dimension added, removed or resized."""
    shape = list(shape)
    if not d.chance(p):
        return tuple(shape)
    kind = d.choice(["add", "drop", "resize"])
    if kind == "add":
        shape.insert(d.rng.randint(0, len(shape)), d.rng.randint(0, 2))
    elif kind == "drop" and shape:
        shape.pop(d.rng.randrange(len(shape)))
    elif shape:
        shape[d.rng.randrange(len(shape))] = d.rng.randint(0, 4)
    return tuple(shape)


def values(d, shape, dtype, nan_p=0.15):
    """Standard-normal floats (sometimes one NaN), small ints or random bools."""
    gen = torch.Generator().manual_seed(d.seed())
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen)
        if t.numel() and d.chance(nan_p):
            t.view(-1)[d.rng.randrange(t.numel())] = torch.nan
        return t.to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    return torch.randint(-3, 4, shape, generator=gen).to(dtype)


def ids_tensor(d, shape, high, dtype, p_bad=0.12):
    """Ids in ``[-1, high)``, or (sometimes) with one out of range or at an int64 extreme."""
    n = math.prod(shape)
    flat = [d.rng.randint(-1, max(high - 1, -1)) for _ in range(n)]
    if n and d.chance(p_bad):
        flat[d.rng.randrange(n)] = d.choice([high, high + 1, -2, 2**31, 2**62, I64_MAX, I64_MIN])
    t = torch.tensor(flat, dtype=torch.int64).reshape(shape)
    return t.to(dtype) if dtype != torch.int64 else t


def pos_int(d, small=(1, 2, 3, 7, 64), huge=True, p_bad=0.06, p_huge=0.06):
    """A count (fanout, t, chunk_size): usually small and valid, sometimes < 1 or huge."""
    if d.chance(p_bad):
        return d.choice([0, -1, -7, I64_MIN])
    if huge and d.chance(p_huge):
        return d.choice(HUGE)
    return d.choice(small) if d.chance(0.5) else d.rng.randint(1, 12)


def bad_reduce(d, p=0.05):
    return d.choice(["min", "", "LSE", "mean"]) if d.chance(p) else d.choice(["max", "lse"])


def settle(ref_err, err, may_reject=False):
    """True when the example is decided by the exceptions alone (nothing left to compare)."""
    if isinstance(ref_err, VALIDATION):
        assert err is not None, f"input rejected by the reference ({ref_err!r}) was accepted"
        return True
    if err is not None:
        # The backend may fail where the reference could not produce a result either, and may
        # refuse floats of two different dtypes with a TypeError (implementation-defined).
        assert ref_err is not None or (may_reject and isinstance(err, TypeError)), f"valid input rejected: {err!r}"
        return True
    return False


def mixed_floats(*tensors):
    dtypes = {t.dtype for t in tensors if t.dtype.is_floating_point}
    return len(dtypes) > 1


# ------------------------------------------------------------------------------------------
# Per-op checks


def check_chunk_offsets(backend, seg_offsets, chunk_size):
    out, err = run(lambda: mk.chunk_offsets(seg_offsets, chunk_size, backend=backend))
    valid = (
        seg_offsets.dtype == torch.int64
        and seg_offsets.dim() == 1
        and seg_offsets.numel() >= 1
        and isinstance(chunk_size, int)
        and chunk_size >= 1
        and bool((seg_offsets >= 0).all())
        and bool((seg_offsets[1:] >= seg_offsets[:-1]).all())
    )
    if not valid:
        assert err is not None, f"invalid input accepted: {seg_offsets}, chunk_size={chunk_size}"
        return
    s = seg_offsets.tolist()
    expected = [s[0]]
    segments = []
    for seg, (a, b) in enumerate(itertools.pairwise(s)):
        n = -(-(b - a) // chunk_size)
        expected += [min(a + (k + 1) * chunk_size, b) for k in range(n)]
        segments += [seg] * n
    assert err is None, f"valid input rejected: {err!r}"
    assert torch.equal(out[0], torch.tensor(expected, dtype=torch.int64))
    assert torch.equal(out[1], torch.tensor(segments, dtype=torch.int64))


@st.composite
def chunk_offsets_inputs(draw):
    d = Draw(draw)
    S = d.size(6)
    chunk_size = pos_int(d, p_bad=0.08, p_huge=0.15)
    big = chunk_size >= 2**40
    start = d.choice([0, 3, 2**61]) if big else d.rng.randint(0, 5)
    offsets = [start]
    for _ in range(S):
        step = d.rng.randint(0, 2**61) if big else d.rng.randint(0, 40) * d.choice([0, 1, 1])
        offsets.append(min(offsets[-1] + step, I64_MAX))
    if S and d.chance(0.1):  # break monotonicity or go negative
        i = d.rng.randint(0, S)
        offsets[i] = d.choice([-1, I64_MIN, offsets[i] - 50])
    t = torch.tensor(offsets, dtype=torch.int64)
    shape = maybe_bad_shape(d, t.shape, p=0.05)
    if shape != tuple(t.shape):
        t = torch.zeros(shape, dtype=torch.int64)
    return t.to(index_dtype(d)), chunk_size


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_chunk_offsets(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(chunk_offsets_inputs())
    def inner(args):
        log_example(args)
        check_chunk_offsets(backend, *args)

    inner()


@st.composite
def cls_pool_inputs(draw, backend):
    d = Draw(draw)
    N, D, H, C = d.size(9), d.size(6), d.size(3), d.size(4)
    x_dtype = float_dtype(d, backend)
    q_dtype = x_dtype if not d.chance(0.1) else float_dtype(d, backend)
    x = values(d, maybe_bad_shape(d, (N, D)), x_dtype)
    q = values(d, maybe_bad_shape(d, (H, D)), q_dtype)
    cuts = sorted(d.rng.randint(0, N) for _ in range(C + 1))
    if d.chance(0.12):
        cuts[d.rng.randint(0, C)] = d.choice([-1, N + 1, 2**62, I64_MAX, I64_MIN, 0])
    offsets = torch.tensor(cuts, dtype=torch.int64).to(index_dtype(d))
    scale = d.choice([0.5, 0.0, -2.0, float("nan"), float("inf")]) if d.chance(0.3) else None
    return x, q, offsets, scale


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_cls_pool(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(cls_pool_inputs(backend))
    def inner(args):
        log_example(args)
        x, q, offsets, scale = args
        ref, ref_err = oracle(lambda: mk.cls_pool(x, q, offsets, scale, backend="reference"))
        out, err = run(lambda: mk.cls_pool(x, q, offsets, scale, backend=backend))
        if settle(ref_err, err, mixed_floats(x, q)):
            return
        assert out.shape == (offsets.numel() - 1, q.shape[0], x.shape[1]) and out.dtype == x.dtype
        if ref is not None:
            tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 2e-2
            nan = torch.isnan(ref)
            assert torch.equal(torch.isnan(out), nan)
            torch.testing.assert_close(out[~nan].float(), ref[~nan].float(), atol=tol, rtol=tol)

    inner()


@st.composite
def children_inputs(draw, backend, with_t):
    d = Draw(draw)
    B, P, D, N, T = d.size(3), d.size(3), d.size(6), d.size(12), d.size(4)
    P = P if d.chance(0.05) else max(P, 1)
    fanout = pos_int(d)
    probes_dtype = float_dtype(d, backend)
    keys_dtype = probes_dtype if not d.chance(0.2) else float_dtype(d, backend)
    probes = values(d, maybe_bad_shape(d, (B, P, D)), probes_dtype)
    keys = values(d, maybe_bad_shape(d, (N, D)), keys_dtype)
    high = -(-N // fanout) if fanout >= 1 else 3
    parents = ids_tensor(d, maybe_bad_shape(d, (B, T)), high, index_dtype(d))
    mask = None
    if d.chance(0.5):
        mask_dtype = torch.bool if not d.chance(0.05) else d.choice([torch.uint8, torch.float32])
        mask = values(d, maybe_bad_shape(d, (N,)), mask_dtype)
    args = {"probes": probes, "keys": keys, "parents": parents, "fanout": fanout, "reduce": bad_reduce(d), "mask": mask}
    if with_t:
        small = (1, 2, 5, 37) + ((10**6,) if backend == "cpu" and B <= 2 else ())
        args["t"] = pos_int(d, small=small)
    return args


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_score_children(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(children_inputs(backend, with_t=False))
    def inner(args):
        log_example(args)
        ref, ref_err = oracle(lambda: mk.score_children(**args, backend="reference"))
        out, err = run(lambda: mk.score_children(**args, backend=backend))
        if settle(ref_err, err, mixed_floats(args["probes"], args["keys"])):
            return
        parents = args["parents"]
        shape = (parents.shape[0], parents.shape[1] * args["fanout"])
        scores, ids = out
        assert tuple(scores.shape) == shape and tuple(ids.shape) == shape
        assert ids.dtype == torch.int64 and scores.dtype == ref_dtype(args)
        if ref is not None:
            assert torch.equal(ids, ref[1])
            assert_scores_close(scores, ref[0], atol=2e-5, rtol=2e-5)

    inner()


def ref_dtype(args):
    return mk.reference.compute_dtype(args["probes"], args["keys"])


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_descend(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(children_inputs(backend, with_t=True))
    def inner(args):
        log_example(args)
        ref, ref_err = oracle(lambda: mk.descend(**args, backend="reference"))
        out, err = run(lambda: mk.descend(**args, backend=backend))
        if settle(ref_err, err, mixed_floats(args["probes"], args["keys"])):
            return
        ids, scores = out
        shape = (args["probes"].shape[0], args["t"])
        assert tuple(ids.shape) == shape and tuple(scores.shape) == shape
        assert ids.dtype == torch.int64 and scores.dtype == ref_dtype(args)
        if ref is not None:
            assert_topk_equal(ids, scores, ref[0], ref[1])

    inner()


@st.composite
def tree_inputs(draw, backend):
    d = Draw(draw)
    levels = 1 + d.size(2)
    fanout = pos_int(d, small=(1, 2, 3, 5))
    f = fanout if 1 <= fanout <= 64 else 3
    B = d.size(3)
    sizes = [d.rng.randint(0, f)]
    for _ in range(levels - 1):
        n = sizes[-1]
        fits = d.rng.randint((n - 1) * f + 1, n * f) if n else 0
        sizes.append(fits if not d.chance(0.05) else d.rng.randint(0, 12))
    dtype = float_dtype(d, backend, odd=0.03)
    probes, keys, masks = [], [], []
    for n in sizes:
        D, P = d.size(5), 1 + d.size(1)
        probes.append(values(d, maybe_bad_shape(d, (B, P, D), p=0.02), dtype))
        keys.append(values(d, maybe_bad_shape(d, (n, D), p=0.02), dtype))
        masks.append(values(d, (n,), torch.bool) if d.chance(0.5) else None)
    if d.chance(0.04):
        probes = probes[: d.rng.randint(0, levels)]
    if d.chance(0.5):
        t = pos_int(d, small=(1, 2, 9))
    else:
        extra = d.choice([1, -1]) if d.chance(0.04) else 0
        t = [pos_int(d, small=(1, 2, 9), huge=False, p_bad=0.03) for _ in range(levels + extra)]
    if d.chance(0.5):
        masks = None
    elif d.chance(0.04):
        masks = masks[:-1]
    return {"probes": probes, "keys": keys, "fanout": fanout, "t": t, "reduce": bad_reduce(d), "masks": masks}


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_descend_tree(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(tree_inputs(backend))
    def inner(args):
        log_example(args)
        ref, ref_err = oracle(lambda: mk.descend_tree(**args, backend="reference"))
        out, err = run(lambda: mk.descend_tree(**args, backend=backend))
        if settle(ref_err, err):
            return
        levels = len(args["keys"])
        ts = [args["t"]] * levels if isinstance(args["t"], int) else args["t"]
        assert len(out) == levels
        for k, (ids, scores) in enumerate(out):
            shape = (args["probes"][k].shape[0], ts[k])
            assert tuple(ids.shape) == shape and tuple(scores.shape) == shape, f"level {k}"
            assert ids.dtype == torch.int64
        if ref is not None:
            # Level by level while the selections agree (a near-tie may change the levels below).
            for k in range(levels):
                assert_topk_equal(out[k][0], out[k][1], ref[k][0], ref[k][1])
                if not torch.equal(out[k][0], ref[k][0]):
                    break

    inner()
