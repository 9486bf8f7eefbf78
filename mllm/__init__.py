"""mllm: an LLM memory stored outside the weights as a tree of embeddings, searched in log(N).

The module layer over the fused ops of ``mllm_kernels``:

- ``MemoryConfig``: the shape of a memory (width, chunk size, fanout, beam, key dtype, layout).
- ``ChunkEncoder`` (tokens of a chunk -> one embedding, read off a CLS query with ``cls_pool``),
  ``LevelEncoder`` (``fanout`` embeddings of a level -> one of the level above) and
  ``DecoderRanker`` (query -> probes per level; keys per level). Untrained, they pool as a mean
  and score by cosine, which already gives a usable hierarchy.
- ``HierarchicalMemory``: build, ``add``, ``remove``, ``masked``, ``retrieve``, ``save``/``load``.
- ``pretrained_encoder`` / ``minilm_encoder``: the offline all-MiniLM-L6-v2 chunk encoder.
- ``MemoryAugmentedLM``: a Hugging Face causal LM reading the retrieved embeddings of every level
  as a projected soft prefix; ``train_projector`` tunes the projector.

The command line is ``mllm`` (or ``python -m mllm``): build, add, remove, query, demo, bench.
"""

from .config import MemoryConfig
from .encoders import ChunkEncoder, LevelEncoder
from .lm import MemoryAugmentedLM, MemoryProjector, train_projector
from .memory import HierarchicalMemory, UpdateStats
from .pretrained import minilm_encoder, pretrained_encoder
from .ranker import DecoderRanker
from .results import RetrievalResult, RetrievedChunk
from .storage import MemoryFileError

__all__ = [
    "ChunkEncoder",
    "DecoderRanker",
    "HierarchicalMemory",
    "LevelEncoder",
    "MemoryAugmentedLM",
    "MemoryConfig",
    "MemoryFileError",
    "MemoryProjector",
    "RetrievalResult",
    "RetrievedChunk",
    "UpdateStats",
    "minilm_encoder",
    "pretrained_encoder",
    "train_projector",
]
