"""Persistence of saved memories: one safetensors file per memory, written atomically, read defensively.

A memory file is an ordinary safetensors file (``safetensors.torch.load_file`` reads its tensors). Its
``__metadata__`` holds the format tag and version, the caller's metadata as a JSON string, and three
sha256 checksums: of that JSON string, of the tensor table (names, dtypes, shapes, offsets) and of the
data section. The loader parses the header itself so that every defect, truncation included, becomes a
``MemoryFileError`` naming the file, instead of a crash or silently wrong tensors.
"""

import hashlib
import json
import mmap as _mmap
import os
import re
import secrets
from typing import NoReturn

import safetensors.torch
import torch

FORMAT_VERSION = 1

_FORMAT_TAG = "mllm.memory"
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces; a larger one is corruption
_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "BOOL": "bool",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip


class MemoryFileError(ValueError):
    """A saved memory that cannot be read: truncated, corrupted, wrong format or version.

    The message names the path and what is wrong.
    """


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _table_digest(table: dict) -> str:
    # Canonical form, so the digest does not depend on how safetensors orders or pads the header.
    return _sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())


def _split(buf: bytes) -> tuple[dict, memoryview]:
    """The tensor table and data section of a serialisation that safetensors just produced."""
    n = int.from_bytes(buf[:8], "little")
    table = json.loads(buf[8 : 8 + n])
    table.pop("__metadata__", None)
    return table, memoryview(buf)[8 + n :]


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write ``tensors`` and the JSON-serialisable ``metadata`` dict as a memory file.

    Tensors are detached, moved to CPU and made contiguous. The file is written to a temporary file
    beside ``path``, fsynced and renamed onto it, so ``path`` holds either its old content or the
    complete new file, never a partial one. Metadata round-trips through JSON (tuples come back as
    lists). Costs one extra in-memory serialisation: the checksum of the data sits in the header
    that precedes it.
    """
    path = os.fspath(path)
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    prepared, storages = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (the same tensor under two names, an empty
        # slice inside another tensor): give such tensors storage of their own.
        if t.numel() == 0:
            t = torch.empty(t.shape, dtype=t.dtype)
        elif t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        else:
            storages.add(t.untyped_storage().data_ptr())
        prepared[name] = t
    meta_json = json.dumps(metadata)
    header = {"format": _FORMAT_TAG, "format_version": str(FORMAT_VERSION), "metadata": meta_json}

    # The data section does not depend on the header's metadata: serialise once to hash it.
    table, data = _split(safetensors.torch.save(prepared, metadata=header))
    header.update(metadata_sha256=_sha256(meta_json.encode()), tensors_sha256=_table_digest(table))
    header["data_sha256"] = _sha256(data)
    n_data = len(data)
    del data
    buf = safetensors.torch.save(prepared, metadata=header)
    final_table, final_data = _split(buf)
    if final_table != table or len(final_data) != n_data:
        raise RuntimeError("safetensors serialised the same tensors differently twice")
    if len(buf) - len(final_data) - 8 >= _MAX_HEADER:
        raise ValueError(f"metadata too large: the header must stay under {_MAX_HEADER} bytes")
    del final_data

    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if os.name == "posix":  # persist the rename itself; directories cannot be opened on Windows
        dfd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _parse_table(fail, table: dict) -> tuple[list, int]:
    """Validate the tensor table; return [(name, dtype, shape, begin, end)] in data order and the data length."""
    entries = []
    for name, e in table.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            fail(f"has a malformed entry for tensor {name!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        dtype = _DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dtype is None:
            fail(f"has unsupported dtype {e['dtype']!r} for tensor {name!r}")
        # type() is int, not isinstance: JSON true/false would pass as 1/0.
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            fail(f"has an invalid shape {shape!r} for tensor {name!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            fail(f"has invalid data_offsets {offsets!r} for tensor {name!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            fail(f"has data_offsets {offsets} for tensor {name!r}, but shape {shape} of {e['dtype']} "
                 f"needs {numel * dtype.itemsize} bytes")  # fmt: skip
        entries.append((name, dtype, shape, begin, end))
    entries.sort(key=lambda x: (x[3], x[4]))
    cursor = 0
    for name, _, _, begin, end in entries:
        # The data section must be tiled exactly: a gap or an overlap means a corrupted table.
        if begin != cursor:
            fail(f"has tensor {name!r} at byte {begin} of the data section, expected {cursor}")
        cursor = end
    return entries, cursor


def load_tensors(path, *, mmap: bool = False, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a memory file written by ``save_tensors``; return ``(tensors, metadata)``.

    The header, the format version and the checksums of the metadata and of the tensor table are
    always checked. ``verify=True`` also hashes the whole data section (one pass over the file, also
    with ``mmap=True``); ``verify=False`` skips that, so undetected data corruption is possible.
    ``mmap=True`` returns tensors viewing a private copy-on-write map of the file: loading reads only
    the header, the tensors are writable and writes never reach the file. The file must not be
    truncated in place while mapped (``save_tensors`` replaces files, it never rewrites them).

    Raises FileNotFoundError for a missing file and MemoryFileError for any unreadable content.
    """
    path = os.fspath(path)

    def fail(problem: str) -> NoReturn:
        raise MemoryFileError(f"memory file {path} {problem}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            fail(f"is not a memory file: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n >= _MAX_HEADER or n > size - 8:
            fail(f"is truncated or not a memory file: header length {n}, file has {size - 8} bytes after it")
        try:
            table = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            fail(f"has a corrupted header: {exc}")
        if not isinstance(table, dict):
            fail("has a corrupted header: not a JSON object")
        meta = table.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_TAG:
            fail(f"is not an MLLM memory file (no {_FORMAT_TAG!r} format tag)")
        version = meta.get("format_version")
        if not isinstance(version, str) or not re.fullmatch(r"[0-9]{1,9}", version):
            fail(f"has an invalid format version {version!r}")
        if int(version) > FORMAT_VERSION:
            fail(f"has format version {int(version)}, but this code reads version {FORMAT_VERSION}; "
                 "it was written by a newer mllm")  # fmt: skip
        if int(version) != FORMAT_VERSION:
            fail(f"has unknown format version {int(version)} (this code reads version {FORMAT_VERSION})")
        entries, n_data = _parse_table(fail, table)
        start = 8 + n
        if size - start < n_data:
            fail(f"is truncated: header promises {n_data} data bytes, file has {size - start}")
        if size - start > n_data:
            fail(f"has {size - start - n_data} unexpected bytes after its {n_data} data bytes")
        meta_json = meta.get("metadata")
        if not isinstance(meta_json, str) or _sha256(meta_json.encode()) != meta.get("metadata_sha256"):
            fail("has corrupted metadata: checksum mismatch")
        if _table_digest(table) != meta.get("tensors_sha256"):
            fail("has a corrupted tensor table: checksum mismatch")
        expected_data = meta.get("data_sha256")
        if not isinstance(expected_data, str) or not re.fullmatch(r"[0-9a-f]{64}", expected_data):
            fail(f"has an invalid data checksum {expected_data!r}")
        try:
            metadata = json.loads(meta_json)
        except (ValueError, RecursionError) as exc:
            fail(f"has unreadable metadata: {exc}")
        if not isinstance(metadata, dict):
            fail("has corrupted metadata: not a JSON object")

        tensors = {}
        if mmap:
            mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
            if len(mm) != size:
                fail("changed while it was being loaded")
            if verify:
                with memoryview(mm) as view:
                    ok = _sha256(view[start:]) == expected_data
                if not ok:
                    fail("has corrupted data: checksum mismatch")
            for name, dtype, shape, begin, end in entries:
                if begin == end:  # frombuffer rejects count=0
                    tensors[name] = torch.empty(shape, dtype=dtype)
                    continue
                # The tensor holds a reference to the map, which stays open as long as any tensor lives.
                t = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
                if (start + begin) % dtype.itemsize:  # only a hand-made file; kernels may assume alignment
                    t = t.clone()
                tensors[name] = t.view(shape)
        else:
            h = hashlib.sha256()
            for name, dtype, shape, begin, end in entries:  # in data order, so the reads are sequential
                t = torch.empty(shape, dtype=dtype)
                if begin != end:
                    view = t.view(-1).view(torch.uint8).numpy()
                    if f.readinto(view) != end - begin:
                        fail("was truncated while it was being loaded")
                    if verify:
                        h.update(view)
                tensors[name] = t
            if verify and h.hexdigest() != expected_data:
                fail("has corrupted data: checksum mismatch")
    return {name: tensors[name] for name in table}, metadata
