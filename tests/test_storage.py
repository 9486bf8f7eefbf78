"""mllm.storage: round trips, safetensors compatibility, every kind of damaged file, atomic writes."""

import gc
import json
import os
import random

import pytest
import safetensors.torch
import torch

from mllm import storage
from mllm.storage import FORMAT_VERSION, MemoryFileError, load_tensors, save_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
META = {"name": "memory", "dim": 8, "levels": [1, 2, 3], "nested": {"x": None, "y": 1.5}, "text": "naïve ✓"}


def _tensors(gen):
    out = {}
    for i, dtype in enumerate(DTYPES):
        if dtype == torch.bool:
            t = torch.rand(5, 3, generator=gen) > 0.5
        elif dtype.is_floating_point:
            t = torch.randn(5, 3, generator=gen).to(dtype)
        else:
            t = torch.randint(0, 200, (5, 3), generator=gen).to(dtype)
        out[f"t{i}"] = t
        out[f"empty{i}"] = torch.empty(0, 4, dtype=dtype)
    out["scalar"] = torch.tensor(3.5)
    out["strided"] = torch.arange(24, dtype=torch.float64).view(4, 6)[:, ::2]  # made contiguous on save
    return out


def _assert_same(got, want):
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


@pytest.fixture
def saved(tmp_path, gen):
    path = tmp_path / "m.mllm"
    tensors = _tensors(gen)
    save_tensors(path, tensors, META)
    return path, tensors


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("verify", [False, True])
def test_round_trip(saved, mmap, verify):
    path, tensors = saved
    got, meta = load_tensors(path, mmap=mmap, verify=verify)
    _assert_same(got, tensors)
    assert meta == META


def test_only_tensors_and_empty_metadata(tmp_path):
    save_tensors(tmp_path / "a", {}, {})
    assert load_tensors(tmp_path / "a") == ({}, {})
    x = torch.arange(6.0)
    save_tensors(str(tmp_path / "b"), {"x": x, "same": x, "slice": x[2:4], "hole": x[3:3]}, {})
    got, _ = load_tensors(tmp_path / "b", mmap=True)
    _assert_same(got, {"x": x, "same": x, "slice": x[2:4], "hole": x[3:3]})
    save_tensors(tmp_path / "c", {"w": torch.ones(2, requires_grad=True)}, {})
    _assert_same(load_tensors(tmp_path / "c")[0], {"w": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]


def test_readable_by_safetensors(saved):
    path, tensors = saved
    _assert_same(safetensors.torch.load_file(path), {k: v.contiguous() for k, v in tensors.items()})


def test_mmap_tensors_are_writable_copies(saved):
    path, tensors = saved
    before = path.read_bytes()
    got, _ = load_tensors(path, mmap=True)
    gc.collect()  # the map is referenced only by the tensors now
    _assert_same(got, tensors)
    got["t0"].fill_(7.0)
    got["t6"][0, 0] = not got["t6"][0, 0]
    del got  # the map must stay valid exactly as long as the tensors: reload while dropping them
    assert path.read_bytes() == before
    again, _ = load_tensors(path, mmap=True)
    assert not torch.all(again["t0"] == 7.0)


def test_overwrite_replaces(saved):
    path, _ = saved
    save_tensors(path, {"x": torch.ones(2)}, {"v": 2})
    got, meta = load_tensors(path)
    _assert_same(got, {"x": torch.ones(2)})
    assert meta == {"v": 2}
    assert os.listdir(path.parent) == [path.name]


def _expect_error(path, **kw):
    for mmap in (False, True):
        with pytest.raises(MemoryFileError) as info:
            load_tensors(path, mmap=mmap, **kw)
        assert str(path) in str(info.value)
    return str(info.value)


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def test_truncation_everywhere(saved):
    path, _ = saved
    data = path.read_bytes()
    n = _header_len(data)
    cuts = list(range(0, 8 + n + 16, 3)) + [8 + n, len(data) - 1] + list(range(8 + n, len(data), 37))
    for cut in cuts:
        path.write_bytes(data[:cut])
        for verify in (True, False):
            msg = _expect_error(path, verify=verify)
        if cut >= 8 + n:
            assert "is truncated: header promises" in msg


def test_trailing_bytes(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\0")
    assert "unexpected bytes" in _expect_error(path, verify=False)


def test_data_byte_flip_detected_by_checksum(saved):
    path, _ = saved
    data = path.read_bytes()
    start = 8 + _header_len(data)
    for pos in range(start, len(data), 29):
        damaged = bytearray(data)
        damaged[pos] ^= 0x10
        path.write_bytes(damaged)
        assert "checksum" in _expect_error(path, verify=True)


def test_verify_false_skips_the_data_hash(saved):
    path, tensors = saved
    data = bytearray(path.read_bytes())
    data[8 + _header_len(data)] ^= 0x01  # first byte of the first tensor in data order
    path.write_bytes(data)
    for mmap in (False, True):
        got, _ = load_tensors(path, mmap=mmap, verify=False)
        assert sum(not torch.equal(got[k], tensors[k]) for k in tensors) == 1


def test_header_byte_flips(saved):
    """Every flipped header bit is caught; without verify only the data checksum's own digits can
    slip through, and then the tensors returned are still the right ones."""
    path, tensors = saved
    data = path.read_bytes()
    for pos in range(8 + _header_len(data)):
        for bit in (0x01, 0x20, 0x80) if pos < 8 else (0x01, 0x20):
            damaged = bytearray(data)
            damaged[pos] ^= bit
            path.write_bytes(damaged)
            _expect_error(path, verify=True)
            for mmap in (False, True):
                try:
                    got, meta = load_tensors(path, mmap=mmap, verify=False)
                except MemoryFileError:
                    continue
                _assert_same(got, tensors)
                assert meta == META


def _rewrite_meta(path, **changes):
    """Re-save the file's tensors with edited __metadata__ (as another writer would produce)."""
    tensors = safetensors.torch.load_file(path)
    data = path.read_bytes()
    meta = json.loads(data[8 : 8 + _header_len(data)])["__metadata__"]
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": str(FORMAT_VERSION + 1)}, f"format version {FORMAT_VERSION + 1}, but this code reads version {FORMAT_VERSION}"),
        ({"format_version": "0"}, "unknown format version 0"),
        ({"format_version": "one"}, "invalid format version"),
        ({"format_version": None}, "invalid format version"),
        ({"format": "other"}, "not an MLLM memory file"),
        ({"metadata": json.dumps({"name": "forged"})}, "corrupted metadata"),
        ({"data_sha256": "0" * 64}, "corrupted data"),
        ({"tensors_sha256": None}, "corrupted tensor table"),
    ],
)  # fmt: skip
def test_bad_metadata(saved, changes, message):
    path, _ = saved
    _rewrite_meta(path, **changes)
    verify = message == "corrupted data"
    assert message in _expect_error(path, verify=verify)
    if not verify:
        assert message in _expect_error(path, verify=True)


def test_plain_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, path)
    assert "not an MLLM memory file" in _expect_error(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x01",
        b"\0" * 8,
        b"\x02\0\0\0\0\0\0\0{}",
        b"\x02\0\0\0\0\0\0\0[]",
        b"\xff" * 64,
        random.Random(0).randbytes(4096),
    ],
    ids=["empty", "one-byte", "zero-header", "no-metadata", "json-list", "ff", "random"],
)
def test_not_a_memory_file(tmp_path, content):
    path = tmp_path / "junk"
    path.write_bytes(content)
    _expect_error(path)


def test_inconsistent_table(tmp_path):
    """Hand-made headers with a valid prefix but impossible tensor entries."""
    meta = {"format": "mllm.memory", "format_version": "1"}
    cases = [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "needs 8 bytes"),
        ({"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "invalid shape"),
        ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "invalid shape"),
        ({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "expected 0"),
        ({"x": {"dtype": "F32", "shape": [1]}}, 4, "malformed entry"),
        ({"x": [1, 2]}, 4, "malformed entry"),
        ({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
          "y": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, 4, "expected 4"),
    ]  # fmt: skip
    for table, n_data, message in cases:
        header = json.dumps({"__metadata__": meta, **table}).encode()
        path = tmp_path / "hand.mllm"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * n_data)
        assert message in _expect_error(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "absent.mllm")


def test_error_is_a_value_error():
    assert issubclass(MemoryFileError, ValueError)


@pytest.mark.parametrize("where", ["replace", "fsync", "serialise"])
def test_failed_save_leaves_old_file_and_no_temp(saved, monkeypatch, where):
    path, tensors = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    target = {"replace": (os, "replace"), "fsync": (os, "fsync"), "serialise": (storage.safetensors.torch, "save")}
    monkeypatch.setattr(*target[where], boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_tensors(path, {"x": torch.zeros(100)}, {"new": True})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    _assert_same(load_tensors(path)[0], tensors)


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_tensors(tmp_path / "m.mllm", {"x": torch.zeros(3)}, {})
    assert os.listdir(tmp_path) == []


def test_bad_arguments_create_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_tensors(tmp_path / "m", {"x": torch.zeros(1)}, {"bad": object()})
    with pytest.raises(TypeError):
        save_tensors(tmp_path / "m", {"x": [1.0]}, {})
    with pytest.raises(TypeError):
        save_tensors(tmp_path / "m", {"x": torch.zeros(1)}, [])
    with pytest.raises(ValueError):
        save_tensors(tmp_path / "m", {"__metadata__": torch.zeros(1)}, {})
    assert os.listdir(tmp_path) == []
