"""The op benchmark cases: inputs, the two callables compared, and the bytes each op must move.

Every case compares the kernel (the C++ kernels on the CPU, ``backend="cpu"``; on a GPU the
dispatcher's CUDA kernels, ``backend="auto"``) with the eager PyTorch reference
(``backend="reference"``), both called through the public ``mllm_kernels.<op>`` API on the same
inputs. ``bytes`` is the memory traffic the op cannot avoid (inputs read once, outputs written
once); dividing it by the kernel's median time gives its effective bandwidth:

* descend: per query, the ``T * fanout`` child keys (``D * itemsize`` each) and its probes;
  plus parents read and the ``[B, t]`` ids and scores written.
* descend int8: the same with int8 keys (``D`` bytes and a 4-byte scale per child). Its
  "reference" is not the eager reference but the same kernel on the float16 keys the int8 keys
  were quantised from (same probes, parents and shapes), so the speedup column is the int8 over
  float16 speed-up, measured side by side; the params give recall@t of the int8 result against
  the float16 one.
* descend_tree: the same per level; the top level reads all of its ``N_0`` keys per query.
* score_children: the child keys and probes read, ``[B, T * fanout]`` scores and ids written;
  forward+backward adds the keys read again, the score gradient read, the probe gradient
  written and the dense ``[N, D]`` key gradient written.
* cls_pool: ``x`` read once and ``[C, H, D]`` written; forward+backward adds ``x`` read again,
  the output gradient read and the ``[N, D]`` gradient of ``x`` written.
* chunk_offsets: the segment offsets read, chunk offsets and chunk segments written.

descend and score_children (forward) on the CPU also carry a ``block_read``: the children blocks
the kernel reads (the keys; not the int8 scales), read in the same order with the library's
prefetch stream and no scoring (``block_read.py``), so the report can give the kernel's bandwidth
against that of its access pattern.

descend and score_children draw enough parent sets to touch four times the largest cache
(:func:`parent_set_count`) and use the next one at every call, so that on a level larger than the
caches the keys come from memory, not from the L3.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import mllm_kernels as mk

from .report import largest_cache_bytes
from .sizes import Sizes

KEY_DTYPE = torch.float16


@dataclass
class Case:
    """One benchmark case: ``kernel`` and ``reference`` compute the same thing."""

    op: str
    params: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes: int
    # For ops that read a level's children blocks: the same blocks read with no scoring
    # (block_read.py), timed beside the kernel; None for the other ops, or off the CPU.
    block_read: Callable[[], object] | None = None


class Inputs:
    """Seeded random inputs on ``device``; a ``shared`` tensor is reused by the next case asking
    for the same shape (the large keys and rows take seconds to fill), the one before it is
    released. The values are drawn on the CPU, so every device gets the same inputs.

    ``backend`` is the kernel side of every case: the C++ kernels on the CPU, the dispatcher's
    choice (``"auto"``: the Triton kernels in a build without CUDA C++) on a GPU.
    """

    def __init__(self, seed: int = 0, device: str = "cpu"):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.backend = "cpu" if self.device.type == "cpu" else "auto"
        self._shared: tuple = ((), None)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the inputs' device."""
        return tensor.to(self.device)

    def rand(self, shape, dtype=KEY_DTYPE, shared: bool = False) -> torch.Tensor:
        """Uniform in [-1, 1)."""
        shape = tuple(shape)
        if shared and self._shared[0] == (shape, dtype):
            return self._shared[1]
        if shared:
            self._shared = ((), None)
        tensor = self.put(torch.empty(shape, dtype=dtype).uniform_(-1.0, 1.0, generator=self.gen))
        if shared:
            self._shared = ((shape, dtype), tensor)
        return tensor


def _random_parents(B: int, n_parents: int, T: int, gen) -> torch.Tensor:
    """``[B, T]`` distinct parents per query, drawn independently for every query."""
    if T >= n_parents:
        return torch.arange(n_parents).repeat(B, 1)
    weights = torch.ones(B, n_parents)
    return torch.multinomial(weights, T, replacement=False, generator=gen)


# Parent sets a case cycles through, one per call: the keys one set touches (B * T blocks of
# fanout rows, 25 MB at the default sizes) would stay in the L3 if every call read the same ones,
# so a level "beyond the caches" would be read from the L3 after the first call. The sets touch
# at least four times the largest cache together, and there are PARENT_SETS to MAX_PARENT_SETS
# of them (the small presets' sets are tiny: their levels stay in the caches anyway).
PARENT_SETS = 16
MAX_PARENT_SETS = 256


def parent_set_count(set_bytes: int, cache_bytes: int | None) -> int:
    """How many parent sets of ``set_bytes`` each it takes to touch four times ``cache_bytes``
    (clamped to ``PARENT_SETS`` .. ``MAX_PARENT_SETS``)."""
    if not cache_bytes or set_bytes <= 0:
        return PARENT_SETS
    return min(MAX_PARENT_SETS, max(PARENT_SETS, -(-4 * cache_bytes // set_bytes)))


def _parent_sets(s: Sizes, n: int, inp: Inputs) -> list[torch.Tensor]:
    """Random ``[B, T]`` parent sets of a level of ``n`` nodes, enough to read past the caches
    (:func:`parent_set_count`, for float16 keys)."""
    set_bytes = s.B * s.T * s.fanout * s.D * KEY_DTYPE.itemsize
    count = parent_set_count(set_bytes, largest_cache_bytes())
    return [inp.put(_random_parents(s.B, -(-n // s.fanout), s.T, inp.gen)) for _ in range(count)]


def _cycle(items: list) -> Callable[[], object]:
    """A callable returning the next of ``items``, round and round."""
    position = {"i": -1}

    def next_item():
        position["i"] = (position["i"] + 1) % len(items)
        return items[position["i"]]

    return next_item


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.0f} kB"


def _both(fn: Callable[[str], object], inp: Inputs):
    """``(kernel, reference)`` callables from ``fn(backend)``."""
    return (lambda: fn(inp.backend)), (lambda: fn("reference"))


def _block_reader(keys: torch.Tensor, sets: list[torch.Tensor], s: Sizes, inp: Inputs):
    """The read of the blocks of ``sets`` (cycled like the kernel's parents), or None off the CPU."""
    if inp.device.type != "cpu":
        return None
    from .block_read import block_reader

    try:
        return block_reader(keys, _cycle(sets), s.fanout)
    except OSError as error:  # no compiler, no source checkout
        warnings.warn(f"block read not timed: {error}", stacklevel=2)
        return None


def descend_case(s: Sizes, n: int, inp: Inputs, label: str) -> Case:
    """``descend`` on one level of ``n`` children with random parents per query."""
    keys = inp.rand((n, s.D), shared=True)
    probes = inp.rand((s.B, s.P, s.D))
    sets = _parent_sets(s, n, inp)
    kernel_parents, ref_parents = _cycle(sets), _cycle(sets)

    def kernel():
        return mk.descend(probes, keys, kernel_parents(), s.fanout, s.t, backend=inp.backend)

    def ref():
        return mk.descend(probes, keys, ref_parents(), s.fanout, s.t, backend="reference")

    item = keys.element_size()
    n_bytes = s.B * s.T * s.fanout * s.D * item + probes.nbytes + s.B * s.T * 8 + s.B * s.t * 12
    params = f"{label}: N={n:,} ({_mb(keys.nbytes)} keys) B={s.B} P={s.P} T={s.T} t={s.t}"
    return Case("descend", params, kernel, ref, n_bytes, _block_reader(keys, sets, s, inp))


def _recall(ids: torch.Tensor, ref_ids: torch.Tensor) -> float:
    """Fraction of the valid ids of ``ref_ids [B, t]`` that ``ids`` also returns in its row."""
    hits = total = 0
    for row, ref_row in zip(ids.tolist(), ref_ids.tolist()):
        ref = {i for i in ref_row if i >= 0}
        hits += len(ref & set(row))
        total += len(ref)
    return hits / total if total else 1.0


def descend_int8_case(s: Sizes, n: int, inp: Inputs, label: str) -> Case:
    """``descend`` with int8 keys (kernel) against float16 keys (reference column), same backend.

    The int8 keys are ``quantize_keys`` of the float16 keys of the same shape (shared with the
    float16 ``descend`` case before it); probes and parents are the same for both sides.
    """
    keys16 = inp.rand((n, s.D), shared=True)
    keys8, scales = mk.quantize_keys(keys16)
    probes = inp.rand((s.B, s.P, s.D))
    sets = _parent_sets(s, n, inp)
    parents8, parents16 = _cycle(sets), _cycle(sets)

    def kernel():
        return mk.descend(probes, keys8, parents8(), s.fanout, s.t, key_scales=scales, backend=inp.backend)

    def float16():
        return mk.descend(probes, keys16, parents16(), s.fanout, s.t, backend=inp.backend)

    recall = _recall(kernel()[0], float16()[0])
    n_bytes = s.B * s.T * s.fanout * (s.D + 4) + probes.nbytes + s.B * s.T * 8 + s.B * s.t * 12
    params = (
        f"{label}: N={n:,} ({_mb(keys8.nbytes)} int8 keys vs {_mb(keys16.nbytes)} float16) B={s.B} P={s.P} "
        f"T={s.T} t={s.t}; reference column = float16 keys (same kernels); recall@{s.t} vs float16 {recall:.1%}"
    )
    return Case("descend int8", params, kernel, float16, n_bytes, _block_reader(keys8, sets, s, inp))


def tree_level_sizes(leaves: int, fanout: int) -> list[int]:
    """Level sizes top to bottom, ``N_parent = ceil(N_child / fanout)``, top level <= fanout."""
    sizes = [leaves]
    while sizes[-1] > fanout:
        sizes.append(-(-sizes[-1] // fanout))
    return sizes[::-1]


def descend_tree_case(s: Sizes, inp: Inputs) -> Case:
    """``descend_tree`` over a whole random tree of ``s.tree_leaves`` leaves."""
    sizes = tree_level_sizes(s.tree_leaves, s.fanout)
    keys = [inp.rand((n, s.D), shared=n == sizes[-1]) for n in sizes]
    probes = [inp.rand((s.B, s.P, s.D)) for _ in sizes]
    kernel, ref = _both(lambda b: mk.descend_tree(probes, keys, s.fanout, s.t, backend=b), inp)
    item = KEY_DTYPE.itemsize
    n_bytes = s.B * sizes[0] * s.D * item
    n_bytes += sum(s.B * min(s.t * s.fanout, n) * s.D * item for n in sizes[1:])
    n_bytes += sum(p.nbytes for p in probes) + len(sizes) * s.B * s.t * 12
    levels = " -> ".join(f"{n:,}" for n in sizes)
    params = f"levels {levels} B={s.B} P={s.P} t={s.t}"
    return Case("descend_tree", params, kernel, ref, n_bytes)


def score_children_case(s: Sizes, n: int, inp: Inputs, backward: bool) -> Case:
    """``score_children`` forward, or forward+backward with gradients for probes and keys."""
    keys = inp.rand((n, s.D), shared=not backward)
    probes = inp.rand((s.B, s.P, s.D))
    sets = _parent_sets(s, n, inp)
    parents = sets[0]
    slots = s.B * s.T * s.fanout
    n_bytes = slots * (s.D * keys.element_size() + 4 + 8) + probes.nbytes + parents.nbytes
    if not backward:
        kernel_parents, ref_parents = _cycle(sets), _cycle(sets)
        kernel, ref = _both(
            lambda b: mk.score_children(
                probes, keys, (kernel_parents if b == inp.backend else ref_parents)(), s.fanout, backend=b
            ),
            inp,
        )
        op = "score_children"
    else:
        probes.requires_grad_(True)
        keys.requires_grad_(True)
        grad_scores = inp.put(torch.randn(s.B, s.T * s.fanout, generator=inp.gen))

        def step(backend):
            scores, _ = mk.score_children(probes, keys, parents, s.fanout, backend=backend)
            return torch.autograd.grad(scores, (probes, keys), grad_scores)

        kernel, ref = _both(step, inp)
        n_bytes += slots * (s.D * keys.element_size() + 4) + probes.nbytes + keys.nbytes
        op = "score_children fwd+bwd"
    params = f"N={n:,} ({_mb(keys.nbytes)} keys) B={s.B} P={s.P} T={s.T}"
    return Case(op, params, kernel, ref, n_bytes, None if backward else _block_reader(keys, sets, s, inp))


def chunk_offsets_of_rows(n: int, chunk_size: int) -> torch.Tensor:
    """Offsets of consecutive ``chunk_size``-row chunks covering ``n`` rows (last may be short)."""
    offsets = torch.arange(0, n, chunk_size, dtype=torch.int64)
    return torch.cat([offsets, torch.tensor([n], dtype=torch.int64)])


def cls_pool_case(s: Sizes, n: int, heads: int, inp: Inputs, backward: bool) -> Case:
    """``cls_pool`` of ``n`` rows in chunks of ``s.chunk_size`` with ``heads`` CLS queries."""
    x = inp.rand((n, s.D), shared=not backward)
    q = inp.rand((heads, s.D))
    offsets = inp.put(chunk_offsets_of_rows(n, s.chunk_size))
    C = offsets.numel() - 1
    out_bytes = C * heads * s.D * x.element_size()
    n_bytes = x.nbytes + out_bytes + offsets.nbytes
    if not backward:
        kernel, ref = _both(lambda b: mk.cls_pool(x, q, offsets, backend=b), inp)
        op = "cls_pool"
    else:
        x.requires_grad_(True)
        q.requires_grad_(True)
        grad_out = inp.rand((C, heads, s.D))

        def step(backend):
            pooled = mk.cls_pool(x, q, offsets, backend=backend)
            return torch.autograd.grad(pooled, (x, q), grad_out)

        kernel, ref = _both(step, inp)
        n_bytes += 2 * x.nbytes + out_bytes
        op = "cls_pool fwd+bwd"
    params = f"N={n:,} ({_mb(x.nbytes)}) D={s.D} H={heads} chunk={s.chunk_size}"
    if backward and n < s.pool_rows:
        params += f" (N below the forward's {s.pool_rows:,}: reference autograd time/memory)"
    return Case(op, params, kernel, ref, n_bytes)


def chunk_offsets_case(s: Sizes, inp: Inputs) -> Case:
    """``chunk_offsets`` of ``s.segments`` segments of random length (some empty)."""
    lengths = torch.randint(0, s.max_segment + 1, (s.segments,), generator=inp.gen)
    seg = inp.put(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    n_chunks = int(((lengths + s.chunk_size - 1) // s.chunk_size).sum())
    kernel, ref = _both(lambda b: mk.chunk_offsets(seg, s.chunk_size, backend=b), inp)
    n_bytes = seg.nbytes + (2 * n_chunks + 1) * 8
    params = f"S={s.segments:,} segments -> C={n_chunks:,} chunks of {s.chunk_size}"
    return Case("chunk_offsets", params, kernel, ref, n_bytes)


def all_cases(s: Sizes, seed: int = 0, device: str = "cpu") -> list[tuple[str, Callable[[], Case]]]:
    """``(op, build)`` for every case, in run order; ``build()`` makes the inputs on ``device``,
    so a run builds one case at a time and frees it before the next."""
    inp = Inputs(seed, device)
    return [
        ("descend", lambda: descend_case(s, s.n_cached, inp, "cached")),
        ("descend", lambda: descend_int8_case(s, s.n_cached, inp, "cached")),
        ("descend", lambda: descend_case(s, s.n_large, inp, "beyond cache")),
        ("descend", lambda: descend_int8_case(s, s.n_large, inp, "beyond cache")),
        # One probe per query (the identity ranker of the end-to-end benchmark): 1 FMA per key
        # element instead of P, so the scan is bound by memory, not by arithmetic.
        ("descend", lambda: descend_case(replace(s, P=1), s.n_large, inp, "beyond cache, one probe")),
        ("descend", lambda: descend_int8_case(replace(s, P=1), s.n_large, inp, "beyond cache, one probe")),
        ("score_children", lambda: score_children_case(s, s.n_large, inp, backward=False)),
        ("descend_tree", lambda: descend_tree_case(s, inp)),
        ("cls_pool", lambda: cls_pool_case(s, s.pool_rows, 1, inp, backward=False)),
        ("cls_pool", lambda: cls_pool_case(s, s.pool_rows, 4, inp, backward=False)),
        ("score_children", lambda: score_children_case(s, s.n_grad, inp, backward=True)),
        ("cls_pool", lambda: cls_pool_case(s, s.pool_rows_grad, 1, inp, backward=True)),
        ("cls_pool", lambda: cls_pool_case(s, s.pool_rows_grad, 4, inp, backward=True)),
        ("chunk_offsets", lambda: chunk_offsets_case(s, inp)),
    ]
