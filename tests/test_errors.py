"""Input checking (SPEC 4.6): every backend raises the documented exception naming the argument.

TypeError for dtypes, ValueError for shapes and values, IndexError for ids or offsets out of
range. Each case starts from valid inputs and breaks one thing.
"""

import pytest
import torch
from testing_utils import ALL_BACKENDS

import mllm_kernels as mk

I64 = torch.int64


def _base(op):
    g = torch.Generator().manual_seed(0)
    if op == "chunk_offsets":
        return {"seg_offsets": torch.tensor([0, 5, 5, 7]), "chunk_size": 2}
    if op == "cls_pool":
        return {
            "x": torch.randn(10, 6, generator=g),
            "q": torch.randn(2, 6, generator=g),
            "chunk_offsets": torch.tensor([0, 3, 3, 10]),
        }
    if op in ("score_children", "descend"):
        args = {
            "probes": torch.randn(2, 3, 6, generator=g),
            "keys": torch.randn(20, 6, generator=g),
            "parents": torch.tensor([[0, 6], [2, -1]]),  # ceil(20 / 3) = 7 parents: ids 0..6
            "fanout": 3,
        }
        if op == "descend":
            args["t"] = 4
        return args
    assert op == "descend_tree"
    return {
        "probes": [torch.randn(2, 2, 6, generator=g), torch.randn(2, 1, 5, generator=g)],
        "keys": [torch.randn(3, 6, generator=g), torch.randn(8, 5, generator=g)],
        "fanout": 3,
        "t": 2,
    }


def _call(op, args, backend):
    return getattr(mk, op)(**args, backend=backend)


# (op, id, {argument: replacement} or a function editing the args, exception, match)
CASES = [
    # chunk_offsets
    ("chunk_offsets", "float_offsets", {"seg_offsets": torch.tensor([0.0, 5.0])}, TypeError, "seg_offsets"),
    (
        "chunk_offsets",
        "int32_offsets",
        {"seg_offsets": torch.tensor([0, 5], dtype=torch.int32)},
        TypeError,
        "seg_offsets",
    ),
    ("chunk_offsets", "2d_offsets", {"seg_offsets": torch.tensor([[0, 5]])}, ValueError, "seg_offsets"),
    ("chunk_offsets", "0d_offsets", {"seg_offsets": torch.tensor(3)}, ValueError, "seg_offsets"),
    ("chunk_offsets", "no_offsets", {"seg_offsets": torch.zeros(0, dtype=I64)}, ValueError, "seg_offsets"),
    ("chunk_offsets", "decreasing", {"seg_offsets": torch.tensor([0, 5, 3, 7])}, ValueError, "seg_offsets"),
    ("chunk_offsets", "negative", {"seg_offsets": torch.tensor([-2, 5])}, IndexError, "seg_offsets"),
    ("chunk_offsets", "chunk_size_0", {"chunk_size": 0}, ValueError, "chunk_size"),
    ("chunk_offsets", "chunk_size_neg", {"chunk_size": -4}, ValueError, "chunk_size"),
    # cls_pool
    ("cls_pool", "int_x", {"x": torch.ones(10, 6, dtype=I64)}, TypeError, r"\bx\b"),
    ("cls_pool", "bool_x", {"x": torch.ones(10, 6, dtype=torch.bool)}, TypeError, r"\bx\b"),
    ("cls_pool", "int_q", {"q": torch.ones(2, 6, dtype=torch.int32)}, TypeError, r"\bq\b"),
    ("cls_pool", "float_offsets", {"chunk_offsets": torch.tensor([0.0, 3.0])}, TypeError, "chunk_offsets"),
    (
        "cls_pool",
        "int32_offsets",
        {"chunk_offsets": torch.tensor([0, 3], dtype=torch.int32)},
        TypeError,
        "chunk_offsets",
    ),
    ("cls_pool", "1d_x", {"x": torch.randn(10)}, ValueError, r"\bx\b"),
    ("cls_pool", "3d_x", {"x": torch.randn(1, 10, 6)}, ValueError, r"\bx\b"),
    ("cls_pool", "1d_q", {"q": torch.randn(6)}, ValueError, r"\bq\b"),
    ("cls_pool", "3d_q", {"q": torch.randn(1, 2, 6)}, ValueError, r"\bq\b"),
    ("cls_pool", "D_mismatch", {"q": torch.randn(2, 5)}, ValueError, r"\bq\b"),
    ("cls_pool", "2d_offsets", {"chunk_offsets": torch.tensor([[0, 3, 10]])}, ValueError, "chunk_offsets"),
    ("cls_pool", "no_offsets", {"chunk_offsets": torch.zeros(0, dtype=I64)}, ValueError, "chunk_offsets"),
    ("cls_pool", "decreasing", {"chunk_offsets": torch.tensor([0, 5, 3, 10])}, ValueError, "chunk_offsets"),
    ("cls_pool", "past_N", {"chunk_offsets": torch.tensor([0, 3, 11])}, IndexError, "chunk_offsets"),
    ("cls_pool", "far_past_N", {"chunk_offsets": torch.tensor([0, 2**62])}, IndexError, "chunk_offsets"),
    ("cls_pool", "negative", {"chunk_offsets": torch.tensor([-1, 3])}, IndexError, "chunk_offsets"),
    ("cls_pool", "nan_scale", {"scale": float("nan")}, ValueError, "scale"),
    ("cls_pool", "inf_scale", {"scale": float("inf")}, ValueError, "scale"),
]

_CHILDREN = [
    ("int_keys", {"keys": torch.ones(20, 6, dtype=I64)}, TypeError, "keys"),
    ("int_probes", {"probes": torch.ones(2, 3, 6, dtype=torch.int32)}, TypeError, "probes"),
    ("float_parents", {"parents": torch.tensor([[0.0, 1.0], [2.0, -1.0]])}, TypeError, "parents"),
    ("int32_parents", {"parents": torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)}, TypeError, "parents"),
    ("uint8_mask", {"mask": torch.ones(20, dtype=torch.uint8)}, TypeError, "mask"),
    ("float_mask", {"mask": torch.ones(20)}, TypeError, "mask"),
    ("2d_probes", {"probes": torch.randn(2, 6)}, ValueError, "probes"),
    ("4d_probes", {"probes": torch.randn(2, 3, 1, 6)}, ValueError, "probes"),
    ("3d_keys", {"keys": torch.randn(20, 6, 1)}, ValueError, "keys"),
    ("1d_keys", {"keys": torch.randn(20)}, ValueError, "keys"),
    ("1d_parents", {"parents": torch.tensor([0, 1])}, ValueError, "parents"),
    ("3d_parents", {"parents": torch.tensor([[[0, 1]], [[2, -1]]])}, ValueError, "parents"),
    ("mask_too_long", {"mask": torch.ones(21, dtype=torch.bool)}, ValueError, "mask"),
    ("mask_too_short", {"mask": torch.ones(19, dtype=torch.bool)}, ValueError, "mask"),
    ("2d_mask", {"mask": torch.ones(20, 1, dtype=torch.bool)}, ValueError, "mask"),
    ("D_mismatch", {"keys": torch.randn(20, 7)}, ValueError, "probes|keys"),
    ("B_mismatch", {"parents": torch.tensor([[0, 1], [2, -1], [3, 3]])}, ValueError, "parents|probes"),
    ("no_probes", {"probes": torch.randn(2, 0, 6)}, ValueError, "probes"),
    ("parent_past_end", {"parents": torch.tensor([[0, 7], [2, -1]])}, IndexError, "parents"),
    ("parent_huge", {"parents": torch.tensor([[0, 2**62], [2, -1]])}, IndexError, "parents"),
    ("parent_int64_max", {"parents": torch.tensor([[0, 2**63 - 1], [2, -1]])}, IndexError, "parents"),
    ("parent_minus_2", {"parents": torch.tensor([[0, -2], [2, -1]])}, IndexError, "parents"),
    ("parent_int64_min", {"parents": torch.tensor([[0, -(2**63)], [2, -1]])}, IndexError, "parents"),
    (
        "parent_of_no_keys",
        {"keys": torch.randn(0, 6), "parents": torch.tensor([[0, -1], [-1, -1]])},
        IndexError,
        "parents",
    ),
    ("fanout_0", {"fanout": 0}, ValueError, "fanout"),
    ("fanout_neg", {"fanout": -3}, ValueError, "fanout"),
    ("reduce_mean", {"reduce": "mean"}, ValueError, "reduce"),
    ("reduce_upper", {"reduce": "MAX"}, ValueError, "reduce"),
    ("reduce_empty", {"reduce": ""}, ValueError, "reduce"),
]
for _op in ("score_children", "descend"):
    CASES += [(_op, *case) for case in _CHILDREN]
CASES += [
    ("descend", "t_0", {"t": 0}, ValueError, r"\bt\b"),
    ("descend", "t_neg", {"t": -5}, ValueError, r"\bt\b"),
]


def _tree_edit(**edits):
    def edit(args):
        for name, fn in edits.items():
            args[name] = fn(args[name])
        return args

    return edit


CASES += [
    ("descend_tree", "sizes_do_not_fit", _tree_edit(keys=lambda k: [k[0], torch.randn(10, 5)]), ValueError, "keys"),
    ("descend_tree", "sizes_too_few", _tree_edit(keys=lambda k: [k[0], torch.randn(6, 5)]), ValueError, "keys"),
    ("descend_tree", "fewer_probes", _tree_edit(probes=lambda p: p[:1]), ValueError, "probes"),
    ("descend_tree", "more_probes", _tree_edit(probes=lambda p: p + p[:1]), ValueError, "probes"),
    ("descend_tree", "t_list_short", {"t": [2]}, ValueError, r"\bt\b"),
    ("descend_tree", "t_list_long", {"t": [2, 2, 2]}, ValueError, r"\bt\b"),
    ("descend_tree", "t_level_0", {"t": [2, 0]}, ValueError, r"\bt\b"),
    ("descend_tree", "t_0", {"t": 0}, ValueError, r"\bt\b"),
    ("descend_tree", "masks_short", {"masks": [None]}, ValueError, "masks"),
    ("descend_tree", "masks_wrong_dtype", {"masks": [None, torch.ones(8, dtype=I64)]}, TypeError, "mask"),
    ("descend_tree", "masks_wrong_shape", {"masks": [None, torch.ones(3, dtype=torch.bool)]}, ValueError, "mask"),
    ("descend_tree", "fanout_0", {"fanout": 0}, ValueError, "fanout"),
    ("descend_tree", "reduce_bad", {"reduce": "sum"}, ValueError, "reduce"),
    ("descend_tree", "int_keys", _tree_edit(keys=lambda k: [k[0], k[1].long()]), TypeError, "keys"),
    ("descend_tree", "int_probes", _tree_edit(probes=lambda p: [p[0].int(), p[1]]), TypeError, "probes"),
    ("descend_tree", "D_mismatch", _tree_edit(keys=lambda k: [k[0], torch.randn(8, 6)]), ValueError, "probes|keys"),
    ("descend_tree", "B_mismatch", _tree_edit(probes=lambda p: [p[0], torch.randn(3, 1, 5)]), ValueError, "probes"),
    ("descend_tree", "2d_probes", _tree_edit(probes=lambda p: [p[0], p[1][:, 0]]), ValueError, "probes"),
    ("descend_tree", "no_probe", _tree_edit(probes=lambda p: [p[0], p[1][:, :0]]), ValueError, "probes"),
]


def _apply(op, edit):
    args = _base(op)
    if callable(edit):
        return edit(args)
    args.update(edit)
    return args


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op, edit, exc, match", [pytest.param(*c[:1], *c[2:], id=f"{c[0]}-{c[1]}") for c in CASES])
def test_bad_input(backend, op, edit, exc, match):
    args = _apply(op, edit)
    with pytest.raises(exc, match=match):
        _call(op, args, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["chunk_offsets", "cls_pool", "score_children", "descend", "descend_tree"])
def test_valid_base_inputs(backend, op):
    """The inputs every case above breaks are themselves valid (so each case tests one thing)."""
    _call(op, _base(op), backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_descend_tree_without_levels(backend):
    with pytest.raises((TypeError, ValueError), match="keys"):
        mk.descend_tree([], [], 3, 2, backend=backend)


@pytest.mark.skipif(mk.built_with_cuda(), reason="this build has the CUDA kernels")
@pytest.mark.parametrize("op", ["chunk_offsets", "cls_pool", "score_children", "descend", "descend_tree"])
def test_cuda_backend_unavailable(op):
    with pytest.raises(RuntimeError, match="unavailable"):
        _call(op, _base(op), "cuda")


@pytest.mark.parametrize("op", ["chunk_offsets", "cls_pool", "score_children", "descend", "descend_tree"])
@pytest.mark.parametrize("name", ["gpu", "", "CPU", "torch"])
def test_unknown_backend(op, name):
    with pytest.raises(ValueError, match="backend"):
        _call(op, _base(op), name)


def test_available_backends():
    names = mk.available_backends()
    assert {"auto", "cpu", "reference", "triton"} <= set(names)
    assert ("cuda" in names) == mk.built_with_cuda()
    assert set(names) <= set(mk.BACKENDS)


@pytest.mark.parametrize("op", ["cls_pool", "score_children", "descend"])
def test_not_a_tensor(op):
    args = _base(op)
    first = next(iter(args))
    args[first] = args[first].tolist()
    for backend in ALL_BACKENDS:
        with pytest.raises(TypeError, match=first):
            _call(op, args, backend)
