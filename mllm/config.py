"""MemoryConfig: the shape of a hierarchical memory."""

from __future__ import annotations

import dataclasses

import torch

_KEY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("sequential", "semantic")


@dataclasses.dataclass
class MemoryConfig:
    """Everything that fixes the structure of a memory (saved with it).

    Attributes:
        d_model: embedding width D of every level (the chunk encoder's output width).
        chunk_size: tokens per chunk; a document's last chunk may be shorter.
        fanout: children per parent; the top level holds at most ``fanout`` nodes.
        t: default beam (nodes kept per level) of ``retrieve``.
        key_dtype: storage dtype of the ranker keys: "float32", "float16" or "bfloat16".
        layout: leaf order at build time: "sequential" (consecutive chunks share a parent, as in
            the design) or "semantic" (balanced k-means order, so siblings are similar).
        reduce: how a node's scores against several probes combine: "max" or "lse".
        max_levels: the deepest tree the encoders and rankers are sized for.
        level_layers: transformer layers of the level encoder that builds level k+2 from level
            k+1, per level (the last value repeats higher up); higher levels may have more.
        normalize: L2-normalise every embedding (cosine geometry, as sentence encoders use).
        seed: seed of the semantic layout's k-means.
    """

    d_model: int = 384
    chunk_size: int = 128
    fanout: int = 16
    t: int = 8
    key_dtype: str = "float16"
    layout: str = "sequential"
    reduce: str = "max"
    max_levels: int = 8
    level_layers: tuple[int, ...] = (0,)
    normalize: bool = True
    seed: int = 0

    def __post_init__(self):
        self.level_layers = tuple(int(n) for n in self.level_layers)
        for name in ("d_model", "chunk_size", "t", "max_levels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MemoryConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.fanout < 2:
            raise ValueError(f"MemoryConfig: fanout must be >= 2, got {self.fanout}")
        if self.key_dtype not in _KEY_DTYPES:
            raise ValueError(f"MemoryConfig: key_dtype must be one of {sorted(_KEY_DTYPES)}, got {self.key_dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"MemoryConfig: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.reduce not in ("max", "lse"):
            raise ValueError(f"MemoryConfig: reduce must be 'max' or 'lse', got {self.reduce!r}")
        if not self.level_layers or min(self.level_layers) < 0:
            raise ValueError(f"MemoryConfig: level_layers must be non-empty and >= 0, got {self.level_layers}")

    @property
    def key_torch_dtype(self) -> torch.dtype:
        return _KEY_DTYPES[self.key_dtype]

    def layers_of_level(self, level: int) -> int:
        """Transformer layers of the encoder that builds tree level ``level`` (2 = parents of leaves)."""
        return self.level_layers[min(level - 2, len(self.level_layers) - 1)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MemoryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"MemoryConfig: unknown fields {sorted(unknown)}")
        return cls(**values)
