"""The read of a descent's key blocks with no scoring (``block_read.cpp``), built on first use.

``descend`` reads, for each query row, the ``fanout`` children of each of its parents: random
blocks of contiguous rows, not one sequential stream. A sequential read pass (``sum``) gets the
help of the hardware prefetchers that random blocks do not; :func:`block_reader` gives the read of
exactly the blocks a ``descend`` call reads, with the library's own prefetch stream and threads,
so that the op benchmarks can report the kernel's bandwidth against what its access pattern gets
on the machine, beside the sequential figure.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("block_read.cpp")
_INCLUDE = Path(__file__).resolve().parents[1] / "csrc" / "cpu"


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """block_read.cpp compiled (once per source, prefetch header and -march) with g++ and loaded.

    Raises OSError (FileNotFoundError without g++ or outside a source checkout) when it cannot be built.
    """
    march = os.environ.get("MLLM_CPU_ARCH", "native")
    header = _INCLUDE / "prefetch_stream.h"
    if not header.exists():
        raise FileNotFoundError(f"{header} (the library's prefetch stream) is not here: run from a source checkout")
    digest = hashlib.sha256(_SOURCE.read_bytes() + header.read_bytes() + march.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"mllm_block_read_{digest}.so"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        command = ["g++", "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", f"-I{_INCLUDE}",
                   str(_SOURCE), "-o", str(partial)]  # fmt: skip
        built = subprocess.run(command, check=False, capture_output=True, text=True)  # no g++: FileNotFoundError
        if built.returncode != 0:
            raise OSError(f"building {_SOURCE.name} failed ({' '.join(command)}):\n{built.stderr[-2000:]}")
        partial.replace(path)  # atomic: a concurrent run never loads a half-written library
    library = ctypes.CDLL(str(path))
    library.read_blocks.restype = None
    library.read_blocks.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                    ctypes.c_void_p]  # fmt: skip
    return library


def read_blocks(keys: torch.Tensor, parents: torch.Tensor, fanout: int, threads: int | None = None) -> torch.Tensor:
    """Reads the children blocks of ``parents`` the way ``descend`` does and returns a checksum per row.

    Args:
        keys: ``[N, D]`` contiguous CPU tensor of any dtype, ``D * itemsize`` a multiple of 32 bytes.
        parents: ``[B, T]`` int64 parent ids (-1 empty) on the CPU.
        fanout: children per parent; parent ``p``'s block is rows ``p*fanout .. p*fanout+fanout-1``
            (the last block may be short).
        threads: OpenMP threads (default: torch's intra-op thread count, as ``descend`` uses).

    Returns:
        ``[B]`` int64: for each row, the XOR of every 8-byte word of the rows it read, folded in
        32-byte loads (the word at byte ``8*i`` of a row goes to lane ``i % 4``, the lanes XORed).
    """
    row_bytes = keys.shape[1] * keys.element_size()
    if keys.dim() != 2 or keys.device.type != "cpu" or not keys.is_contiguous() or row_bytes % 32:
        raise ValueError(
            f"keys: expected a contiguous [N, D] CPU tensor with rows of 32k bytes, got {tuple(keys.shape)}"
        )
    if parents.dim() != 2 or parents.dtype != torch.int64 or parents.device.type != "cpu":
        raise ValueError(f"parents: expected a [B, T] int64 CPU tensor, got {parents.dtype} {tuple(parents.shape)}")
    if fanout < 1:
        raise ValueError(f"fanout: expected >= 1, got {fanout}")
    parents = parents.contiguous()
    if parents.numel() and int(parents.max()) * fanout >= keys.shape[0]:
        raise ValueError(f"parents: a parent past the last block of {keys.shape[0]} keys (fanout {fanout})")
    out = torch.empty(parents.shape[0], dtype=torch.int64)
    chunk = 8 if keys.dtype == torch.int8 else 6  # the rows descend reads from one block in turn
    _library().read_blocks(
        keys.data_ptr(), row_bytes, keys.shape[0], parents.data_ptr(), parents.shape[0], parents.shape[1], fanout,
        chunk, threads or torch.get_num_threads(), out.data_ptr(),
    )  # fmt: skip
    return out


def block_reader(keys: torch.Tensor, parents: Callable[[], torch.Tensor], fanout: int) -> Callable[[], torch.Tensor]:
    """A callable reading the blocks of ``parents()`` (called each time, like the case's kernel)."""
    _library()  # build now, not in the first timed call
    return lambda: read_blocks(keys, parents(), fanout)
