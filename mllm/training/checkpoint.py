"""Training checkpoints: written atomically, so an interrupted run resumes from the last good one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` (modules' and optimizers' ``state_dict()``, step, RNG, ...) with ``torch.save``.

    Temporary file in the same directory, fsync, rename: a crash leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path) -> dict | None:
    """The state saved at ``path``, or None when there is none yet (a fresh run)."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
