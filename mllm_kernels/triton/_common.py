"""Shared ``@triton.jit`` helpers: probe scoring, the NaN-aware probe reduction, and the running
top-t (a bitonic network on (key, id) pairs).

Ordering used by every selection: a larger score first, equal scores by a smaller node id. Scores
are mapped to an order-preserving int64 ``key`` (so the network compares integers only); invalid
slots carry the sentinel pair ``(I64_MIN, I64_MAX)``, which ranks below every valid pair, the
score ``-inf`` included.
"""

from __future__ import annotations

import triton
import triton.language as tl

I64_MIN = tl.constexpr(-(2**63))
I64_MAX = tl.constexpr(2**63 - 1)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def log2(n: int) -> int:
    return int(n).bit_length() - 1


# --------------------------------------------------------------------------- scoring


@triton.jit
def probe_dots(probe_row, P, D, keys_ptr, child, valid,
               BS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """``dots[p, s] = <probes[b, p], keys[child[s]]>`` as ``[BLOCK_P, BS]`` in ``ACC``.

    ``probe_row`` points at ``probes[b]`` (``[P, D]`` contiguous); rows of invalid slots and
    padded probes / columns are loaded as zeros. D is walked in ``BLOCK_D`` chunks.
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
        dots += tl.sum(pr[:, None, :] * kr[None, :, :], axis=2)
    return dots


@triton.jit
def reduce_probes(dots, P, LSE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Reduce ``[BLOCK_P, BS]`` dots over the P real probes: max or logsumexp.

    Matches ``torch.amax`` / ``torch.logsumexp``: any NaN gives NaN, all ``-inf`` gives ``-inf``,
    a ``+inf`` gives ``+inf``.
    """
    pmask = (tl.arange(0, BLOCK_P) < P)[:, None]
    isnan = dots != dots
    d = tl.where(pmask & ~isnan, dots, float("-inf"))
    m = tl.max(d, axis=0)
    has_nan = tl.max(tl.where(pmask & isnan, 1, 0), axis=0) > 0
    if LSE:
        finite = (m > float("-inf")) & (m < float("inf"))
        shift = tl.where(finite, m, 0.0)
        total = tl.sum(tl.where(pmask, tl.exp(d - shift[None, :]), 0.0), axis=0)
        m = shift + tl.log(total)
    return tl.where(has_nan, float("nan"), m)


# --------------------------------------------------------------------------- order keys


@triton.jit
def order_key(score, F64: tl.constexpr):
    """Order-preserving int64 image of a float score (-0.0 is mapped like +0.0); NaN excluded."""
    score = tl.where(score == 0, 0.0, score)
    if F64:
        bits = score.to(tl.int64, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
    else:
        bits32 = score.to(tl.float32).to(tl.int32, bitcast=True)
        key = tl.where(bits32 >= 0, bits32, bits32 ^ 0x7FFFFFFF).to(tl.int64)
    return key


@triton.jit
def key_score(key, F64: tl.constexpr):
    """Inverse of :func:`order_key`."""
    if F64:
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
        score = bits.to(tl.float64, bitcast=True)
    else:
        k32 = key.to(tl.int32)
        bits32 = tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
        score = bits32.to(tl.float32, bitcast=True)
    return score


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
