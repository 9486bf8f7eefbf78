"""chunk_offsets kernel.

The launcher computes the inclusive prefix sum ``ends[s]`` of the per-segment chunk counts (it
needs the total C on the host to size the outputs anyway). Grid ``(cdiv(C, BLOCK),)``: each
lane is one chunk c; a branch-free binary search finds its segment s (the first with
``ends[s] > c``, which skips empty segments), and ``start = seg_offsets[s] + (c - first) * chunk_size``
with ``first = ends[s] - count[s]``. Program 0 also writes ``chunk_offsets[C] = seg_offsets[S]``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_offsets_kernel(seg_ptr, ends_ptr, offsets_ptr, segment_ptr, S, C, chunk_size, steps,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + S
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        e = tl.load(ends_ptr + mid, mask=cmask & active, other=0)
        right = e <= c
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    seg = lo
    end_s = tl.load(ends_ptr + seg, mask=cmask, other=0)
    seg_start = tl.load(seg_ptr + seg, mask=cmask, other=0)
    seg_stop = tl.load(seg_ptr + seg + 1, mask=cmask, other=0)
    length = seg_stop - seg_start
    count = length // chunk_size + (length % chunk_size != 0)  # ceil without overflow
    first = end_s - count
    tl.store(offsets_ptr + c, seg_start + (c - first) * chunk_size, mask=cmask)
    tl.store(segment_ptr + c, seg, mask=cmask)
    last = tl.load(seg_ptr + S)
    tl.store(offsets_ptr + C, last, mask=pid == 0)
