"""Shared ``@triton.jit`` helpers: probe scoring with the NaN-aware probe reduction, and the
running top-t (a rank merge, or a bitonic network on (key, id) pairs for large t).

Ordering used by every selection: a larger score first, equal scores by a smaller node id. Scores
are mapped to an order-preserving int64 ``key`` (so the network compares integers only); invalid
slots carry the sentinel pair ``(I64_MIN, I64_MAX)``, which ranks below every valid pair, the
score ``-inf`` included.

Under ``TRITON_INTERPRET=1`` every operation and every nested jit call has a fixed Python cost,
so the helpers are few and coarse.
"""

from __future__ import annotations

import triton
import triton.language as tl

I64_MIN = tl.constexpr(-(2**63))
I64_MAX = tl.constexpr(2**63 - 1)

# Reductions are written ``tl.reduce(x, axis, SUM)`` with triton's own combine functions rather
# than ``tl.sum`` / ``tl.max``: the same code on a GPU, but the interpreter runs these as single
# NumPy reductions without the fixed cost of a nested jit call (``tl.sum`` is one).
try:
    from triton.language.standard import _elementwise_max as MAX
    from triton.language.standard import _elementwise_min as MIN
    from triton.language.standard import _sum_combine as SUM
except ImportError:  # pragma: no cover - other triton versions: same results, slower interpreter

    @triton.jit
    def SUM(a, b):
        return a + b

    @triton.jit
    def MAX(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def MIN(a, b):
        return tl.minimum(a, b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def log2(n: int) -> int:
    return int(n).bit_length() - 1


# --------------------------------------------------------------------------- scoring


@triton.jit
def probe_scores(probe_row, P, D, keys_ptr, scales_ptr, child, valid, LSE: tl.constexpr, HAS_SCALES: tl.constexpr,
                 BS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Dots ``[BLOCK_P, BS]`` of the row's probes with the slots' keys, and their reduction.

    ``dots[p, s] = <probes[b, p], keys[child[s]]>`` in ``ACC``, times ``scales[child[s]]`` with
    HAS_SCALES (int8 keys: the row is converted exactly, the scale applied once to the raw dot
    product, before the probe reduction). ``probe_row`` points at
    ``probes[b]`` (``[P, D]`` contiguous); invalid slots and padded probes / columns load as
    zeros; D is walked in ``BLOCK_D`` chunks. Every slot is computed by the same operations, so
    equal keys get bit-identical scores (exact ties). The score reduces the P real probes with
    max (LSE false) or logsumexp, like ``torch.amax`` / ``torch.logsumexp``: any NaN gives NaN,
    all ``-inf`` gives ``-inf``, a ``+inf`` gives ``+inf``.
    """
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    row = tl.where(valid, child, 0).to(tl.int64) * D
    dots = tl.zeros([BLOCK_P, BS], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        pr = tl.load(probe_row + offs_p[:, None] * D + offs_d[None, :],
                     mask=pmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        kr = tl.load(keys_ptr + row[:, None] + offs_d[None, :],
                     mask=valid[:, None] & dmask[None, :], other=0.0).to(ACC)
        dots += tl.reduce(pr[:, None, :] * kr[None, :, :], 2, SUM)
    if HAS_SCALES:
        dots = dots * tl.load(scales_ptr + child, mask=valid, other=0.0).to(ACC)[None, :]
    isnan = dots != dots  # noqa: PLR0124 (NaN test)
    real = pmask[:, None]
    d = tl.where(real & ~isnan, dots, float("-inf"))
    m = tl.reduce(d, 0, MAX)
    if LSE:
        finite = (m > float("-inf")) & (m < float("inf"))
        shift = tl.where(finite, m, 0.0)
        total = tl.reduce(tl.exp(d - shift[None, :]), 0, SUM)
        m = shift + tl.log(total)
    has_nan = tl.reduce(tl.where(real & isnan, 1, 0), 0, MAX) > 0
    return dots, tl.where(has_nan, float("nan"), m)


# --------------------------------------------------------------------------- order keys


@triton.jit
def key_score(key, F64: tl.constexpr):
    """Inverse of the order key of :func:`push_top`."""
    if F64:
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
        score = bits.to(tl.float64, bitcast=True)
    else:
        k32 = key.to(tl.int32)
        bits32 = tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
        score = bits32.to(tl.float32, bitcast=True)
    return score


# --------------------------------------------------------------------------- running top-R


@triton.jit
def push_top(run_k, run_v, score, child, valid, F64: tl.constexpr, R: tl.constexpr, LOGR: tl.constexpr,
             BS: tl.constexpr, RANK: tl.constexpr):
    """Merge a tile of BS scored slots into the running top-R ``(run_k, run_v)`` (sorted, best first).

    NaN scores and invalid slots are dropped. Scores become order-preserving int64 keys (-0.0
    like +0.0). Valid (key, id) pairs must be distinct (no child twice in a row), so the order
    is strict. A tile whose best key is below the running minimum is skipped.

    RANK: rank merge -- each pair's rank in the union is the number of pairs that beat it
    (``[BS, BS]`` and ``[R, BS]`` comparisons), and the new top R is gathered by rank with
    one-hot reductions; a constant number of operations (good for small R and the interpreter).
    Otherwise: bitonic merge (R >= BS), :func:`merge_top`.
    """
    valid = valid & (score == score)  # noqa: PLR0124 (drop NaN)
    s = tl.where(score == 0, 0.0, score)
    if F64:
        bits = s.to(tl.int64, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
    else:
        bits32 = s.to(tl.float32).to(tl.int32, bitcast=True)
        key = tl.where(bits32 >= 0, bits32, bits32 ^ 0x7FFFFFFF).to(tl.int64)
    key = tl.where(valid, key, I64_MIN)
    ids = tl.where(valid, child.to(tl.int64), I64_MAX)
    best = tl.reduce(key, 0, MAX)
    if (best > I64_MIN) & (best >= tl.reduce(run_k, 0, MIN)):
        if RANK:
            # tile i beats tile j
            tk_i = key[:, None]
            tk_j = key[None, :]
            t_beats_t = (tk_i > tk_j) | ((tk_i == tk_j) & (ids[:, None] < ids[None, :]))
            rank_t = tl.reduce(t_beats_t.to(tl.int32), 0, SUM)
            rk = run_k[:, None]
            rv = run_v[:, None]
            same_k = rk == tk_j
            r_beats_t = (rk > tk_j) | (same_k & (rv < ids[None, :]))
            t_beats_r = ~r_beats_t & ~(same_k & (rv == ids[None, :]))
            rank_t += tl.reduce(r_beats_t.to(tl.int32), 0, SUM)
            pos = tl.arange(0, R)
            rank_r = pos + tl.reduce(t_beats_r.to(tl.int32), 1, SUM)
            at_r = rank_r[None, :] == pos[:, None]
            at_t = rank_t[None, :] == pos[:, None]
            run_k = tl.maximum(tl.reduce(tl.where(at_r, run_k[None, :], I64_MIN), 1, MAX),
                               tl.reduce(tl.where(at_t, key[None, :], I64_MIN), 1, MAX))
            run_v = tl.minimum(tl.reduce(tl.where(at_r, run_v[None, :], I64_MAX), 1, MIN),
                               tl.reduce(tl.where(at_t, ids[None, :], I64_MAX), 1, MIN))
        else:
            run_k, run_v = merge_top(run_k, run_v, widen(key, I64_MIN, BS, R), widen(ids, I64_MAX, BS, R), R, LOGR)
    return run_k, run_v


# --------------------------------------------------------------------------- bitonic network


@triton.jit
def _cas(k, v, N: tl.constexpr, J: tl.constexpr, S: tl.constexpr, DESC: tl.constexpr, ALT: tl.constexpr):
    """Compare-and-swap the pairs ``(i, i + 2**J)`` of the length-N sequences (k, v).

    Rank: larger key first, then smaller id. Without ALT the whole sequence is ordered
    descending (DESC) or ascending; with ALT, blocks of ``2**S`` alternate by bit S of the index
    (the direction of block 0 is DESC).
    """
    G: tl.constexpr = N // (2 << J)
    W: tl.constexpr = 1 << J
    ka, kb = tl.split(tl.permute(tl.reshape(k, [G, 2, W]), [0, 2, 1]))
    va, vb = tl.split(tl.permute(tl.reshape(v, [G, 2, W]), [0, 2, 1]))
    a_first = (ka > kb) | ((ka == kb) & (va < vb))
    if ALT:
        group = tl.arange(0, G)[:, None]
        desc = (((group >> (S - J - 1)) & 1) == 0) == DESC
        swap = a_first != desc
    elif DESC:
        swap = ~a_first
    else:
        swap = a_first
    nka = tl.where(swap, kb, ka)
    nkb = tl.where(swap, ka, kb)
    nva = tl.where(swap, vb, va)
    nvb = tl.where(swap, va, vb)
    k = tl.reshape(tl.permute(tl.join(nka, nkb), [0, 2, 1]), [N])
    v = tl.reshape(tl.permute(tl.join(nva, nvb), [0, 2, 1]), [N])
    return k, v


@triton.jit
def sort_pairs(k, v, N: tl.constexpr, LOGN: tl.constexpr, DESC: tl.constexpr):
    """Bitonic sort of (k, v) pairs of power-of-two length N."""
    for s in tl.static_range(1, LOGN + 1):
        for jj in tl.static_range(s):
            k, v = _cas(k, v, N, s - 1 - jj, s, DESC, True)
    return k, v


@triton.jit
def merge_top(run_k, run_v, tile_k, tile_v, R: tl.constexpr, LOGR: tl.constexpr):
    """Merge an unsorted tile of R pairs into the running top-R (sorted descending).

    Sort the tile ascending; the element-wise better of (running[i], tile[i]) is the top R of
    the union as a bitonic sequence; one bitonic merge sorts it descending.
    """
    tk, tv = sort_pairs(tile_k, tile_v, R, LOGR, False)
    take_run = (run_k > tk) | ((run_k == tk) & (run_v < tv))
    mk = tl.where(take_run, run_k, tk)
    mv = tl.where(take_run, run_v, tv)
    for jj in tl.static_range(LOGR):
        mk, mv = _cas(mk, mv, R, LOGR - 1 - jj, LOGR, True, False)
    return mk, mv


@triton.jit
def widen(x, fill, BS: tl.constexpr, R: tl.constexpr):
    """Place a ``[BS]`` tile at the front of a ``[R]`` vector (R a multiple of BS), rest ``fill``."""
    if R == BS:
        out = x
    else:
        rows = tl.arange(0, R // BS)[:, None]
        out = tl.reshape(tl.where(rows == 0, x[None, :], fill), [R])
    return out
